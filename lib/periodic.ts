// Background work that repeats (sweeps, retries, resumption): one run at a
// time, the next `everyMs` after the last ended, and a failed run is logged
// without stopping the next, so no rejection escapes to end the process.

import type { Logger } from "./log.js";

export interface Periodic {
  /** Stops the repetition; a run in progress finishes on its own. */
  stop(): void;
}

/** Runs `task` after `firstInMs` (default at once), then `everyMs` after each run ends, until stopped. */
export function repeat(p: { what: string; everyMs: number; firstInMs?: number; log: Logger; task: () => Promise<unknown> }): Periodic {
  let timer: NodeJS.Timeout | undefined;
  let stopped = false;
  const schedule = (ms: number) => {
    if (stopped) return;
    timer = setTimeout(run, ms);
    timer.unref();
  };
  const run = () => {
    p.task().then(
      () => schedule(p.everyMs),
      (e: unknown) => {
        p.log.warn(`${p.what} failed; trying again in ${p.everyMs} ms`, { error: e instanceof Error ? e.message : String(e) });
        schedule(p.everyMs);
      },
    );
  };
  schedule(p.firstInMs ?? 0);
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
