// The targets of issue #13, computed from one run's rows: each target, the
// figure this run measured for it, where, and whether it is met. Only TLS-on
// rows count (the issue measures the network as installed).

import type { EchoResult } from "./echo.js";
import { markdown } from "./format.js";
import { PROCESS } from "./network.js";
import type { PurchaseResult } from "./purchases.js";
import type { SkeletonResult } from "./skeleton/skeleton.js";
import type { SoakResult } from "./soak.js";

/** The confirmation modes that release the PSAM before the cardholder's second round trip. */
export const EARLY_RELEASE_MODES = ["SERVER_COMPARES", "CLIENT_COMPARES", "MERCHANT_COMPARES"];

/** A configuration counts as under load from this many concurrent cardholders. */
export const LOADED_FROM_CARDHOLDERS = 8;

/** The protocol skeleton's figures at one configuration (bench/skeleton/ measureSkeleton), when the run measured it. */
export type TargetSkeleton = Pick<SkeletonResult, "psams" | "cardholders" | "mode" | "tls" | "perSecond" | "p50Ms">;

export interface TargetRow {
  target: string;
  /** The goal as the issue states it, e.g. "≤ 12". */
  goal: string;
  /** The figure that decides, NaN when not measured. */
  value: number;
  /** Where it was measured, or why it was not. */
  at: string;
  /** undefined: not measured in this run, or a figure shown for information (no goal). */
  met: boolean | undefined;
  /** A figure with no goal, shown beside the targets because it says what a target can reach. */
  information?: true;
}

/** The rows of a run the targets read. */
export type TargetPurchase = Pick<
  PurchaseResult,
  "psams" | "cardholders" | "mode" | "tls" | "perSecond" | "p50Ms" | "cpuMsPerPurchaseTotal" | "psamHold" | "eventLoopDelayMs"
>;

export interface TargetInputs {
  purchases: TargetPurchase[];
  echo: Pick<EchoResult, "concurrency" | "tls" | "perSecond" | "p50Ms">[];
  soak?: Pick<SoakResult, "minutes" | "atOneMinute" | "atEnd" | "peakGrowth">;
}

const at = (p: TargetPurchase) => `${p.psams} × ${p.cardholders}, ${p.mode}`;

/** The row whose figure is worst (largest when `worst` is "max"), NaN figures ignored. */
function worstOf<T>(rows: T[], figure: (r: T) => number, worst: "max" | "min"): { row: T; value: number } | undefined {
  let found: { row: T; value: number } | undefined;
  for (const row of rows) {
    const value = figure(row);
    if (!Number.isFinite(value)) continue;
    if (!found || (worst === "max" ? value > found.value : value < found.value)) found = { row, value };
  }
  return found;
}

/** A target decided by the worst of `rows`; `none` says why when no row has the figure. */
function judged<T extends TargetPurchase>(
  target: string,
  goal: { text: string; max?: number; min?: number },
  rows: T[],
  figure: (r: T) => number,
  none: string,
): TargetRow {
  const w = worstOf(rows, figure, goal.max !== undefined ? "max" : "min");
  if (!w) return { target, goal: goal.text, value: NaN, at: none, met: undefined };
  const others = rows.length > 1 ? ` (worst of ${rows.length})` : "";
  const met = goal.max !== undefined ? w.value <= goal.max : w.value >= goal.min!;
  return { target, goal: goal.text, value: w.value, at: `${at(w.row)}${others}`, met };
}

/**
 * Every target of issue #13 from this run. `skeleton`: the protocol
 * skeleton's results, when the run measured it (its rows are "not measured"
 * without).
 */
