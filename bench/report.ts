// The benchmark's report: markdown tables for people, JSON for tools and for
// comparing runs.

import { mkdir, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { formatMoney } from "../lib/money.js";
import { EUR } from "../services/network/layout.js";
import { ECHO_PROCESS, type EchoResult } from "./echo.js";
import { markdown, mib, ms, pct, rate } from "./format.js";
import type { Phases } from "./load.js";
import type { ModesReport } from "./modes.js";
import { modesProblems, renderModes } from "./modes-report.js";
import { SONG, type PurchaseResult } from "./purchases.js";
import { PROCESS } from "./network.js";

export interface Machine {
  cores: number;
  cpuModel: string;
  node: string;
  platform: string;
}

export interface Report {
  startedAt: string;
  /** The commit measured. */
  source: string;
  wallSeconds: number;
  machine: Machine;
  /** The stack part's warm-up and window (the modes part has its own). */
  phases: Phases;
  /** The stack part, empty when it was not run. */
  echo: EchoResult[];
  purchases: PurchaseResult[];
  /** The modes part, when it was run. */
  modes?: ModesReport;
}

function purchaseTable(r: Report): string {
  const echoAt = new Map(r.echo.map((e) => [e.concurrency, e]));
  const rows = r.purchases.map((p) => {
    const e = echoAt.get(p.cardholders);
    return [
      String(p.psams),
      String(p.cardholders),
      rate(p.perSecond),
      ms(p.p50Ms),
      ms(p.p99Ms),
      String(p.errors),
      mib(p.peakMemoryMiB[PROCESS.payment]),
      e ? rate(e.perSecond) : "n/a",
      e ? ms(e.p50Ms) : "n/a",
      e ? (p.perSecond / e.perSecond).toFixed(4) : "n/a",
      e ? (p.p50Ms / e.p50Ms).toFixed(1) : "n/a",
      String(p.serviceLogs.count),
    ];
  });
  return markdown(
    [
      "PSAMs",
      "cardholders",
      "purchases/s",
      "p50 ms",
      "p99 ms",
      "errors",
      "payment server VmHWM MiB",
      "echo calls/s",
      "echo p50 ms",
      "purchases/s ÷ echo calls/s",
      "p50 ÷ echo p50",
      "service log warnings",
    ],
    rows,
  );
}

const CPU_COLUMNS: [name: string, heading: string][] = [
  [PROCESS.payment, "payment"],
  [PROCESS.concentrator, "concentrator"],
  [PROCESS.terminal, "terminal host"],
  [PROCESS.merchant, "merchant"],
  [PROCESS.validation, "validation"],
  [PROCESS.clientDaemon, "client daemon"],
  [PROCESS.bench, "cardholders (bench)"],
];

function cpuTable(r: Report): string {
  const rows = r.purchases.map((p) => {
    const total = Object.values(p.cpuPercent).reduce((a, b) => a + b, 0);
    // % of a core over a second is 10 ms of CPU per second.
    const perPurchase = p.perSecond > 0 ? ((total * 10) / p.perSecond).toFixed(1) : "n/a";
    return [String(p.psams), String(p.cardholders), ...CPU_COLUMNS.map(([name]) => pct(p.cpuPercent[name])), pct(total), perPurchase];
  });
  return markdown(["PSAMs", "cardholders", ...CPU_COLUMNS.map(([, h]) => h), "total", "CPU ms per purchase"], rows);
}

function echoTable(r: Report): string {
  const rows = r.echo.map((e) => [
    String(e.concurrency),
    rate(e.perSecond),
    ms(e.p50Ms),
    ms(e.p99Ms),
    String(e.errors),
    pct(e.cpuPercent[ECHO_PROCESS]),
    pct(e.cpuPercent[PROCESS.bench]),
  ]);
  return markdown(["concurrent calls", "calls/s", "p50 ms", "p99 ms", "errors", "echo server CPU %", "client CPU %"], rows);
}

function notes(r: Report): string {
  const payload = r.echo[0]?.payloadBytes;
  return [
    `- Closed loop: each cardholder starts its next purchase as soon as the last one ends; ${r.phases.warmupMs / 1000} s warm-up, then a ${r.phases.measureMs / 1000} s window. Throughput counts the purchases that ended inside the window; latency is theirs.`,
    `- One purchase = the merchant's CreateOrder (not timed), then payOffer (timed): the card's APDUs in this process, ProcessDrawRequest and CompletePurchase to the payment server, and CompleteOrder to the merchant. Song "${SONG.productId}" at ${formatMoney({ amountMinor: SONG.priceMinor, currency: EUR, exponent: 2 })}, mode PSAM_VERIFIES.`,
    "- Messages per purchase: 4 unary RPCs from the cardholder (CreateOrder, ProcessDrawRequest, CompletePurchase, CompleteOrder), 1 merchant→validation RPC (ValidateConfirmation), and about 9 stream messages (2 PSAM jobs, each payment→concentrator→terminal host and back, plus the lease release); 3 + 1 RPCs and the 9 stream messages fall inside the timed part.",
    `- Echo: unary raw bytes${payload ? ` (${payload} bytes, the size of an encoded draw request)` : ""} to a server process on the project's gRPC bootstrap, through openChannel and clientFactory. Ratios compare at equal concurrency.`,
    "- All cardholders share one channel (one HTTP/2 connection) per service, as on one client host; so do the echo callers.",
    "- VmHWM is the payment server's peak resident memory since its start; each configuration starts a fresh network.",
    "- Service log warnings: warn/error lines (and any stray output) in the services' logs, shutdown included; 0 is expected.",
  ].join("\n");
}

/** Every failure and every service log finding, by configuration. */
function problems(r: Report): string[] {
  const lines: string[] = [];
  for (const e of r.echo) {
    for (const [message, n] of Object.entries(e.errorMessages)) lines.push(`- echo, ${e.concurrency} concurrent: ${n} × ${message}`);
  }
  for (const p of r.purchases) {
    const label = `${p.psams} PSAMs, ${p.cardholders} cardholders`;
    for (const [message, n] of Object.entries(p.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    for (const finding of p.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
  }
  return lines;
}

function stackSections(r: Report): string[] {
  return [
    "## Purchases",
    "",
    purchaseTable(r),
    "",
    "## CPU during the measuring window (% of one core)",
    "",
    cpuTable(r),
    "",
    "## Echo baseline",
    "",
    echoTable(r),
    "",
    "## Notes",
    "",
    notes(r),
    "",
  ];
}

export function renderReport(r: Report): string {
  const found = [...problems(r), ...(r.modes ? modesProblems(r.modes) : [])];
  const m = r.machine;
  return [
    ...(r.purchases.length || r.echo.length ? stackSections(r) : []),
    ...(r.modes ? [renderModes(r.modes)] : []),
    ...(found.length ? ["## Errors and findings", "", ...found, ""] : []),
    `Machine: ${m.cores} cores (${m.cpuModel}), Node ${m.node}, ${m.platform}; every process shares these cores. Total wall time: ${r.wallSeconds.toFixed(0)} s`,
    "",
  ].join("\n");
}

export async function writeJson(path: string, r: Report): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, JSON.stringify(r, null, 2) + "\n");
}
