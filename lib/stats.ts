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
  /** Event-loop delay since the previous report (or the monitor's start), ms. */
  eventLoopDelayMs: { p50: number; p99: number; max: number; samples: number };
  rssBytes: number;
  heapUsedBytes: number;
}

/** A request a launcher sends over IPC, and the answer's tag. */
export const STATS_REQUEST = "netpurse-stats";

let monitor: IntervalHistogram | undefined;

export function processStats(): ProcessStats {
  const h = monitor;
  const ms = (ns: number) => (Number.isFinite(ns) ? ns / 1e6 : 0);
  const out: ProcessStats = {
    pid: process.pid,
    fsyncs,
    eventLoopDelayMs: h ? { p50: ms(h.percentile(50)), p99: ms(h.percentile(99)), max: ms(h.max), samples: h.count } : { p50: 0, p99: 0, max: 0, samples: 0 },
    rssBytes: process.memoryUsage.rss(),
    heapUsedBytes: process.memoryUsage().heapUsed,
  };
  if (h) h.reset();
  else {
    monitor = monitorEventLoopDelay({ resolution: 1 });
    monitor.enable();
  }
  return out;
}

/** Answers a launcher's stats requests on the IPC channel, if there is one. */
export function answerStatsRequests(): void {
  if (!process.send) return;
  process.on("message", (m: unknown) => {
    if (typeof m === "object" && m !== null && (m as { type?: unknown }).type === STATS_REQUEST) {
      process.send?.({ type: STATS_REQUEST, id: (m as { id?: unknown }).id, stats: processStats() });
    }
  });
}