export function issueTargets(r: TargetInputs, skeleton?: TargetSkeleton[]): TargetRow[] {
  const on = r.purchases.filter((p) => p.tls);
  const loaded = on.filter((p) => p.cardholders >= LOADED_FROM_CARDHOLDERS);
  const earlyRelease = on.filter((p) => EARLY_RELEASE_MODES.includes(p.mode));
  const echoAt = (concurrency: number) => r.echo.find((e) => e.tls && e.concurrency === concurrency);
  const perEcho = (p: TargetPurchase) => p.perSecond / (echoAt(p.cardholders)?.perSecond ?? NaN);
  // The skeleton of the same configuration: PSAMs, cardholders, mode and transport.
  const skeletonAt = (p: TargetPurchase) =>
    skeleton?.find((s) => s.tls === p.tls && s.psams === p.psams && s.cardholders === p.cardholders && s.mode === p.mode);
  const perSkeleton = (p: TargetPurchase) => p.perSecond / (skeletonAt(p)?.perSecond ?? NaN);
  const withSkeleton = (psams: number, cardholders: number) => on.filter((p) => p.psams === psams && p.cardholders === cardholders && skeletonAt(p));
  const noSkeleton = (psams: number, cardholders: number) =>
    skeleton ? `${psams} × ${cardholders} with TLS on and its skeleton not in this run` : "the protocol skeleton was not run (--skeleton off)";
  return [
    judged(
      "CPU per purchase, summed over every process (ms), under load",
      { text: "≤ 12", max: 12 },
      loaded,
      (p) => p.cpuMsPerPurchaseTotal,
      `no TLS-on configuration with ${LOADED_FROM_CARDHOLDERS} or more cardholders`,
    ),
    judged(
      "purchases/s ÷ echo calls/s at 16 PSAMs × 64 cardholders",
      { text: "≥ 0.05", min: 0.05 },
      on.filter((p) => p.psams === 16 && p.cardholders === 64),
      perEcho,
      "16 × 64 with TLS on (and its echo) not in this run",
    ),
    judged(
      "purchases/s at 64 PSAMs × 256 cardholders, early-release mode",
      { text: "≥ 120", min: 120 },
      earlyRelease.filter((p) => p.psams === 64 && p.cardholders === 256),
      (p) => p.perSecond,
      `64 × 256 in ${EARLY_RELEASE_MODES.join(", ")} with TLS on not in this run`,
    ),
    judged(
      "purchases/s ÷ protocol-skeleton purchases/s at 16 PSAMs × 64 cardholders",
      { text: "≥ 0.6", min: 0.6 },
      withSkeleton(16, 64),
      perSkeleton,
      noSkeleton(16, 64),
    ),
    judged(
      "purchases/s ÷ protocol-skeleton purchases/s at 64 PSAMs × 256 cardholders",
      { text: "≥ 0.6", min: 0.6 },
      withSkeleton(64, 256),
      perSkeleton,
      noSkeleton(64, 256),
    ),
    judged(
      "p50 latency at 1 cardholder ÷ echo p50 at 1 concurrent call",
      { text: "≤ 10", max: 10 },
      on.filter((p) => p.cardholders === 1),
      (p) => p.p50Ms / (echoAt(1)?.p50Ms ?? NaN),
      "1 cardholder with TLS on (and its echo) not in this run",
    ),
    information(
      "p50 latency at 1 cardholder ÷ protocol-skeleton p50 at 1 cardholder",
      on.filter((p) => p.cardholders === 1 && skeletonAt(p)),
      (p) => p.p50Ms / (skeletonAt(p)?.p50Ms ?? NaN),
      skeleton ? "1 cardholder with TLS on and its skeleton not in this run" : "the protocol skeleton was not run (--skeleton off)",
    ),
    judged(
      "PSAM hold p50 in an early-release mode (ms)",
      { text: "≤ 5", max: 5 },
      earlyRelease.filter((p) => (p.psamHold?.samples ?? 0) > 0),
      (p) => p.psamHold!.p50Ms,
      `no ${EARLY_RELEASE_MODES.join(", ")} configuration with TLS on and PSAM holds recorded`,
    ),
    judged(
      "payment server event-loop delay p99 under load (ms)",
      { text: "≤ 5", max: 5 },
      loaded,
      (p) => p.eventLoopDelayMs[PROCESS.payment]?.p99 ?? NaN,
      `no TLS-on configuration with ${LOADED_FROM_CARDHOLDERS} or more cardholders and the payment server's figures`,
    ),
    memoryFlat(r.soak),
  ];
}

/** A figure with no goal: the worst (largest) of `rows`. */
function information<T extends TargetPurchase>(target: string, rows: T[], figure: (r: T) => number, none: string): TargetRow {
  const w = worstOf(rows, figure, "max");
  if (!w) return { target, goal: "—", value: NaN, at: none, met: undefined, information: true };
  const others = rows.length > 1 ? ` (largest of ${rows.length})` : "";
  return { target, goal: "—", value: w.value, at: `${at(w.row)}${others}`, met: undefined, information: true };
}

/** How much the peak may grow after the first minute and still be flat: the run-to-run noise of VmHWM, not a leak. */
export const FLAT_PEAK_GROWTH = 1.1;

function memoryFlat(soak: TargetInputs["soak"]): TargetRow {
  const target = "payment server peak memory, end ÷ first minute (flat over 5 minutes)";
  const goal = `≤ ${FLAT_PEAK_GROWTH}`;
  if (!soak) return { target, goal, value: NaN, at: "no soak in this run (--soak-minutes 5)", met: undefined };
  if (soak.peakGrowth === undefined) return { target, goal, value: NaN, at: `a ${soak.minutes}-minute soak has no first-minute figure`, met: undefined };
  const where = `${soak.atOneMinute?.peakMiB?.toFixed(0)} → ${soak.atEnd.peakMiB?.toFixed(0)} MiB over ${soak.minutes} min`;
  return {
    target,
    goal,
    value: soak.peakGrowth,
    at: soak.minutes < 5 ? `${where} (shorter than the 5 minutes asked)` : where,
    met: soak.minutes < 5 ? undefined : soak.peakGrowth <= FLAT_PEAK_GROWTH,
  };
}

export function renderTargets(rows: TargetRow[]): string {
  const value = (v: number) => (!Number.isFinite(v) ? "n/a" : Math.abs(v) < 1 ? v.toFixed(3) : Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(1));
  const met = (t: TargetRow) => (t.information && Number.isFinite(t.value) ? "information" : t.met === undefined ? "not measured" : t.met ? "met" : "not met");
  return markdown(
    ["target", "goal", "this run", "measured at", "met"],
    rows.map((t) => [t.target, t.goal, value(t.value), t.at, met(t)]),
  );
}
