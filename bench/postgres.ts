// The replicas suite's PostgreSQL: a throwaway cluster made with this
// machine's initdb and pg_ctl (lib/store/postgres-cluster.ts) in a
// temporary folder, durable (fsync and full-page writes on, as an operator
// runs it: what a durable commit costs is part of what is measured), a fresh
// database for each configuration, and the CPU the server's processes use.

import { readdirSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { freePort } from "../lib/socket.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PostgresMissing, startCluster, withConnection, withDatabase, type Cluster } from "../lib/store/postgres-cluster.js";
import { cpuSeconds } from "./proc.js";

export { PostgresMissing };

/** Linux reports CPU times in clock ticks of USER_HZ, 100 on every mainstream architecture (as bench/proc.ts). */
const TICKS_PER_SECOND = 100;

/** The fields of /proc/PID/stat after the command name: [0] is the state, [1] the parent's pid, [13] and [14] cutime and cstime. */
function statFields(pid: number | string): string[] | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  } catch {
    return undefined;
  }
}

/**
 * CPU seconds the server has used so far, all its processes together: the
 * postmaster's own, the CPU of its children that have exited (its cutime +
 * cstime: a backend ended during a window still counts), and that of each
 * child running now (backends, checkpointer, WAL writer, autovacuum…).
 * Undefined where /proc cannot tell.
 */
export function serverCpuSeconds(postmaster: number): number | undefined {
  const own = cpuSeconds(postmaster);
  const fields = statFields(postmaster);
  if (own === undefined || !fields) return undefined;
  let total = own + (Number(fields[13]) + Number(fields[14])) / TICKS_PER_SECOND;
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const f = statFields(entry);
    if (f && Number(f[1]) === postmaster) total += cpuSeconds(Number(entry)) ?? 0;
  }
  return total;
}

/** The server's CPU over a span, % of one core: `opened()`, `closed()`, then `percent()`. */
export class ServerCpuSampler {
  private first: { cpu?: number; at: number } = { at: 0 };
  private last: { cpu?: number; at: number } = { at: 0 };

  constructor(private readonly postmaster: number | undefined) {}

  opened(): void {
    this.first = this.sample();
  }

  closed(): void {
    this.last = this.sample();
  }

  percent(): number | undefined {
    const seconds = (this.last.at - this.first.at) / 1000;
    if (this.first.cpu === undefined || this.last.cpu === undefined || seconds <= 0) return undefined;
    return (100 * (this.last.cpu - this.first.cpu)) / seconds;
  }

  private sample() {
    const cpu = this.postmaster === undefined ? undefined : serverCpuSeconds(this.postmaster);
    return { ...(cpu === undefined ? {} : { cpu }), at: performance.now() };
  }
}

export interface BenchPostgres {
  /** The server's version, e.g. "PostgreSQL 15.10 (Debian 15.10-0+deb12u1)…" shortened to "15.10". */
  version: string;
  /** The postmaster's pid, when its postmaster.pid can be read. */
  postmaster?: number;
  /** A new empty database: its URL (with the password; never logged) and a way to drop it. */
  database(name: string): Promise<{ url: string; drop(): Promise<void> }>;
  /** Stops the server and removes its folder. */
  stop(): Promise<void>;
}

/** Starts a durable throwaway cluster; PostgresMissing says why when there can be none here. */
export async function startBenchPostgres(): Promise<BenchPostgres> {
  const dir = await mkdtemp(join(tmpdir(), "netpurse-bench-pg-"));
  let cluster: Cluster;
  try {
    cluster = await startCluster({ dir, port: await freePort(), durable: true, maxConnections: 800 });
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    throw e instanceof PostgresMissing ? e : new PostgresMissing(`a throwaway cluster did not start: ${(e as Error).message}`);
  }
  // Ctrl-C or a crash must not leave the server running.
  const onExit = () => cluster.stopNow();
  process.on("exit", onExit);
  const postmaster = Number(readFileSync(join(dir, "data", "postmaster.pid"), "utf8").split("\n")[0]);
  const version = await withConnection(
    cluster.adminUrl,
    async (c) => (await c.query<{ server_version: string }>("SHOW server_version")).rows[0]?.server_version ?? "unknown",
  );
  return {
    version: version.split(" ")[0] ?? version,
    ...(Number.isInteger(postmaster) && postmaster > 0 ? { postmaster } : {}),
    async database(name) {
      await withConnection(cluster.adminUrl, (c) => c.query(`CREATE DATABASE ${name}`));
      return {
        url: withDatabase(cluster.adminUrl, name),
        drop: () => withConnection(cluster.adminUrl, (c) => c.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)).then(() => undefined),
      };
    },
    async stop() {
      process.off("exit", onExit);
      await cluster.stop("immediate");
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Purchases by state in the payment server's schema ("payment") of `url`, read while the replicas run. */
export async function purchaseStatesIn(url: string): Promise<Record<string, number>> {
  return withConnection(url, async (c) => {
    const r = await c.query<{ key: string; n: string }>("SELECT state AS key, COUNT(*) AS n FROM payment.purchases GROUP BY state");
    return Object.fromEntries(r.rows.map((row) => [row.key, Number(row.n)]));
  });
}
