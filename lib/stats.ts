// What a service process tells whoever launched it about its own running
// (the benchmarks ask): durable syncs it made, its event loop's delays and
// its memory. Asked over the launcher's IPC channel; it costs nothing until
// asked, and the event-loop monitor starts at the first request.

import { monitorEventLoopDelay, type IntervalHistogram } from "node:perf_hooks";

let fsyncs = 0;

/** Counts a sync to stable storage (fsync, fdatasync) this process asked for. */
export function countFsync(n = 1): void {
  fsyncs += n;
}

/** A service's figures since its start (counters) or since the previous report (the event-loop delays). */
export interface ProcessStats {
  pid: number;
  /** Syncs to stable storage made since the process started. */
  fsyncs: number;
  /** Event-loop delay since the previous report (or the monitor's start): how late the monitor's timer ran, ms. */
  eventLoopDelayMs: { p50: number; p99: number; max: number; samples: number };
  rssBytes: number;
  heapUsedBytes: number;
}

/** A request a launcher sends over IPC, and the answer's tag. */
export const STATS_REQUEST = "netpurse-stats";

/** The event-loop monitor's sampling interval, ms. */
export const EVENT_LOOP_RESOLUTION_MS = 10;

let monitor: IntervalHistogram | undefined;

export function processStats(): ProcessStats {
  const h = monitor;
  // The histogram holds the intervals between the timer's ticks: the delay is what each ran late beyond the resolution.
  const late = (ns: number) => (Number.isFinite(ns) ? Math.max(0, ns / 1e6 - EVENT_LOOP_RESOLUTION_MS) : 0);
  const out: ProcessStats = {
    pid: process.pid,
    fsyncs,
    eventLoopDelayMs: h
      ? { p50: late(h.percentile(50)), p99: late(h.percentile(99)), max: late(h.max), samples: h.count }
      : { p50: 0, p99: 0, max: 0, samples: 0 },
    rssBytes: process.memoryUsage.rss(),
    heapUsedBytes: process.memoryUsage().heapUsed,
  };
  if (h) h.reset();
  else {
    // A 10 ms timer: a 1 ms one cost about 1 % of a core per process, which inflated CPU per purchase at low rates. A stall longer
    // than 10 ms still delays the next tick and is recorded (less what of it came before the tick was due); a shorter one when it
    // crosses a tick.
    monitor = monitorEventLoopDelay({ resolution: EVENT_LOOP_RESOLUTION_MS });
    monitor.enable();
  }
  return out;
}

/** Answers a launcher's stats requests on the IPC channel, if there is one. */
export function answerStatsRequests(): void {
  if (!process.send) return;
  process.on("message", (m: unknown) => {
    if (typeof m !== "object" || m === null) return;
    const r = m as { type?: unknown; id?: unknown };
    if (r.type === STATS_REQUEST) process.send?.({ type: STATS_REQUEST, id: r.id, stats: processStats() });
  });
}
