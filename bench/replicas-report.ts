// The replicas suite's part of the report: purchases per second, latency
// and CPU per purchase per process for each configuration of the grid, what
// each step of the grid changes, the method, and anything that went wrong.

import { markdown, ms, pct, rate, ratio } from "./format.js";
import { ROLES, replicasLabel, type ReplicasCell, type ReplicasReport, type ReplicasRun, type Role } from "./replicas.js";
import { roleOf } from "./replicas.js";

type Measured = Extract<ReplicasCell, { outcome: "measured" }>;

const fixed = (v: number | undefined, digits: number) => (v === undefined || !Number.isFinite(v) ? "n/a" : v.toFixed(digits));
const databaseName = (d: ReplicasCell["database"]) => (d === "sqlite" ? "SQLite" : "PostgreSQL");
const configurationCells = (c: ReplicasCell, r: ReplicasReport) => [
  String(c.paymentServers),
  String(c.terminalHosts),
  String(c.terminalHosts * r.psamsPerHost),
  databaseName(c.database),
];
const CONFIGURATION_HEADINGS = ["payment servers", "terminal hosts", "PSAMs", "database"];

/** The machine's busy CPU less the network's, the cardholders' and PostgreSQL's, % of one core: other work sharing the cores. */
function otherWork(p: ReplicasRun): number | undefined {
  if (p.machineCpuPercent === undefined) return undefined;
  const ours = Object.values(p.cpuPercent).reduce((a, b) => a + b, 0) + (p.postgresCpuPercent ?? 0);
  return Math.max(0, p.machineCpuPercent - ours);
}

/** What a cell that was not measured says in place of its figures. */
const notMeasured = (c: ReplicasCell) => (c.outcome === "n/a" ? c.reason : c.outcome === "failed" ? `failed: ${c.message}` : "");

function throughputTable(r: ReplicasReport, cores: number): string {
  const rows = r.cells.map((c) => {
    if (c.outcome !== "measured") return [...configurationCells(c, r), notMeasured(c), "", "", "", "", "", "", "", "", ""];
    const p = c.run;
    const all = p.cpuMsPerPurchaseTotal + (p.postgresCpuMsPerPurchase ?? 0);
    return [
      ...configurationCells(c, r),
      rate(p.perSecond),
      ms(p.p50Ms),
      ms(p.p99Ms),
      String(p.errors),
      String(p.serviceLogs.count),
      fixed(all, 1),
      fixed(p.postgresCpuMsPerPurchase, 1),
      // Every core's second of CPU spent on purchases at this CPU per purchase: what the machine could do, whatever the layout.
      fixed((cores * 1000) / all, 1),
      p.machineCpuPercent === undefined ? "n/a" : `${pct(p.machineCpuPercent)} of ${cores * 100}`,
      pct(otherWork(p)),
    ];
  });
  return markdown(
    [
      ...CONFIGURATION_HEADINGS,
      "purchases/s",
      "p50 ms",
      "p99 ms",
      "errors",
      "service log warnings",
      "CPU ms per purchase, every process",
      "of which PostgreSQL",
      "purchases/s the cores allow",
      "machine busy, % of one core",
      "other work on the machine %",
    ],
    rows,
  );
}

/** A role's ms per purchase; with several processes, each one's in brackets (how evenly the replicas share the work). */
function roleCell(p: ReplicasRun, role: Role): string {
  const each = Object.entries(p.cpuMsPerPurchase)
    .filter(([name]) => roleOf(name) === role)
    .sort(([a], [b]) => a.localeCompare(b));
  const total = fixed(p.cpuMsPerPurchaseByRole[role], 1);
  return each.length > 1 && role !== "other services" ? `${total} (${each.map(([, v]) => fixed(v, 1)).join(" + ")})` : total;
}

function cpuTable(r: ReplicasReport): string {
  const rows = r.cells.flatMap((c) => {
    if (c.outcome !== "measured") return [];
    const p = c.run;
    return [
      [
        ...configurationCells(c, r),
        ...ROLES.map((role) => roleCell(p, role)),
        c.database === "postgresql" ? fixed(p.postgresCpuMsPerPurchase, 1) : "–",
        fixed(p.cpuMsPerPurchaseTotal + (p.postgresCpuMsPerPurchase ?? 0), 1),
      ],
    ];
  });
  return markdown([...CONFIGURATION_HEADINGS, ...ROLES, "PostgreSQL server", "all"], rows);
}

/** Each step of the grid against the configuration one step below it: a second payment server, a second terminal host, PostgreSQL for SQLite. */
function stepsTable(r: ReplicasReport): string | undefined {
  const measured = r.cells.filter((c): c is Measured => c.outcome === "measured");
  const find = (ps: number, th: number, db: ReplicasCell["database"]) =>
    measured.find((c) => c.paymentServers === ps && c.terminalHosts === th && c.database === db);
  const all = (p: ReplicasRun) => p.cpuMsPerPurchaseTotal + (p.postgresCpuMsPerPurchase ?? 0);
  const rows: string[][] = [];
  for (const c of measured) {
    const steps: [string, Measured | undefined][] = [
      [`payment servers ${c.paymentServers - 1} → ${c.paymentServers}`, find(c.paymentServers - 1, c.terminalHosts, c.database)],
      [`terminal hosts ${c.terminalHosts - 1} → ${c.terminalHosts}`, find(c.paymentServers, c.terminalHosts - 1, c.database)],
      ...(c.database === "postgresql"
        ? ([["SQLite → PostgreSQL", find(c.paymentServers, c.terminalHosts, "sqlite")]] as [string, Measured | undefined][])
        : []),
    ];
    for (const [step, from] of steps) {
      if (!from) continue;
      rows.push([
        replicasLabel(c, r.psamsPerHost),
        step,
        ratio(c.run.perSecond, from.run.perSecond),
        ratio(c.run.p99Ms, from.run.p99Ms),
        ratio(all(c.run), all(from.run)),
        `${pct(from.run.machineCpuPercent)} → ${pct(c.run.machineCpuPercent)}`,
      ]);
    }
  }
  if (rows.length === 0) return undefined;
  return markdown(["configuration", "step", "purchases/s ×", "p99 ×", "CPU per purchase ×", "machine busy %"], rows);
}

