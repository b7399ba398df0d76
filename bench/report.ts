// The benchmark's report: markdown tables for people, JSON for tools and for
// comparing runs.

import { mkdir, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { formatMoney } from "../lib/money.js";
import { EUR } from "../services/network/layout.js";
import { ECHO_PROCESS, type EchoResult } from "./echo.js";
import { markdown, mib, ms, pct, rate } from "./format.js";
import type { Phases } from "./load.js";
import type { ClearingReport } from "./clearing.js";
import { clearingProblems, renderClearing } from "./clearing-report.js";
import type { HardwareReport } from "./hardware.js";
import { hardwareProblems, renderHardware } from "./hardware-report.js";
import type { ModesReport } from "./modes.js";
import { modesProblems, renderModes } from "./modes-report.js";
import { SONG, type PurchaseResult } from "./purchases.js";
import { PROCESS } from "./network.js";
import { cpuMsPerOperation } from "./proc.js";
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
  /** The stack part, empty when it was not run; TLS on and off, as --tls asked. */
  echo: EchoResult[];
  purchases: PurchaseResult[];
  /** Each configuration and echo concurrency measured both ways: TLS on, off, on ÷ off. */
  tlsCosts: TlsCost[];
  /** Their median and range, when any configuration was measured both ways. */
  tlsSummary?: TlsSummary;
  echoTlsCosts: EchoTlsCost[];
  /** The modes part, when it was run. */
  modes?: ModesReport;
  /** The hardware part, when it was run. */
  hardware?: HardwareReport;
  /** The clearing part, when it was run. */
  clearing?: ClearingReport;
}

const onOff = (tls: boolean) => (tls ? "on" : "off");

function purchaseTable(r: Report): string {
  const rows = r.purchases.map((p) => {
    // The echo under the same transport.
    const e = r.echo.find((e) => e.concurrency === p.cardholders && e.tls === p.tls);
    return [
      String(p.psams),
      String(p.cardholders),
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

function cpuTable(r: Report): string {
  const rows = r.purchases.map((p) => {
    const total = Object.values(p.cpuPercent).reduce((a, b) => a + b, 0);
    const perPurchase = cpuMsPerOperation(p.cpuPercent, p.perSecond);
    return [
      String(p.psams),
      String(p.cardholders),
      onOff(p.tls),
      ...CPU_COLUMNS.map(([name]) => pct(p.cpuPercent[name])),
      pct(total),
      Number.isFinite(perPurchase) ? perPurchase.toFixed(1) : "n/a",
      pct(p.machineCpuPercent),
      p.machineCpuPercent === undefined ? "n/a" : pct(Math.max(0, p.machineCpuPercent - total)),
    ];
  });
  return markdown(
    ["PSAMs", "cardholders", "TLS", ...CPU_COLUMNS.map(([, h]) => h), "total", "CPU ms per purchase", "whole machine", "other work on the machine"],
    rows,
  );
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
    `- Closed loop: each cardholder starts its next purchase as soon as the last one ends; ${r.phases.warmupMs / 1000} s warm-up, then a ${r.phases.measureMs / 1000} s window. Throughput counts the purchases that ended inside the window; latency is theirs.`,
    `- One purchase = the merchant's CreateOrder (not timed), then payOffer (timed): the card's APDUs in this process, ProcessDrawRequest and CompletePurchase to the payment server, and CompleteOrder to the merchant. Song "${SONG.productId}" at ${formatMoney({ amountMinor: SONG.priceMinor, currency: EUR, exponent: 2 })}, mode PSAM_VERIFIES.`,
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
    const label = `${p.psams} PSAMs, ${p.cardholders} cardholders, TLS ${onOff(p.tls)}`;
    for (const [message, n] of Object.entries(p.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    for (const finding of p.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
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
    purchaseTable(r),
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
  ];
  const m = r.machine;
  return [
    ...(r.purchases.length || r.echo.length ? stackSections(r) : []),
    ...(r.modes ? [renderModes(r.modes)] : []),
    ...(r.hardware ? [renderHardware(r.hardware)] : []),
    ...(r.clearing ? [renderClearing(r.clearing)] : []),
    ...(found.length ? ["## Errors and findings", "", ...found, ""] : []),
    `Machine: ${m.cores} cores (${m.cpuModel}), Node ${m.node}, ${m.platform}; every process shares these cores. Total wall time: ${r.wallSeconds.toFixed(0)} s`,
    "",
  ].join("\n");
}

export async function writeJson(path: string, r: Report): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  await writeFile(path, JSON.stringify(r, null, 2) + "\n");
}
