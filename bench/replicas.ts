// The replicas suite (issue #15): purchases per second, payOffer latency and
// CPU per purchase per process with 1 and 2 payment servers, 1 and 2
// terminal hosts, on SQLite files and on PostgreSQL, all in one run, each
// configuration on a fresh data folder, a fresh network and (PostgreSQL) a
// fresh database. A fixed number of cardholders; a fixed number of PSAMs
// per terminal host, so that a second host doubles the PSAMs.

import { randomBytes } from "node:crypto";
import { closedLoop, type LoadResult, type Phases } from "./load.js";
import { BenchNetwork, PROCESS, shopForMode, type LogFindings } from "./network.js";
import { PostgresMissing, purchaseStatesIn, ServerCpuSampler, startBenchPostgres, type BenchPostgres } from "./postgres.js";
import { CpuSampler, cpuMsPerOperationByProcess, machineCpu } from "./proc.js";
import { buySong } from "./purchases.js";
import { BACKGROUND_DRAIN_MS, unrecordedIn, unrecordedPurchases, waitForBacklog, type Backlog } from "./service-records.js";

export const DATABASES = ["sqlite", "postgresql"] as const;
export type DatabaseKind = (typeof DATABASES)[number];

export interface ReplicasSettings {
  /** Payment servers of the grid, in order (default 1, 2). */
  paymentServers: number[];
  /** Terminal hosts of the grid (default 1, 2). */
  terminalHosts: number[];
  databases: readonly DatabaseKind[];
  /** Concurrent cardholders, the same in every configuration. */
  cardholders: number;
  /** PSAMs on each terminal host: the PSAMs double with a second host. */
  psamsPerHost: number;
  concentrators: number;
  mode: string;
  tls: boolean;
  phases: Phases;
  keepData: boolean;
}

/** The defaults of `--suite replicas`: what issue #15 asks for. */
export const REPLICAS_DEFAULTS = {
  paymentServers: [1, 2],
  terminalHosts: [1, 2],
  cardholders: 32,
  psamsPerHost: 8,
  concentrators: 1,
  seconds: 10,
  /** s: as the stack suite's, the time CPU per purchase takes to stop falling on a fresh network at 30–40 purchases/s (bench/README.md). */
  warmupSeconds: 30,
} as const;

/** One configuration of the grid. */
export interface ReplicasConfiguration {
  paymentServers: number;
  terminalHosts: number;
  database: DatabaseKind;
}

/** Which kind of process a service is, for the table's columns: the replicas of one role are summed. */
export const ROLES = ["payment servers", "concentrators", "terminal hosts", "merchant", "validation", "cardholders (bench)", "other services"] as const;
export type Role = (typeof ROLES)[number];

/** The role of a process launchNetwork named (bench/network.ts PROCESS): payment, payment-r2, terminal-2, concentrator-2, merchant-SHOP… */
export function roleOf(name: string): Role {
  if (name === PROCESS.payment || name.startsWith("payment-")) return "payment servers";
  if (name === PROCESS.concentrator || name.startsWith("concentrator-")) return "concentrators";
  if (name.startsWith("terminal-")) return "terminal hosts";
  if (name === PROCESS.validation) return "validation";
  if (name.startsWith("merchant-")) return "merchant";
  if (name === PROCESS.bench) return "cardholders (bench)";
  return "other services";
}

export interface ReplicasRun extends LoadResult {
  /** PSAMs in all (terminal hosts × PSAMs per host). */
  psams: number;
  /** CPU per process during the window, % of one core; "bench" is this process, where the cardholders' cards run. */
  cpuPercent: Record<string, number>;
  /** utime + stime over the window ÷ the purchases that ended in it, ms, per process. */
  cpuMsPerPurchase: Record<string, number>;
  /** The same summed per role (ROLES). */
  cpuMsPerPurchaseByRole: Record<Role, number>;
  /** Over every process of the network and the benchmark's, PostgreSQL's not included. */
  cpuMsPerPurchaseTotal: number;
  /** The PostgreSQL server's processes (postmaster, backends, background workers), with PostgreSQL; undefined where /proc cannot tell. */
  postgresCpuPercent?: number;
  postgresCpuMsPerPurchase?: number;
  /** The whole machine's busy CPU over the window, % of one core (up to 100 × cores). */
  machineCpuPercent?: number;
  unrecordedAfterLoad: Backlog;
  serviceLogs: LogFindings;
  dataDir?: string;
}