function notes(r: ReplicasReport, cores: number): string {
  return [
    `- Closed loop: ${r.cardholders} cardholders in every configuration, each starting its next purchase when the last one ends (merchant CreateOrder not timed, then payOffer, timed), in ${r.mode}, TLS ${r.tls ? "on" : "off"}; ${r.psamsPerHost} PSAMs per terminal host, so a second host doubles the PSAMs; ${r.concentrators} concentrator${r.concentrators === 1 ? "" : "s"}. ${r.phases.warmupMs / 1000} s warm-up, then a ${r.phases.measureMs / 1000} s window; throughput and latency count the purchases that ended in the window.`,
    "- Each configuration on a fresh data folder, a fresh network and, on PostgreSQL, a fresh database. Payment servers beyond the first are replicas of one (one identity, one database); cardholders and the merchant reach them as one target, balanced round robin on their side. With SQLite every service keeps its own file; replicas cannot share one, hence n/a.",
    `- PostgreSQL: ${"version" in r.postgres ? `${r.postgres.version}, a throwaway cluster on this machine, durable (fsync and full-page writes on: what a durable commit costs is measured), one database, a schema per service` : "unavailable" in r.postgres ? `not measured: ${r.postgres.unavailable}` : "not asked for"}.`,
    "- CPU ms per purchase: each process's utime + stime (/proc/PID/stat) over the window ÷ the purchases that ended in it, summed per role; a role with several processes shows each one's in brackets. The PostgreSQL server's: its postmaster, every child running (backends, checkpointer, WAL writer, autovacuum) and those that ended in the window (the postmaster's cutime + cstime). \"other services\" is clearing, load, bank and client daemon (the last three idle). CPU per purchase does not depend on how many cores there are; purchases/s does.",
    `- Purchases/s the cores allow: ${cores} cores × 1,000 ms ÷ CPU ms per purchase (every process, PostgreSQL's included), the rate at which this machine's cores would be fully busy with purchases alone. Measured purchases/s near it: the cores are the limit, and more processes of a role on the same cores cannot help; far below it with the cores idle: the layout is (PSAMs, a process's own event loop, the database).`,
    `- Machine busy: every core's busy time over the window (/proc/stat), % of one core, out of ${cores * 100} on this machine: near ${cores * 100} the cores, not the design, are the limit. Every process of every configuration, the cardholders' and PostgreSQL's included, shares these cores. Other work on the machine: busy less those processes (other users of a shared machine); a run with much of it measures less throughput, and its CPU per purchase is the figure to compare.`,
  ].join("\n");
}

/** Failed configurations and purchases, service log findings and unrecorded purchases. */
export function replicasProblems(r: ReplicasReport): string[] {
  const lines: string[] = [];
  for (const c of r.cells) {
    const label = `replicas, ${replicasLabel(c, r.psamsPerHost)}`;
    if (c.outcome === "failed") lines.push(`- ${label}: not measured, ${c.message}`);
    if (c.outcome !== "measured") continue;
    for (const [message, n] of Object.entries(c.run.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    // A log line's first line tells the cause (its stack trace is in the log): each cause once.
    const causes = new Set(c.run.serviceLogs.samples.map((finding) => finding.split("\\n")[0]!.slice(0, 400)));
    for (const cause of causes) lines.push(`- ${label}, service log: ${cause}`);
    const u = c.run.unrecordedAfterLoad;
    if (u.left > 0)
      lines.push(`- ${label}: ${u.left} of ${u.atEnd} purchases still not in their PSAM's batch ${(u.waitedMs / 1000).toFixed(0)} s after the load`);
  }
  return lines;
}

export function renderReplicas(r: ReplicasReport, cores: number): string {
  const steps = stepsTable(r);
  return [
    "## Replicas: payment servers, terminal hosts, SQLite and PostgreSQL",
    "",
    `${r.cardholders} cardholders; ${r.psamsPerHost} PSAMs per terminal host (the PSAMs double with a second host); ${r.concentrators} concentrator${r.concentrators === 1 ? "" : "s"}; ${r.mode}, TLS ${r.tls ? "on" : "off"}; ${r.phases.warmupMs / 1000} s warm-up, ${r.phases.measureMs / 1000} s window, each configuration fresh.`,
    "",
    throughputTable(r, cores),
    "",
    "### CPU per purchase, per process (ms)",
    "",
    cpuTable(r),
    "",
    ...(steps
      ? [
          "### Each step of the grid",
          "",
          "Against the configuration one step below it (same other settings): ratios of purchases/s, p99 and CPU per purchase (PostgreSQL's included), and the machine's busy CPU before → after.",
          "",
          steps,
          "",
        ]
      : []),
    "### Notes",
    "",
    notes(r, cores),
    "",
  ].join("\n");
}
