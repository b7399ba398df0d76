// The benchmark's CPU profile summary (bench/profile-summary.ts) on a
// hand-made .cpuprofile whose self times are known, and the profiles
// bench/profile.ts makes: a child started with profilingEnv writes one at
// exit, and both it and this process's own give TypeScript functions their
// source lines back.

import { expect } from "chai";
import { spawn } from "node:child_process";
import { mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { OwnProfile, profilingEnv } from "../../bench/profile.js";
import { readProfile, renderProfileSummary, summariseProfile, type CpuProfile } from "../../bench/profile-summary.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const frame = (functionName: string, url = "", lineNumber = -1) => ({ functionName, url, lineNumber, columnNumber: 0 });

/**
 * Samples every 1,000 µs from startTime 1,000,000, in order: work ×3, idle ×2,
 * work (another node, same function and line) ×1, helper ×2, gc ×1, the last
 * lasting until endTime (2,000 µs).
 */
const PROFILE: CpuProfile = {
  nodes: [
    { id: 1, callFrame: frame("(root)") },
    { id: 2, callFrame: frame("work", `file://${ROOT}lib/example.ts`, 9) },
    { id: 3, callFrame: frame("", "file:///elsewhere/helper.js", 0) },
    { id: 4, callFrame: frame("(idle)") },
    { id: 5, callFrame: frame("(garbage collector)") },
    { id: 6, callFrame: frame("work", `file://${ROOT}lib/example.ts`, 9) },
  ],
  startTime: 1_000_000,
  endTime: 1_010_000,
  samples: [2, 2, 2, 4, 4, 6, 3, 3, 5],
  timeDeltas: [0, 1000, 1000, 1000, 1000, 1000, 1000, 1000, 1000],
};

describe("bench: CPU profile summary", () => {
  it("sums self time per function and line across call paths, (idle) apart", () => {
    const s = summariseProfile(PROFILE);
    expect(s.sampledMs).to.equal(10);
    expect(s.busyMs).to.equal(8);
    expect(s.top.map((t) => [t.functionName, t.location, t.selfMs])).to.deep.equal([
      ["work", "lib/example.ts:10", 4],
      ["(anonymous)", "file:///elsewhere/helper.js:1", 2],
      ["(garbage collector)", "", 2],
    ]);
    expect(s.top[0]!.share).to.equal(0.5);
    expect(s.top.reduce((a, t) => a + t.share, 0)).to.equal(1);
  });

  it("keeps the top N only, largest first", () => {
    expect(summariseProfile(PROFILE, { top: 1 }).top.map((t) => t.functionName)).to.deep.equal(["work"]);
  });

  it("counts only the samples taken inside the window", () => {
    // From the 4th sample (t = 1,003,000) up to the 7th (t = 1,006,000, excluded): idle, idle, work.
    const s = summariseProfile(PROFILE, { fromUs: 1_003_000, toUs: 1_006_000 });
    expect(s.sampledMs).to.equal(3);
    expect(s.busyMs).to.equal(1);
    expect(s.top.map((t) => [t.functionName, t.selfMs])).to.deep.equal([["work", 1]]);
  });

  it("counts a sample V8 recorded out of order as no time, not negative time", () => {
    const p: CpuProfile = { ...PROFILE, samples: [2, 3, 2], timeDeltas: [0, 3000, -1000], endTime: 1_004_000 };
    const s = summariseProfile(p);
    // work 0→3000, helper 3000→2000 (−1000: none), work 2000→4000.
    expect(s.top.map((t) => [t.functionName, t.selfMs])).to.deep.equal([["work", 5]]);
    expect(s.busyMs).to.equal(5);
  });

  it("reads an empty profile as no time", () => {
    const s = summariseProfile({ nodes: [{ id: 1, callFrame: frame("(root)") }], startTime: 0, endTime: 5 });
    expect(s).to.deep.equal({ sampledMs: 0, busyMs: 0, top: [] });
  });

  it("renders a table with the busy share of a core", () => {
    const text = renderProfileSummary("payment", summariseProfile(PROFILE));
    expect(text).to.contain("**payment**: busy 8 ms of 10 ms sampled (80 % of one core)");
    expect(text).to.contain("| 1 | `work` | `lib/example.ts:10` | 4.0 | 50.0 |");
  });
});

/** Keeps the CPU busy in a function of its own for `ms`. */
function spinForProfile(ms: number): number {
  let x = 0;
  const until = Date.now() + ms;
  while (Date.now() < until) x += Math.sqrt(x + 1);
  return x;
}

describe("bench: CPU profiles of processes", function () {
  this.timeout(60_000);
  let dir: string;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), "netpurse-profile-test-"));
  });

  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("profiles this process with TypeScript source lines", async () => {
    const own = await OwnProfile.start();
    spinForProfile(300);
    const s = summariseProfile(await own.stop(), { top: 50 });
    const spin = s.top.find((t) => t.functionName === "spinForProfile");
    expect(spin, JSON.stringify(s.top.slice(0, 5))).to.not.equal(undefined);
    expect(spin!.selfMs).to.be.greaterThan(100);
    // Compiled by tsx, every function would sit on line 1.
    expect(spin!.location).to.match(/^test\/bench\/profile-summary\.test\.ts:(\d+)$/);
    expect(Number(spin!.location.split(":")[1])).to.be.greaterThan(1);
  });

  it("makes a child started with profilingEnv write its profile when it exits", async () => {
    const script = join(dir, "child.ts");
    await writeFile(
      script,
      [
        "// Two lines before the function: compiled by tsx, it would sit on line 1.",
        "",
        "function childSpin(ms: number): number {",
        "  let x = 0;",
        "  const until = Date.now() + ms;",
        "  while (Date.now() < until) x += Math.sqrt(x + 1);",
        "  return x;",
        "}",
        "childSpin(300);",
        "process.exit(0);",
      ].join("\n"),
    );
    const out = join(dir, "profiles");
    const child = spawn(process.execPath, ["--import", "tsx", script], { cwd: ROOT, env: { ...process.env, ...profilingEnv(out) }, stdio: "inherit" });
    const code = await new Promise<number | null>((resolve) => child.once("exit", resolve));
    expect(code).to.equal(0);
    // One file, the main thread's, named after the process (tsx's loader thread writes none).
    expect(await readdir(out)).to.deep.equal([`${child.pid}.cpuprofile`]);
    const s = summariseProfile(readProfile(join(out, `${child.pid}.cpuprofile`)), { top: 50 });
    const spin = s.top.find((t) => t.functionName === "childSpin");
    expect(spin, JSON.stringify(s.top.slice(0, 5))).to.not.equal(undefined);
    expect(spin!.selfMs).to.be.greaterThan(100);
    expect(spin!.location).to.equal(`file://${script}:3`);
  });
});
