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
  /** How long the warm-up lasted, ms (longer than asked when the loop had to settle). */
  warmupMs: number;
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
 * When the measuring window opens and closes. It opens when the warm-up has
 * passed or, with `settle`, once every worker has also finished its first
 * operation: a closed loop starts with every worker queueing at once, and
 * until each has gone round once, latency measures that burst rather than
 * the steady state (with 64 cardholders sharing 4 PSAMs held 0.6 s each, the
 * first round alone takes 10 s).
 */
class MeasuringWindow {
  opensAt = Infinity;
  closesAt = Infinity;
  private readonly startedAt = performance.now();
  private warmedUp = false;
  private wentRound = 0;
  private closedHookRan = false;
  private readonly timers: NodeJS.Timeout[] = [];

  constructor(private readonly p: { phases: Phases; workers: number; settle: boolean; hooks: { opened(): void; closed(): void } | undefined }) {
    this.timers.push(
      setTimeout(() => {
        this.warmedUp = true;
        this.maybeOpen();
      }, p.phases.warmupMs),
    );
  }

  /** A worker finished (or failed) its first operation. */
  workerWentRound(): void {
    this.wentRound++;
    this.maybeOpen();
  }

  contains(t: number): boolean {
    return t >= this.opensAt && t <= this.closesAt;
  }

  /** Warm-up as it turned out, ms. */
  get warmupMs(): number {
    return this.opensAt - this.startedAt;
  }

  phase(done: number): string {
    const now = performance.now();
    if (this.opensAt === Infinity) {
      return now < this.startedAt + this.p.phases.warmupMs
        ? `warm-up, ${Math.ceil((this.startedAt + this.p.phases.warmupMs - now) / 1000)} s left`
        : `warm-up, until every worker has gone round once (${this.wentRound}/${this.p.workers})`;
    }
    if (now < this.closesAt) return `measuring, ${Math.ceil((this.closesAt - now) / 1000)} s left, ${done} done`;
    return "finishing the operations in flight";
  }

  /** Ends the window's timers; runs the closing hook now if its timer has not fired yet (the last operation ended first). */
  stop(): void {
    this.timers.forEach(clearTimeout);
    if (this.opensAt !== Infinity) this.close();
  }

  private close(): void {
    if (this.closedHookRan) return;
    this.closedHookRan = true;
    this.p.hooks?.closed();
  }

  private maybeOpen(): void {
    if (this.opensAt !== Infinity || !this.warmedUp || (this.p.settle && this.wentRound < this.p.workers)) return;
    // Without settling, the window is exactly where the phases put it, whatever the timer's lateness.
    this.opensAt = this.p.settle ? performance.now() : this.startedAt + this.p.phases.warmupMs;
    this.closesAt = this.opensAt + this.p.phases.measureMs;
    this.p.hooks?.opened();
    this.timers.push(setTimeout(() => this.close(), this.closesAt - performance.now()));
  }
}

/**
 * Runs `workers` loops of `operation` (which resolves to the latency it
 * measured, ms). `window` hooks run when the measuring window opens and
 * closes, to sample the processes under load. With `settle`, the warm-up
 * lasts at least until every worker has finished one operation.
 */
export async function closedLoop(p: {
  label: string;
  workers: number;
  phases: Phases;
  operation: (worker: number) => Promise<number>;
  window?: { opened(): void; closed(): void };
  settle?: boolean;
}): Promise<LoadResult> {
  const win = new MeasuringWindow({ phases: p.phases, workers: p.workers, settle: p.settle ?? false, hooks: p.window });
  const latencies: number[] = [];
  const errors = new ErrorTally(p.label);
  const progress = showProgress(p.label, () => win.phase(latencies.length));

  const worker = async (w: number) => {
    for (let round = 0; performance.now() < win.closesAt; round++) {
      try {
        const ms = await p.operation(w);
        if (win.contains(performance.now())) latencies.push(ms);
      } catch (e) {
        errors.add(e);
        await sleep(PAUSE_AFTER_ERROR_MS);
      }
      if (round === 0) win.workerWentRound();
    }
  };
  try {
    await Promise.all(Array.from({ length: p.workers }, (_, w) => worker(w)));
  } finally {
    win.stop();
    progress.stop();
  }
  latencies.sort((a, b) => a - b);
  return {
    warmupMs: win.warmupMs,
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
/** An INTERNAL answer's reference to its log line (lib/grpc/server.ts): one per failure, so blanked like transaction ids. */
const INTERNAL_REF = /\(ref [0-9a-f]{8}\)/g;

/** Counts failures and prints each new kind at once, so a long run shows trouble while it happens. */
export class ErrorTally {
  count = 0;
  readonly byMessage: Record<string, number> = {};

  constructor(private readonly label: string) {}

  add(e: unknown): void {
    this.count++;
    const message = (e instanceof Error ? `${e.name}: ${e.message}` : String(e)).replace(TRANSACTION_ID, "<transaction>").replace(INTERNAL_REF, "(ref <ref>)");
    if (!(message in this.byMessage)) process.stderr.write(`\n[${this.label}] error: ${message}\n`);
    this.byMessage[message] = (this.byMessage[message] ?? 0) + 1;
  }
}

/** A status line on stderr: the phase, seconds left and operations so far (a plain line every 5 s when stderr is not a terminal). */
function showProgress(label: string, phase: () => string): { stop(): void } {
  const tty = process.stderr.isTTY;
  let ticks = 0;
  const timer = setInterval(() => {
    ticks++;
    if (tty) process.stderr.write(`\r\x1b[K[${label}] ${phase()}`);
    else if (ticks % 5 === 0) process.stderr.write(`[${label}] ${phase()}\n`);
  }, 1000);
  return {
    stop() {
      clearInterval(timer);
      if (tty) process.stderr.write("\r\x1b[K");
    },
  };
}
