// What Linux knows about a process under load: its peak resident memory and
// the CPU time it used. Elsewhere both read as undefined and the report
// says "n/a".

import { readFileSync } from "node:fs";

/** Linux reports CPU times in clock ticks of USER_HZ, 100 on every mainstream architecture. */
const TICKS_PER_SECOND = 100;

function procFile(pid: number, file: string): string | undefined {
  try {
    return readFileSync(`/proc/${pid}/${file}`, "utf8");
  } catch {
    return undefined;
  }
}

/** Peak resident set size since the process started (VmHWM), MiB. */
export function peakMemoryMiB(pid: number): number | undefined {
  const m = /^VmHWM:\s+(\d+) kB$/m.exec(procFile(pid, "status") ?? "");
  return m ? Number(m[1]) / 1024 : undefined;
}

/** User plus system CPU time the process has used so far, seconds. */
export function cpuSeconds(pid: number): number | undefined {
  const stat = procFile(pid, "stat");
  if (!stat) return undefined;
  // The command name may hold spaces and parentheses; the fields after its closing one are fixed.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  return Number.isFinite(utime + stime) ? (utime + stime) / TICKS_PER_SECOND : undefined;
}

/**
 * CPU use of several processes over a span, as a percentage of one core:
 * `opened()` at its start, `closed()` at its end, `percent()` after.
 */
export class CpuSampler {
  private readonly first = new Map<string, number>();
  private readonly last = new Map<string, number>();
  private openedAt = 0;
  private closedAt = 0;

  constructor(private readonly pids: () => Map<string, number>) {}

  opened(): void {
    this.openedAt = performance.now();
    this.sample(this.first);
  }

  closed(): void {
    this.closedAt = performance.now();
    this.sample(this.last);
  }

  percent(): Record<string, number> {
    const seconds = (this.closedAt - this.openedAt) / 1000;
    const out: Record<string, number> = {};
    for (const [name, before] of this.first) {
      const after = this.last.get(name);
      if (after !== undefined && seconds > 0) out[name] = (100 * (after - before)) / seconds;
    }
    return out;
  }

  private sample(into: Map<string, number>): void {
    for (const [name, pid] of this.pids()) {
      const s = cpuSeconds(pid);
      if (s !== undefined) into.set(name, s);
    }
  }
}
