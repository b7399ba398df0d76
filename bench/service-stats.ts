// What each process of a benchmark's network says about its own running
// over a measuring window (lib/stats.ts, asked over the launcher's IPC
// channel; the benchmark process answers for itself): durable syncs made,
// event-loop delay, memory.

import { processStats, type ProcessStats } from "../lib/stats.js";
import type { Launcher } from "../services/network/launcher.js";

export type EventLoopDelay = ProcessStats["eventLoopDelayMs"];

export interface WindowStats {
  /** Durable syncs (fsync, fdatasync) made during the window, per process. */
  fsyncs: Record<string, number>;
  /** Event-loop delay over the window, per process, ms. */
  eventLoopDelayMs: Record<string, EventLoopDelay>;
  /** Resident memory when the window closed, per process, bytes. */
  rssBytesAtClose: Record<string, number>;
  /** Processes that did not answer at the window's opening or closing (their figures are missing). */
  unanswered: string[];
}

type Answers = Map<string, ProcessStats | undefined>;

/**
 * Asks every process for its figures: once before the load (`idle()`,
 * which also starts each one's event-loop monitor), at the window's opening
 * and at its closing (`opened()` and `closed()`, hooks of closedLoop, which
 * only send the requests), then `figures()` for the differences.
 */
export class StatsWindow {
  private atOpen: Promise<Answers> | undefined;
  private atClose: Promise<Answers> | undefined;

  /** `ownName`: this process's name in the figures. */
  constructor(
    private readonly launcher: Pick<Launcher, "names" | "stats">,
    private readonly ownName: string,
  ) {}

  /** Each process's resident memory before the load, bytes. */
  async idle(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const [name, s] of await this.askAll()) if (s) out[name] = s.rssBytes;
    return out;
  }

  opened(): void {
    this.atOpen = this.askAll();
  }

  closed(): void {
    this.atClose = this.askAll();
  }

  async figures(): Promise<WindowStats> {
    if (!this.atOpen || !this.atClose) throw new Error("the measuring window never opened or closed");
    const [open, close] = await Promise.all([this.atOpen, this.atClose]);
    const out: WindowStats = { fsyncs: {}, eventLoopDelayMs: {}, rssBytesAtClose: {}, unanswered: [] };
    for (const name of new Set([...open.keys(), ...close.keys()])) {
      const before = open.get(name);
      const after = close.get(name);
      if (!before || !after) {
        out.unanswered.push(name);
        continue;
      }
      out.fsyncs[name] = after.fsyncs - before.fsyncs;
      out.eventLoopDelayMs[name] = after.eventLoopDelayMs;
      out.rssBytesAtClose[name] = after.rssBytes;
    }
    return out;
  }

  private async askAll(): Promise<Answers> {
    // This process's figures now, at the hook, not after the others have answered.
    const own = processStats();
    const names = this.launcher.names();
    const answers = await Promise.allSettled(names.map((name) => this.launcher.stats(name)));
    const out: Answers = new Map(names.map((name, i) => [name, answers[i]?.status === "fulfilled" ? answers[i].value : undefined]));
    out.set(this.ownName, own);
    return out;
  }
}