/** A cell of the grid: measured, not applicable here (why), or failed (the error). */
export type ReplicasCell = ReplicasConfiguration &
  ({ outcome: "measured"; run: ReplicasRun } | { outcome: "n/a"; reason: string } | { outcome: "failed"; message: string });

export interface ReplicasReport {
  cardholders: number;
  psamsPerHost: number;
  concentrators: number;
  mode: string;
  tls: boolean;
  phases: Phases;
  /** The PostgreSQL server measured against (its version), or why there was none. */
  postgres: { version: string; durable: true } | { unavailable: string } | { notAsked: true };
  cells: ReplicasCell[];
}

/** Replicas keep one state between them only in a shared database. */
export const REPLICAS_NEED_POSTGRES = "n/a: replicas need PostgreSQL";

/** "2 payment servers, 2 terminal hosts (16 PSAMs), PostgreSQL". */
export function replicasLabel(c: ReplicasConfiguration, psamsPerHost: number): string {
  const n = (k: number, what: string) => `${k} ${what}${k === 1 ? "" : "s"}`;
  return `${n(c.paymentServers, "payment server")}, ${n(c.terminalHosts, "terminal host")} (${c.terminalHosts * psamsPerHost} PSAMs), ${c.database === "sqlite" ? "SQLite" : "PostgreSQL"}`;
}

/** The grid in the order it runs: by database, then payment servers, then terminal hosts. */
export function replicasGrid(s: Pick<ReplicasSettings, "databases" | "paymentServers" | "terminalHosts">): ReplicasConfiguration[] {
  return s.databases.flatMap((database) =>
    s.paymentServers.flatMap((paymentServers) => s.terminalHosts.map((terminalHosts) => ({ paymentServers, terminalHosts, database }))),
  );
}

const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);

/** Every configuration of the grid, one after the other; a PostgreSQL cluster for the run when any configuration needs one. */
export async function measureReplicas(s: ReplicasSettings): Promise<ReplicasReport> {
  const grid = replicasGrid(s);
  const runnable = grid.filter((c) => c.database === "postgresql" || c.paymentServers === 1);
  process.stderr.write(
    `netpurse bench, replicas: ${grid.length} configurations (${runnable.length} to run), ${s.cardholders} cardholders, ${s.psamsPerHost} PSAMs per terminal host, ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of load each (${s.phases.warmupMs / 1000} s warm-up), plus start-up\n`,
  );
  let postgres: BenchPostgres | undefined;
  let postgresState: ReplicasReport["postgres"] = { notAsked: true };
  if (runnable.some((c) => c.database === "postgresql")) {
    try {
      postgres = await startBenchPostgres();
      postgresState = { version: postgres.version, durable: true };
      process.stderr.write(`replicas: PostgreSQL ${postgres.version} started (durable: fsync on)\n`);
    } catch (e) {
      if (!(e instanceof PostgresMissing)) throw e;
      postgresState = { unavailable: e.message };
      process.stderr.write(`replicas: no PostgreSQL, its configurations are not measured: ${e.message}\n`);
    }
  }
  const cells: ReplicasCell[] = [];
  try {
    for (const [i, c] of grid.entries()) {
      if (c.database === "sqlite" && c.paymentServers > 1) {
        cells.push({ ...c, outcome: "n/a", reason: REPLICAS_NEED_POSTGRES });
        continue;
      }
      if (c.database === "postgresql" && !postgres) {
        const why = "unavailable" in postgresState ? postgresState.unavailable : "not started";
        cells.push({ ...c, outcome: "n/a", reason: `n/a: no PostgreSQL here (${why})` });
        continue;
      }
      process.stderr.write(`replicas run ${i + 1}/${grid.length}\n`);
      try {
        cells.push({ ...c, outcome: "measured", run: await measureConfiguration(c, s, postgres, i) });
      } catch (e) {
        // A configuration that cannot run (a part of the layout not in yet) fails its cell; the others still run.
        const message = (e as Error)?.message ?? String(e);
        process.stderr.write(`[${replicasLabel(c, s.psamsPerHost)}] failed: ${(e as Error)?.stack ?? message}\n`);
        cells.push({ ...c, outcome: "failed", message: message.split("\n")[0]! });
      }
    }
  } finally {
    await postgres?.stop();
  }
  return {
    cardholders: s.cardholders,
    psamsPerHost: s.psamsPerHost,
    concentrators: s.concentrators,
    mode: s.mode,
    tls: s.tls,
    phases: s.phases,
    postgres: postgresState,
    cells,
  };
}

