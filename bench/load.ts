// A closed-loop load: a fixed number of workers, each starting its next
// operation as soon as the last one ended, first through a warm-up and
// then through a measuring window. Throughput counts the operations that
// ended inside the window, whenever they began, which stays unbiased when
// an operation takes a sizeable part of the window.

import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";

export interface Phases {
  warmupMs: number;
  measureMs: number;
}

export interface LoadResult {
  /** Operations that ended inside the measuring window. */
  completed: number;
  perSecond: number;
  p50Ms: number;
  p99Ms: number;
  /** Every failed operation, warm-up and drain included: a benchmark of a failing system measures nothing. */
  errors: number;
  /** Failures by message, transaction ids blanked so that one cause counts once. */
  errorMessages: Record<string, number>;
}

/** Resting time after a failure, so a dead service does not turn the loop into a spin. */
const PAUSE_AFTER_ERROR_MS = 100;

/**
 * Runs `workers` loops of `operation` (which resolves to the latency it
 * measured, ms). `window` hooks run when the measuring window opens and
 * closes, to sample the processes under load.
 */
export async function closedLoop(p: {
  label: string;
  workers: number;
  phases: Phases;
  operation: (worker: number) => Promise<number>;
  window?: { opened(): void; closed(): void };
}): Promise<LoadResult> {
  const opensAt = performance.now() + p.phases.warmupMs;
  const closesAt = opensAt + p.phases.measureMs;
  const latencies: number[] = [];
  const errors = new ErrorTally(p.label);
  const hooks = [setTimeout(() => p.window?.opened(), p.phases.warmupMs), setTimeout(() => p.window?.closed(), p.phases.warmupMs + p.phases.measureMs)];
  const progress = showProgress(p.label, opensAt, closesAt, () => latencies.length);

  const worker = async (w: number) => {
    while (performance.now() < closesAt) {
      try {
        const ms = await p.operation(w);
        const endedAt = performance.now();
        if (endedAt >= opensAt && endedAt <= closesAt) latencies.push(ms);
      } catch (e) {
        errors.add(e);
        await sleep(PAUSE_AFTER_ERROR_MS);
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: p.workers }, (_, w) => worker(w)));
  } finally {
    hooks.forEach(clearTimeout);
    progress.stop();
  }
  latencies.sort((a, b) => a - b);
  return {
    completed: latencies.length,
    perSecond: latencies.length / (p.phases.measureMs / 1000),
    p50Ms: percentile(latencies, 0.5),
    p99Ms: percentile(latencies, 0.99),
    errors: errors.count,
    errorMessages: errors.byMessage,
  };
}

/** Nearest-rank percentile of sorted values; NaN when there are none. */
export function percentile(sorted: number[], q: number): number {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]!;
}

const TRANSACTION_ID = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/gi;

/** Counts failures and prints each new kind at once, so a long run shows trouble while it happens. */
class ErrorTally {
  count = 0;
  readonly byMessage: Record<string, number> = {};

  constructor(private readonly label: string) {}

  add(e: unknown): void {
    this.count++;
    const message = (e instanceof Error ? `${e.name}: ${e.message}` : String(e)).replace(TRANSACTION_ID, "<transaction>");
    if (!(message in this.byMessage)) process.stderr.write(`\n[${this.label}] error: ${message}\n`);
    this.byMessage[message] = (this.byMessage[message] ?? 0) + 1;
  }
}

/** A status line on stderr: the phase, seconds left and operations so far (a plain line every 5 s when stderr is not a terminal). */
function showProgress(label: string, opensAt: number, closesAt: number, done: () => number): { stop(): void } {
  const tty = process.stderr.isTTY;
  let ticks = 0;
  const line = () => {
    const now = performance.now();
    const phase =
      now < opensAt
        ? `warm-up, ${Math.ceil((opensAt - now) / 1000)} s left`
        : now < closesAt
          ? `measuring, ${Math.ceil((closesAt - now) / 1000)} s left, ${done()} done`
          : "finishing the operations in flight";
    return `[${label}] ${phase}`;
  };
  const timer = setInterval(() => {
    ticks++;
    if (tty) process.stderr.write(`\r\x1b[K${line()}`);
    else if (ticks % 5 === 0) process.stderr.write(`${line()}\n`);
  }, 1000);
  return {
    stop() {
      clearInterval(timer);
      if (tty) process.stderr.write("\r\x1b[K");
    },
  };
}
