// CPU profiles of a benchmark run (--profile DIR): every service process and
// the benchmark's own, each a .cpuprofile that Chrome's DevTools opens, and
// a summary of each restricted to the measuring window.
//
// Node 20 refuses --cpu-prof in NODE_OPTIONS, and the launcher starts the
// services as `node --import tsx script`: so the services get, through
// NODE_OPTIONS, a preloaded module (a data: URL, plain JavaScript, since
// Node also loads it in tsx's loader thread, where TypeScript is not yet
// understood) that starts the inspector's profiler on the main thread and
// writes DIR/<pid>.cpuprofile when the process exits cleanly (a SIGTERM
// from the launcher ends in process.exit). A process killed outright
// writes nothing.

import { Session } from "node:inspector";
import { mkdir, readdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readProfile, summariseProfile, type CpuProfile, type ProfileSummary } from "./profile-summary.js";

/** Functions listed per process in the report. */
export const PROFILE_TOP = 15;

/** Sampling interval, µs: V8's default. */
const SAMPLING_INTERVAL_US = 1000;

/**
 * Plain JavaScript, shared by the services' preload and this process: tsx
 * compiles each TypeScript file to one line, so a profile's call frames all
 * say line 1; the source maps tsx registers with Node give each frame back
 * its line in the TypeScript file (only for a map of the same file: the
 * maps that compiled packages ship point into sources that are not there).
 */
const SOURCE_LINES_MODULE = `import { findSourceMap } from "node:module";
export function toSourceLines(profile) {
  const maps = new Map();
  for (const { callFrame: frame } of profile.nodes) {
    if (!frame.url.startsWith("file:") || frame.lineNumber < 0) continue;
    if (!maps.has(frame.url)) maps.set(frame.url, findSourceMap(frame.url));
    const entry = maps.get(frame.url)?.findEntry(frame.lineNumber, frame.columnNumber);
    if (entry?.originalSource === frame.url && entry.originalLine !== undefined) {
      frame.lineNumber = entry.originalLine;
      frame.columnNumber = entry.originalColumn;
    }
  }
  return profile;
}
`;

const dataUrl = (source: string) => `data:text/javascript,${encodeURIComponent(source)}`;

/** The preload, run first in every thread of a service: profiles the main thread only. */
function preload(dir: string): string {
  return `${SOURCE_LINES_MODULE}
import { Session } from "node:inspector";
import { isMainThread } from "node:worker_threads";
import { mkdirSync, writeFileSync } from "node:fs";
if (isMainThread) {
  const session = new Session();
  session.connect();
  session.post("Profiler.enable");
  session.post("Profiler.setSamplingInterval", { interval: ${SAMPLING_INTERVAL_US} });
  session.post("Profiler.start");
  process.on("exit", () => {
    session.post("Profiler.stop", (error, result) => {
      if (error) return;
      mkdirSync(${JSON.stringify(dir)}, { recursive: true });
      writeFileSync(${JSON.stringify(dir)} + "/" + process.pid + ".cpuprofile", JSON.stringify(toSourceLines(result.profile)));
    });
  });
}
`;
}

/** The environment that makes every service started with it profile itself into `dir`. */
export function profilingEnv(dir: string): NodeJS.ProcessEnv {
  const options = [process.env.NODE_OPTIONS, `--import=${dataUrl(preload(dir))}`];
  return { NODE_OPTIONS: options.filter(Boolean).join(" ") };
}

/** Now on the monotonic clock the profiles' timestamps use, µs. */
export function monotonicUs(): number {
  return Number(process.hrtime.bigint() / 1000n);
}

/** The benchmark process's own profile, from start() to stop(). */
export class OwnProfile {
  private constructor(private readonly session: Session) {}

  static async start(): Promise<OwnProfile> {
    const session = new Session();
    session.connect();
    const own = new OwnProfile(session);
    await own.post("Profiler.enable");
    await own.post("Profiler.setSamplingInterval", { interval: SAMPLING_INTERVAL_US });
    await own.post("Profiler.start");
    return own;
  }

  async stop(): Promise<CpuProfile> {
    try {
      const { profile } = (await this.post("Profiler.stop")) as { profile: CpuProfile };
      const { toSourceLines } = (await import(dataUrl(SOURCE_LINES_MODULE))) as { toSourceLines: (p: CpuProfile) => CpuProfile };
      return toSourceLines(profile);
    } finally {
      this.session.disconnect();
    }
  }

  private post(method: string, params?: object): Promise<unknown> {
    return new Promise((resolve, reject) => this.session.post(method, params, (e, result) => (e ? reject(e) : resolve(result))));
  }
}

export interface ProcessProfile {
  process: string;
  /** The .cpuprofile file. */
  file: string;
  /** Over the measuring window. */
  summary: ProfileSummary;
}

export interface ProfileSet {
  dir: string;
  /** Every process that wrote a profile, the busiest in the window first. */
  processes: ProcessProfile[];
  /** Processes that wrote none (killed, or crashed before exit). */
  missing: string[];
}

/**
 * After the services have stopped: names each DIR/<pid>.cpuprofile after its
 * process (`pids`, as they ran), writes the benchmark's own as bench.cpuprofile,
 * and summarises every one over the window [fromUs, toUs).
 */
export async function collectProfiles(
  dir: string,
  pids: Map<string, number>,
  own: { name: string; profile: CpuProfile },
  window: { fromUs: number; toUs: number },
  top = PROFILE_TOP,
): Promise<ProfileSet> {
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, `${own.name}.cpuprofile`), JSON.stringify(own.profile));
  const written = new Set(await readdir(dir));
  const processes: ProcessProfile[] = [];
  const missing: string[] = [];
  for (const [name, pid] of pids) {
    const file = join(dir, `${name}.cpuprofile`);
    if (name !== own.name) {
      if (!written.has(`${pid}.cpuprofile`)) {
        missing.push(name);
        continue;
      }
      await rename(join(dir, `${pid}.cpuprofile`), file);
    }
    processes.push({ process: name, file, summary: summariseProfile(readProfile(file), { ...window, top }) });
  }
  processes.sort((a, b) => b.summary.busyMs - a.summary.busyMs);
  return { dir, processes, missing };
}
