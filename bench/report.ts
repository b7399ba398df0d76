// The benchmark's report: markdown tables for people, JSON for tools and for
// comparing runs.

import { mkdir, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { formatMoney } from "../lib/money.js";
import { EUR } from "../services/network/layout.js";
import { ECHO_PROCESS, type EchoResult } from "./echo.js";
import { markdown, mib, ms, pct, rate, ratio } from "./format.js";
import type { Phases } from "./load.js";
import type { ClearingReport } from "./clearing.js";
import { clearingProblems, renderClearing } from "./clearing-report.js";
import type { HardwareReport } from "./hardware.js";
import { hardwareProblems, renderHardware } from "./hardware-report.js";
import type { ModesReport } from "./modes.js";
import { modesProblems, renderModes } from "./modes-report.js";
import type { ReplicasReport } from "./replicas.js";
import { renderReplicas, replicasProblems } from "./replicas-report.js";
import { configurationLabel, SONG, type PurchaseResult } from "./purchases.js";
import { PROCESS } from "./network.js";
import { cpuMsPerOperation } from "./proc.js";
import { renderProfileSummary } from "./profile-summary.js";
import type { SkeletonResult } from "./skeleton/skeleton.js";
import type { SkeletonMode } from "./skeleton/wire.js";
import type { SoakResult } from "./soak.js";
import { EARLY_RELEASE_MODES, LOADED_FROM_CARDHOLDERS, renderTargets, type TargetRow } from "./targets.js";
import {
  describeLinks,
  renderConnections,
  renderEchoTlsCosts,
  renderTlsCosts,
  renderTlsSummary,
  type EchoTlsCost,
  type TlsCost,
  type TlsSummary,
} from "./tls-report.js";

export interface Machine {
  cores: number;
  cpuModel: string;
  node: string;
  platform: string;
}

/** A protocol-skeleton run that could not be made (its processes did not start, or it broke off). */
export interface SkeletonFailure {
  psams: number;
  cardholders: number;
  mode: SkeletonMode;
  tls: boolean;
  message: string;
}

export interface Report {
  startedAt: string;
  /** The commit measured (at the start of the run). */
  source: string;
  /** The commit at the end of the run, when it changed meanwhile. */
  sourceAtEnd?: string;
  wallSeconds: number;
  machine: Machine;
  /** The stack part's warm-up and window (the modes part has its own). */
  phases: Phases;
  /** The echo baseline's: a shorter warm-up. */
  echoPhases: Phases;
  /** The stack part, empty when it was not run; TLS on and off, as --tls asked. */
  echo: EchoResult[];
  purchases: PurchaseResult[];
  /** The protocol skeleton (bench/skeleton/), one run after each configuration whose mode it has; empty with --skeleton off. */
  skeleton: SkeletonResult[];
  skeletonFailures: SkeletonFailure[];
  /** Each configuration and echo concurrency measured both ways: TLS on, off, on ÷ off. */
  tlsCosts: TlsCost[];
  /** Their median and range, when any configuration was measured both ways. */
  tlsSummary?: TlsSummary;
  echoTlsCosts: EchoTlsCost[];
  /** The payment server's memory over a long run (--soak-minutes), when it was run. */
  soak?: SoakResult;
  /** Issue #13's targets from the stack part's rows; empty without the stack part. */
  targets: TargetRow[];
  /** Where the CPU profiles are (--profile). */
  profileDir?: string;
  /** The modes part, when it was run. */
  modes?: ModesReport;
  /** The hardware part, when it was run. */
  hardware?: HardwareReport;
  /** The clearing part, when it was run. */
  clearing?: ClearingReport;
  /** The replicas part (--suite replicas), when it was run. */
  replicas?: ReplicasReport;
}

const onOff = (tls: boolean) => (tls ? "on" : "off");

function purchaseTable(r: Report): string {
  const rows = r.purchases.map((p) => {
    // The echo under the same transport.
    const e = r.echo.find((e) => e.concurrency === p.cardholders && e.tls === p.tls);
    return [
      String(p.psams),
      String(p.cardholders),
      p.mode,
      onOff(p.tls),
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
      "mode",
      "TLS",
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

/** A process's figure in a per-process record; the merchant's name holds its shop's id, which the mode decides. */
function ofProcess(record: Record<string, number>, name: string): number | undefined {
  if (name !== PROCESS.merchant) return record[name];
  const merchant = Object.keys(record).find((n) => n.startsWith("merchant-") && n !== PROCESS.validation);
  return merchant === undefined ? undefined : record[merchant];
}

const CPU_COLUMNS: [name: string, heading: string][] = [
  [PROCESS.payment, "payment"],
  [PROCESS.concentrator, "concentrator"],
  [PROCESS.terminal, "terminal host"],
  [PROCESS.merchant, "merchant"],
  [PROCESS.validation, "validation"],
  [PROCESS.clientDaemon, "client daemon"],
  [PROCESS.load, "load"],
  [PROCESS.bank, "bank"],
  [PROCESS.clearing, "clearing"],
  [PROCESS.bench, "cardholders (bench)"],
];

const configurationCells = (p: PurchaseResult) => [String(p.psams), String(p.cardholders), p.mode, onOff(p.tls)];
const CONFIGURATION_HEADINGS = ["PSAMs", "cardholders", "mode", "TLS"];

/** The skeleton's processes, named as the stack's: its per-process figures line up with the stack's columns. */
const SKELETON_COLUMNS: [name: string, heading: string][] = [
  [PROCESS.payment, "payment"],
  [PROCESS.concentrator, "concentrator"],
  [PROCESS.terminal, "terminal host"],
  [PROCESS.merchant, "merchant"],
  [PROCESS.validation, "validation"],
  [PROCESS.bench, "cardholders (bench)"],
];

const sumOf = (record: Record<string, number>) => Object.values(record).reduce((a, b) => a + b, 0);

/** The skeleton run of a configuration: the same PSAMs, cardholders, mode and transport. */
const skeletonOf = (r: Report, p: PurchaseResult) =>
  r.skeleton.find((s) => s.psams === p.psams && s.cardholders === p.cardholders && s.mode === p.mode && s.tls === p.tls);

function skeletonTable(r: Report): string {
  const cell = (v: number | undefined, digits: number) => (v === undefined || !Number.isFinite(v) ? "n/a" : v.toFixed(digits));
  const rows = r.skeleton.map((s) => {
    const cpuPercent = sumOf(s.cpuPercent);
    return [
      String(s.psams),
      String(s.cardholders),
      s.mode,
      onOff(s.tls),
      rate(s.perSecond),
      ms(s.p50Ms),
      ms(s.p99Ms),
      String(s.errors),
      cell(cpuMsPerOperation(s.cpuPercent, s.perSecond), 1),
      ...SKELETON_COLUMNS.map(([name]) => cell(ofProcess(s.cpuMsPerPurchase, name), 2)),
      cell(sumOf(s.fsyncsPerPurchase), 2),
      s.machineCpuPercent === undefined ? "n/a" : pct(Math.max(0, s.machineCpuPercent - cpuPercent)),
    ];
  });
  return markdown(
    [
      ...CONFIGURATION_HEADINGS,
      "purchases/s",
      "p50 ms",
      "p99 ms",
      "errors",
      "CPU ms per purchase, all processes",
      ...SKELETON_COLUMNS.map(([, h]) => `${h} CPU ms`),
      "durable syncs per purchase",
      "other work on the machine %",
    ],
    rows,
  );
}

/** Each configuration against its skeleton: how close a purchase comes to what the architecture costs here. */
function againstSkeletonTable(r: Report): string {
  const rows = r.purchases.flatMap((p) => {
    const s = skeletonOf(r, p);
    if (!s) return [];
    const skeletonCpu = cpuMsPerOperation(s.cpuPercent, s.perSecond);
    return [
      [
        ...configurationCells(p),
        rate(p.perSecond),
        rate(s.perSecond),
        ratio(p.perSecond, s.perSecond),
        ms(p.p50Ms),
        ms(s.p50Ms),
        ratio(p.p50Ms, s.p50Ms),
        ms(p.cpuMsPerPurchaseTotal),
        ms(skeletonCpu),
        ratio(p.cpuMsPerPurchaseTotal, skeletonCpu),
      ],
    ];
  });
  return markdown(
    [
      ...CONFIGURATION_HEADINGS,
      "purchases/s",
      "skeleton purchases/s",
      "purchases/s ÷ skeleton purchases/s",
      "p50 ms",
      "skeleton p50 ms",
      "p50 ÷ skeleton p50",
      "CPU ms per purchase",
      "skeleton CPU ms per purchase",
      "CPU ÷ skeleton CPU",
    ],
    rows,
  );
}

function cpuTable(r: Report): string {
  const rows = r.purchases.map((p) => {
    const total = Object.values(p.cpuPercent).reduce((a, b) => a + b, 0);
    const perPurchase = cpuMsPerOperation(p.cpuPercent, p.perSecond);
    return [
      ...configurationCells(p),
      ...CPU_COLUMNS.map(([name]) => pct(ofProcess(p.cpuPercent, name))),
      pct(total),
      Number.isFinite(perPurchase) ? perPurchase.toFixed(1) : "n/a",
      pct(p.machineCpuPercent),
      p.machineCpuPercent === undefined ? "n/a" : pct(Math.max(0, p.machineCpuPercent - total)),
    ];
  });
  return markdown(
    [...CONFIGURATION_HEADINGS, ...CPU_COLUMNS.map(([, h]) => h), "total", "CPU ms per purchase", "whole machine", "other work on the machine"],
    rows,
  );
}

/** A figure per process and their sum, per configuration. */
function perProcessTable(r: Report, figure: (p: PurchaseResult) => Record<string, number>, total: (p: PurchaseResult) => number, digits: number): string {
  const cell = (v: number | undefined) => (v === undefined || !Number.isFinite(v) ? "n/a" : v.toFixed(digits));
  const rows = r.purchases.map((p) => [...configurationCells(p), ...CPU_COLUMNS.map(([name]) => cell(ofProcess(figure(p), name))), cell(total(p))]);
  return markdown([...CONFIGURATION_HEADINGS, ...CPU_COLUMNS.map(([, h]) => h), "all processes"], rows);
}

/** PSAM holds, the two busiest event loops, and the payment server's memory per purchase in flight. */
function holdsLoopsMemoryTable(r: Report): string {
  const loop = (p: PurchaseResult, name: string) => p.eventLoopDelayMs[name];
  const rows = r.purchases.map((p) => [
    ...configurationCells(p),
    p.psamHold ? String(p.psamHold.samples) : "n/a",
    ms(p.psamHold?.p50Ms ?? NaN),
    ms(p.psamHold?.p99Ms ?? NaN),
    ms(loop(p, PROCESS.payment)?.p99 ?? NaN),
    ms(loop(p, PROCESS.payment)?.max ?? NaN),
    ms(loop(p, PROCESS.terminal)?.p99 ?? NaN),
    ms(loop(p, PROCESS.terminal)?.max ?? NaN),
    mib(p.paymentMemory?.idleRssMiB),
    mib(p.paymentMemory?.rssAtEndMiB),
    p.paymentMemory ? p.paymentMemory.kibPerInFlightPurchase.toFixed(0) : "n/a",
  ]);
  return markdown(
    [
      ...CONFIGURATION_HEADINGS,
      "PSAM holds in the window",
      "PSAM hold p50 ms",
      "PSAM hold p99 ms",
      "payment server event-loop delay p99 ms",
      "max ms",
      "terminal host event-loop delay p99 ms",
      "max ms",
      "payment server RSS idle MiB",
      "RSS at window end MiB",
      "KiB per purchase in flight",
    ],
    rows,
  );
}

function soakSection(soak: SoakResult): string[] {
  const rows = soak.samples.map((s) => [(s.atSeconds / 60).toFixed(1), String(s.purchases), mib(s.rssMiB), mib(s.peakMiB)]);
  const growth = soak.peakGrowth === undefined ? "" : ` Peak at the end ÷ peak at one minute: ${soak.peakGrowth.toFixed(3)}.`;
  return [
    `## Payment server memory over ${soak.minutes} minutes`,
    "",
    `${configurationLabel(soak)}, on a fresh network, load from the first second (no warm-up): ${rate(soak.perSecond)} purchases/s, p50 ${ms(soak.p50Ms)} ms, ${soak.errors} errors.${growth}`,
    "",
    markdown(["minutes since the load began", "purchases so far", "payment server RSS MiB", "payment server VmHWM MiB"], rows),
    "",
  ];
}

/** The processes busy for at least this share of the window get their top functions listed. */
const PROFILED_MIN_BUSY = 0.02;

function profileSection(r: Report): string[] {
  const out = ["## Where the time goes (CPU profiles, self time over the measuring window)", ""];
  out.push(
    `Profiles in ${r.profileDir}/<configuration>/<process>.cpuprofile (Chrome DevTools, Performance, opens them); \`node --import tsx bench/profile-summary.ts FILE\` prints this summary for any of them. Self time: the samples (1 ms apart) with the function on top of the stack, summed by function and line; (program) is V8 and Node's native work outside JavaScript, (garbage collector) is collection. Profiling slows every process: the figures above come from the profiled run and read higher than without --profile.`,
    "",
  );
  for (const p of r.purchases) {
    if (!p.profiles) continue;
    const windowMs = r.phases.measureMs;
    const busy = p.profiles.processes.filter((q) => q.summary.busyMs >= PROFILED_MIN_BUSY * windowMs);
    const quiet = p.profiles.processes.filter((q) => !busy.includes(q));
    out.push(`### ${configurationLabel(p)}`, "");
    for (const q of busy) out.push(renderProfileSummary(q.process, q.summary), "");
    if (quiet.length)
      out.push(
        `Busy under ${100 * PROFILED_MIN_BUSY} % of a core in the window, not listed: ${quiet.map((q) => `${q.process} (${q.summary.busyMs.toFixed(0)} ms)`).join(", ")}.`,
        "",
      );
    if (p.profiles.missing.length) out.push(`No profile (the process did not exit cleanly): ${p.profiles.missing.join(", ")}.`, "");
  }
  return out;
}

function echoTable(r: Report): string {
  const rows = r.echo.map((e) => {
    const perCall = cpuMsPerOperation(e.cpuPercent, e.perSecond);
    return [
      String(e.concurrency),
      onOff(e.tls),
      rate(e.perSecond),
      ms(e.p50Ms),
      ms(e.p99Ms),
      String(e.errors),
      pct(e.cpuPercent[ECHO_PROCESS]),
      pct(e.cpuPercent[PROCESS.bench]),
      Number.isFinite(perCall) ? perCall.toFixed(3) : "n/a",
      e.machineCpuPercent === undefined ? "n/a" : pct(Math.max(0, e.machineCpuPercent - Object.values(e.cpuPercent).reduce((a, b) => a + b, 0))),
    ];
  });
  return markdown(
    ["concurrent calls", "TLS", "calls/s", "p50 ms", "p99 ms", "errors", "echo server CPU %", "client CPU %", "CPU ms per call", "other work on the machine %"],
    rows,
  );
}

function notes(r: Report): string {
  const payload = r.echo[0]?.payloadBytes;
  return [
    `- Closed loop: each cardholder starts its next purchase as soon as the last one ends; ${r.phases.warmupMs / 1000} s warm-up (by default long enough for CPU per purchase to settle: bench/README.md; the echo's ${r.echoPhases.warmupMs / 1000} s), then a ${r.phases.measureMs / 1000} s window. Throughput counts the purchases that ended inside the window; latency is theirs.`,
    `- One purchase = the merchant's CreateOrder (not timed), then payOffer (timed): the card's APDUs in this process, the calls to the payment server (ProcessDrawRequest, and CompletePurchase in PSAM_VERIFIES and SERVER_COMPARES), and CompleteOrder to the merchant. Song "${SONG.productId}" at ${formatMoney({ amountMinor: SONG.priceMinor, currency: EUR, exponent: 2 })}, in the row's mode (its demo shop).`,
    "- CPU ms per purchase, per process: its utime + stime (/proc/PID/stat) over the window ÷ the purchases that ended in it; \"cardholders (bench)\" is this process, where every cardholder's software card runs. Durable syncs: each process's own count of the fsyncs it asked for (lib/stats.ts: what countFsync is told), its difference over the window ÷ the same purchases.",
    "- PSAM hold: from the payment server's own psam_released events in payment.db, the leases that ended inside the window. Event-loop delay: how late each process's monitorEventLoopDelay timer (10 ms resolution: about 1,000 samples in a 10 s window) ran, over the window. Payment server memory per purchase in flight: (its RSS when the window closed − its RSS before the load, the network idle and the cardholders' channels open) ÷ cardholders: what a concurrent purchase costs the server, heap growth and buffers included.",
    "- Protocol skeleton (bench/skeleton/, bench/README.md): the same processes making a purchase's calls and stream messages, of the real sizes, and only the durable appends recovery depends on, with no cryptography, database or protocol logic; run right after each configuration in PSAM_VERIFIES or SERVER_COMPARES, on a fresh network of its own with the same PSAMs, cardholders, TLS, warm-up and window (--skeleton off skips it). Its durable syncs per purchase are counted over its whole run, warm-up included; its services are asked for them only after the load, so their event-loop monitors do not run during its window.",
    "- Messages per purchase: 4 unary RPCs from the cardholder (CreateOrder, ProcessDrawRequest, CompletePurchase, CompleteOrder), 1 merchant→validation RPC (ValidateConfirmation), and about 9 stream messages (2 PSAM jobs, each payment→concentrator→terminal host and back, plus the lease release); 3 + 1 RPCs and the 9 stream messages fall inside the timed part.",
    `- Echo: unary raw bytes${payload ? ` (${payload} bytes, the size of an encoded draw request)` : ""} to a server process on the project's gRPC bootstrap, through openChannel and clientFactory. Ratios compare at equal concurrency and under the same transport (TLS on with TLS on, off with off).`,
    "- TLS on: every link TLS as installed, mutual inside the operator's network, server TLS (the CA bundle only) for the cardholders; TLS off: every service --insecure. The echo with TLS on serves a certificate from a throwaway CA, asks for client certificates as the services do, and its client checks the server's certificate as a cardholder does. Each configuration runs TLS on, then TLS off, each on a fresh network.",
    "- All cardholders share one channel (one HTTP/2 connection) per service, as on one client host; so do the echo callers. Every channel is opened once per run and lives through it: TLS handshakes are amortised, and the connections table counts those opened inside the measuring window.",
    "- Whole machine: every core's busy time during the window (/proc/stat), % of one core; other work on the machine is that minus the benchmark's processes. These machines are shared: a run beside other work measures less throughput, and its CPU per purchase is the figure to compare.",
    "- VmHWM is the payment server's peak resident memory since its start; each configuration starts a fresh network.",
    "- Service log warnings: warn/error lines (and any stray output) in the services' logs, shutdown included; 0 is expected. With TLS off, each server's one INSECURE warning at start is expected and not counted.",
  ].join("\n");
}

/** Every failure and every service log finding, by configuration. */
function problems(r: Report): string[] {
  const lines: string[] = [];
  for (const e of r.echo) {
    for (const [message, n] of Object.entries(e.errorMessages)) lines.push(`- echo, ${e.concurrency} concurrent, TLS ${onOff(e.tls)}: ${n} × ${message}`);
  }
  for (const p of r.purchases) {
    const label = configurationLabel(p);
    for (const [message, n] of Object.entries(p.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    for (const finding of p.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
    const u = p.unrecordedAfterLoad;
    if (u.left > 0)
      lines.push(
        `- ${label}: ${u.left} of ${u.atEnd} purchases answered but not yet in their PSAM's batch when the load ended were still not after ${(u.waitedMs / 1000).toFixed(0)} s`,
      );
    if (p.statsUnanswered) lines.push(`- ${label}: no figures (fsyncs, event loop, memory) from ${p.statsUnanswered.join(", ")}`);
  }
  for (const s of r.skeleton) {
    const label = `protocol skeleton, ${configurationLabel(s)}`;
    for (const [message, n] of Object.entries(s.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    for (const finding of s.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
  }
  for (const f of r.skeletonFailures) lines.push(`- protocol skeleton, ${configurationLabel(f)}: not measured, ${f.message}`);
  if (r.soak) {
    const label = `soak, ${configurationLabel(r.soak)}`;
    for (const [message, n] of Object.entries(r.soak.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    for (const finding of r.soak.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
  }
  return lines;
}

function tlsSections(r: Report): string[] {
  const links = describeLinks(r.purchases);
  return [
    ...(r.tlsCosts.length
      ? [
          "## TLS on ÷ off",
          "",
          "CPU summed over every process of the network and the cardholders'.",
          "",
          renderTlsCosts(r.tlsCosts),
          "",
          ...(r.tlsSummary ? [renderTlsSummary(r.tlsSummary), ""] : []),
        ]
      : []),
    ...(r.echoTlsCosts.length ? ["## Echo, TLS on ÷ off", "", renderEchoTlsCosts(r.echoTlsCosts), ""] : []),
    ...(r.purchases.some((p) => p.connections)
      ? [
          "## Connections between the processes",
          "",
          renderConnections(r.purchases),
          "",
          ...(links ? [`Links (client → server, connections) of the first run: ${links}.`, ""] : []),
        ]
      : []),
  ];
}

function stackSections(r: Report): string[] {
  return [
    "## Purchases",
    "",
    `Warm-up ${r.phases.warmupMs / 1000} s (the echo's ${r.echoPhases.warmupMs / 1000} s), then a ${r.phases.measureMs / 1000} s window, per configuration.`,
    "",
    purchaseTable(r),
    "",
    ...(r.skeleton.length
      ? [
          "## Protocol skeleton",
          "",
          'The same processes making a purchase\'s calls, stream messages and durable appends, and nothing else, right after each configuration (bench/README.md, "The protocol skeleton"). CPU per purchase over the window; durable syncs per purchase over the whole run.',
          "",
          skeletonTable(r),
          "",
          "## Purchases ÷ protocol skeleton",
          "",
          againstSkeletonTable(r),
          "",
        ]
      : []),
    "## CPU per purchase, per process (ms)",
    "",
    perProcessTable(
      r,
      (p) => p.cpuMsPerPurchase,
      (p) => p.cpuMsPerPurchaseTotal,
      1,
    ),
    "",
    "## Durable syncs per purchase, per process",
    "",
    perProcessTable(
      r,
      (p) => p.fsyncsPerPurchase,
      (p) => p.fsyncsPerPurchaseTotal,
      2,
    ),
    "",
    "## PSAM holds, event loops, payment server memory",
    "",
    holdsLoopsMemoryTable(r),
    "",
    ...tlsSections(r),
    "## CPU during the measuring window (% of one core)",
    "",
    cpuTable(r),
    "",
    "## Echo baseline",
    "",
    echoTable(r),
    "",
    ...(r.soak ? soakSection(r.soak) : []),
    "## Targets (issue #13)",
    "",
    `From this run's TLS-on rows. Under load: ${LOADED_FROM_CARDHOLDERS} or more cardholders. Early-release modes: ${EARLY_RELEASE_MODES.join(", ")}. Where several rows measure a target, the worst decides.`,
    "",
    renderTargets(r.targets),
    "",
    ...(r.purchases.some((p) => p.profiles) ? profileSection(r) : []),
    "## Notes",
    "",
    notes(r),
    "",
  ];
}

export function renderReport(r: Report): string {
  const found = [
    ...problems(r),
    ...(r.modes ? modesProblems(r.modes) : []),
    ...(r.hardware ? hardwareProblems(r.hardware) : []),
    ...(r.clearing ? clearingProblems(r.clearing) : []),
    ...(r.replicas ? replicasProblems(r.replicas) : []),
  ];
  const m = r.machine;
  return [
    ...(r.purchases.length || r.echo.length ? stackSections(r) : []),
    ...(r.modes ? [renderModes(r.modes)] : []),
    ...(r.hardware ? [renderHardware(r.hardware)] : []),
    ...(r.clearing ? [renderClearing(r.clearing)] : []),
    ...(r.replicas ? [renderReplicas(r.replicas, m.cores)] : []),
    ...(found.length ? ["## Errors and findings", "", ...found, ""] : []),
    `Machine: ${m.cores} cores (${m.cpuModel}), Node ${m.node}, ${m.platform}; every process shares these cores. Total wall time: ${r.wallSeconds.toFixed(0)} s`,
    "",
  ].join("\n");
}

export async function writeJson(path: string, r: Report): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, JSON.stringify(r, null, 2) + "\n");
}