/** One configuration on a fresh data folder, network and (PostgreSQL) database. */
async function measureConfiguration(c: ReplicasConfiguration, s: ReplicasSettings, postgres: BenchPostgres | undefined, index: number): Promise<ReplicasRun> {
  const label = replicasLabel(c, s.psamsPerHost);
  process.stderr.write(`[${label}] setting up a data folder${c.database === "postgresql" ? " and a database" : ""} and starting the network\n`);
  const database = c.database === "postgresql" ? await postgres!.database(`netpurse_bench_${index}_${randomBytes(4).toString("hex")}`) : undefined;
  try {
    const p = {
      psams: s.psamsPerHost,
      cardholders: s.cardholders,
      shop: shopForMode(s.mode),
      tls: s.tls,
      keepData: s.keepData,
      layout: {
        terminals: c.terminalHosts,
        concentrators: s.concentrators,
        paymentServers: c.paymentServers,
        ...(database ? { database: database.url } : {}),
      },
    };
    return await BenchNetwork.session(p, async (net, cardholders, merchant) => {
      const cpu = new CpuSampler(() => net.allProcesses());
      const server = new ServerCpuSampler(database ? postgres?.postmaster : undefined);
      const window = {
        opened: () => {
          server.opened();
          cpu.opened();
        },
        closed: () => {
          cpu.closed();
          server.closed();
        },
      };
      const load = await closedLoop({ label, workers: s.cardholders, phases: s.phases, operation: (w) => buySong(merchant, cardholders[w]!), window });
      // Stopping the network with purchases still being recorded would cut them short (and log it).
      const unrecorded = database ? async () => unrecordedIn(await purchaseStatesIn(database.url)) : () => unrecordedPurchases(net.dir);
      const unrecordedAfterLoad = await waitForBacklog(unrecorded, await unrecorded(), BACKGROUND_DRAIN_MS);
      await net.stop();
      const cpuPercent = cpu.percent();
      const cpuMsPerPurchase = cpuMsPerOperationByProcess(cpuPercent, load.perSecond);
      const byRole = Object.fromEntries(ROLES.map((role) => [role, 0])) as Record<Role, number>;
      for (const [name, v] of Object.entries(cpuMsPerPurchase)) byRole[roleOf(name)] += v;
      const postgresCpuPercent = server.percent();
      return {
        psams: c.terminalHosts * s.psamsPerHost,
        ...load,
        cpuPercent,
        cpuMsPerPurchase,
        cpuMsPerPurchaseByRole: byRole,
        cpuMsPerPurchaseTotal: sum(Object.values(cpuMsPerPurchase)),
        ...(postgresCpuPercent !== undefined
          ? { postgresCpuPercent, postgresCpuMsPerPurchase: load.perSecond > 0 ? (postgresCpuPercent * 10) / load.perSecond : NaN }
          : {}),
        ...machineCpu(cpu),
        unrecordedAfterLoad,
        serviceLogs: await net.logFindings(),
        ...(s.keepData ? { dataDir: net.dir } : {}),
      };
    });
  } finally {
    await database?.drop();
  }
}

/** Failed purchases, failed configurations and purchases left unrecorded: each fails the run. */
export function replicasErrors(r: ReplicasReport): number {
  return sum(r.cells.map((cell) => (cell.outcome === "failed" ? 1 : cell.outcome === "measured" ? cell.run.errors + cell.run.unrecordedAfterLoad.left : 0)));
}
