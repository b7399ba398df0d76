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

/** CPU time per operation, ms, summed over processes, from their CPU use (% of one core) and the operations per second; NaN when unknown. */
export function cpuMsPerOperation(cpuPercent: Record<string, number>, perSecond: number): number {
  const values = Object.values(cpuPercent);
  const total = values.reduce((a, b) => a + b, 0);
  // % of a core over a second is 10 ms of CPU per second.
  return perSecond > 0 && values.length > 0 ? (total * 10) / perSecond : NaN;
}

/** CPU time per operation, ms, of each process, from its CPU use (% of one core) and the operations per second; NaN when unknown. */
export function cpuMsPerOperationByProcess(cpuPercent: Record<string, number>, perSecond: number): Record<string, number> {
  return Object.fromEntries(Object.entries(cpuPercent).map(([name, percent]) => [name, perSecond > 0 ? (percent * 10) / perSecond : NaN]));
}

/** Resident memory now (VmRSS), MiB. */
export function residentMemoryMiB(pid: number): number | undefined {
  const m = /^VmRSS:\s+(\d+) kB$/m.exec(procFile(pid, "status") ?? "");
  return m ? Number(m[1]) / 1024 : undefined;
}

/** CPU time the whole machine has spent busy so far (every core, every process, the kernel), seconds: the "cpu" line of /proc/stat. */
export function machineBusySeconds(): number | undefined {
  let stat: string;
  try {
    stat = readFileSync("/proc/stat", "utf8");
  } catch {
    return undefined;
  }
  const m = /^cpu\s+(.*)$/m.exec(stat);
  if (!m?.[1]) return undefined;
  // user nice system idle iowait irq softirq steal (guest time is already counted in user).
  const [user = 0, nice = 0, system = 0, , , irq = 0, softirq = 0, steal = 0] = m[1].trim().split(/\s+/).map(Number);
  const busy = user + nice + system + irq + softirq + steal;
  return Number.isFinite(busy) ? busy / TICKS_PER_SECOND : undefined;
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
  private machineFirst: number | undefined;
  private machineLast: number | undefined;

  constructor(private readonly pids: () => Map<string, number>) {}

  opened(): void {
    this.openedAt = performance.now();
    this.machineFirst = machineBusySeconds();
    this.sample(this.first);
  }

  closed(): void {
    this.closedAt = performance.now();
    this.sample(this.last);
    this.machineLast = machineBusySeconds();
  }

  /** The whole machine's busy CPU over the span, % of one core (up to 100 × cores): the sampled processes and any other work. */
  machinePercent(): number | undefined {
    const seconds = (this.closedAt - this.openedAt) / 1000;
    if (this.machineFirst === undefined || this.machineLast === undefined || seconds <= 0) return undefined;
    return (100 * (this.machineLast - this.machineFirst)) / seconds;
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

/** The machine's busy CPU as a result field, when Linux tells. */
export function machineCpu(cpu: CpuSampler): { machineCpuPercent?: number } {
  const machine = cpu.machinePercent();
  return machine === undefined ? {} : { machineCpuPercent: machine };
}
