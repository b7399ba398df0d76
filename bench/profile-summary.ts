// Where a process spent its CPU, from a V8 .cpuprofile (what --cpu-prof and
// the inspector's Profiler write): self time summed per function (name,
// file and line), the samples restricted to a span if asked, so that a
// reader sees the top of the list without opening Chrome's DevTools.
//
//   node --import tsx bench/profile-summary.ts [--top 15] FILE.cpuprofile...

import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { parseArgs } from "node:util";
import { markdown } from "./format.js";

/** The parts of the DevTools protocol's Profiler.Profile this summary reads. */
export interface CpuProfile {
  nodes: {
    id: number;
    callFrame: { functionName: string; url: string; lineNumber: number; columnNumber?: number };
  }[];
  /** Microseconds, on the machine's monotonic clock (the one process.hrtime reads). */
  startTime: number;
  endTime: number;
  /** The node on top of the stack at each sample. */
  samples?: number[];
  /** Microseconds from the previous sample (the first: from startTime). */
  timeDeltas?: number[];
}

export interface SelfTime {
  /** The function's name, "(anonymous)" without one; V8's own entries keep theirs: (garbage collector), (program). */
  functionName: string;
  /** Its file (relative to the repository when inside it) and 1-based line; empty for V8's own entries. */
  location: string;
  selfMs: number;
  /** Of the process's busy time in the span. */
  share: number;
}

export interface ProfileSummary {
  /** Sampled time in the span, ms. */
  sampledMs: number;
  /** Of which not (idle): the process was running JavaScript, compiling, collecting garbage or in native code. */
  busyMs: number;
  top: SelfTime[];
}

/** The repository's root, to print file paths relative to it. */
const ROOT_URL = pathToFileURL(resolve(fileURLToPath(new URL("..", import.meta.url)))).href + "/";

const IDLE = "(idle)";

function locationOf(url: string, lineNumber: number): string {
  if (!url) return "";
  const file = url.startsWith(ROOT_URL) ? url.slice(ROOT_URL.length) : url;
  return `${file}:${lineNumber + 1}`;
}

/**
 * Self time per function, the `top` largest first. A sample lasts until the
 * next one (the last until endTime). With `fromUs`/`toUs` (monotonic clock,
 * µs), only the samples taken inside [fromUs, toUs) count.
 */
export function summariseProfile(profile: CpuProfile, o: { top?: number; fromUs?: number; toUs?: number } = {}): ProfileSummary {
  const samples = profile.samples ?? [];
  const deltas = profile.timeDeltas ?? [];
  const from = o.fromUs ?? -Infinity;
  const to = o.toUs ?? Infinity;
  const frames = new Map(profile.nodes.map((n) => [n.id, n.callFrame]));
  const byFunction = new Map<string, { functionName: string; location: string; us: number }>();
  let sampledUs = 0;
  let idleUs = 0;
  let at = profile.startTime;
  for (let i = 0; i < samples.length; i++) {
    at += deltas[i] ?? 0;
    const next = i + 1 < samples.length ? at + (deltas[i + 1] ?? 0) : profile.endTime;
    // V8 sometimes records a sample slightly out of order: a negative span counts as none.
    const us = Math.max(0, next - at);
    if (at < from || at >= to || us === 0) continue;
    const frame = frames.get(samples[i]!);
    if (!frame) continue;
    sampledUs += us;
    if (frame.functionName === IDLE) {
      idleUs += us;
      continue;
    }
    const functionName = frame.functionName || "(anonymous)";
    const location = locationOf(frame.url, frame.lineNumber);
    const key = `${functionName} ${location}`;
    const entry = byFunction.get(key) ?? { functionName, location, us: 0 };
    entry.us += us;
    byFunction.set(key, entry);
  }
  const busyUs = sampledUs - idleUs;
  const top = [...byFunction.values()]
    .sort((a, b) => b.us - a.us)
    .slice(0, o.top ?? 15)
    .map((e) => ({ functionName: e.functionName, location: e.location, selfMs: e.us / 1000, share: busyUs > 0 ? e.us / busyUs : 0 }));
  return { sampledMs: sampledUs / 1000, busyMs: busyUs / 1000, top };
}

/** One process's summary as a markdown table, with a line saying how busy it was. */
export function renderProfileSummary(name: string, s: ProfileSummary): string {
  const busy = s.sampledMs > 0 ? ` (${((100 * s.busyMs) / s.sampledMs).toFixed(0)} % of one core)` : "";
  const rows = s.top.map((t, i) => [
    String(i + 1),
    `\`${t.functionName}\``,
    t.location ? `\`${t.location}\`` : "",
    t.selfMs.toFixed(1),
    (100 * t.share).toFixed(1),
  ]);
  return [
    `**${name}**: busy ${s.busyMs.toFixed(0)} ms of ${s.sampledMs.toFixed(0)} ms sampled${busy}`,
    "",
    markdown(["#", "function", "where", "self ms", "% of busy"], rows),
  ].join("\n");
}

export function readProfile(file: string): CpuProfile {
  return JSON.parse(readFileSync(file, "utf8")) as CpuProfile;
}

function main(): void {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { top: { type: "string", default: "15" } } });
  if (positionals.length === 0) {
    process.stderr.write("Usage: node --import tsx bench/profile-summary.ts [--top N] FILE.cpuprofile...\n");
    process.exitCode = 2;
    return;
  }
  for (const file of positionals) {
    process.stdout.write(renderProfileSummary(file, summariseProfile(readProfile(file), { top: Number(values.top) })) + "\n\n");
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) main();
