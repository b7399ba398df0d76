// End to end: `npm start` as its own process, as a user runs it. It says
// which service died and how, and gives up with a failure once none is left;
// no service outlives it when it is killed with SIGKILL; and the CLI piped
// into a reader that stops early ends quietly.

import { expect } from "chai";
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { slowIt, tempDir } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";

const ROOT = new URL("../..", import.meta.url).pathname;

/** The processes whose parent is `ppid`, with the script each runs. */
function childrenOf(ppid: number): { pid: number; script: string }[] {
  const out: { pid: number; script: string }[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = readFileSync(`/proc/${name}/stat`, "utf8");
      // pid (comm) state ppid …; comm may hold spaces and parentheses, so read after its last ')'.
      const ppidOf = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppidOf !== ppid) continue;
      const args = readFileSync(`/proc/${name}/cmdline`, "utf8").split("\0");
      out.push({ pid: Number(name), script: args.find((a) => a.endsWith("main.ts")) ?? args.join(" ") });
    } catch {
      // Gone meanwhile.
    }
  }
  return out;
}

/** Whether a process has ended: no such process, or a zombie its new parent has not reaped yet. */
function gone(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return true;
  }
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return true;
  }
}

/** Whether a TCP port on loopback can be listened on. */
function portFree(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createServer();
    s.once("error", () => resolve(false));
    s.listen(port, "127.0.0.1", () => s.close(() => resolve(true)));
  });
}

interface Started {
  main: ChildProcess;
  output: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  services: { pid: number; script: string }[];
}

describe("end to end: npm start and its processes", function () {
  this.timeout(240_000);
  let data = "";
  let cleanup = async () => {};
  /** Every service process a test saw, so that none is left behind whatever happens. */
  const seen = new Set<number>();
  before(async () => ({ dir: data, cleanup } = await tempDir("netpurse-procs-")));
  afterEach(() => {
    for (const pid of seen) if (!gone(pid)) process.kill(pid, "SIGKILL");
    seen.clear();
  });
  after(async () => cleanup());

  /** `npm start` (without --once) over the test's data folder, once its network runs. */
  async function npmStart(): Promise<Started> {
    const main = spawn(process.execPath, ["--import", "tsx", "services/network/main.ts", "--data", data], { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    main.stdout.on("data", (d: Buffer) => (out += d.toString()));
    main.stderr.on("data", (d: Buffer) => (out += d.toString()));
    const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => main.once("exit", (code, signal) => r({ code, signal })));
    let ended = false;
    main.once("exit", () => (ended = true));
    await waitFor(() => ended || out.includes("Press Ctrl-C to stop."), 120_000, "npm start to bring the network up");
    if (ended) throw new Error(`npm start ended before the network ran:\n${out}`);
    const services = childrenOf(main.pid ?? -1);
    for (const s of services) seen.add(s.pid);
    return { main, output: () => out, exited, services };
  }

  const pidOf = (n: Started, script: string) => {
    const s = n.services.find((x) => x.script.endsWith(script));
    if (!s) throw new Error(`no process runs ${script}: ${JSON.stringify(n.services)}`);
    return s.pid;
  };

  slowIt(
    "[slow] says which service died, how, and its last log lines; exits 1 once every service is gone. The CLI piped into `head` ends quietly",
    async () => {
      const net = await npmStart();
      expect(net.services.map((s) => s.script)).to.include.members(["services/payment/main.ts", "client/daemon/main.ts"].map((s) => join(ROOT, s)));

      // `netpurse card --log 0 | head -1`: the reader closes after the first chunk; the CLI ends quietly with 141 (128 + SIGPIPE).
      const cli = spawn(join(ROOT, "bin/netpurse"), ["card", "--log", "0"], {
        env: { ...process.env, NETPURSE_DATA: data },
        stdio: ["ignore", "pipe", "pipe"],
      });
      let stderr = "";
      let first = "";
      cli.stderr.on("data", (d: Buffer) => (stderr += d.toString()));
      cli.stdout.once("data", (d: Buffer) => {
        first = d.toString();
        cli.stdout.destroy();
      });
      const code = await new Promise<number | null>((r) => cli.once("exit", (c) => r(c)));
      expect(first).to.match(/^card [0-9a-f]{16} {3}balance EUR/);
      expect(stderr, "no stack trace").to.equal("");
      expect(code).to.equal(141);

      // One service killed: npm start says so and keeps the others.
      process.kill(pidOf(net, "services/payment/main.ts"), "SIGKILL");
      await waitFor(() => net.output().includes("still running:"), 10_000, "npm start to report the death");
      expect(net.output()).to.contain(`netpurse: payment died (killed by SIGKILL); the last lines of its log (${join(data, "logs", "payment.log")}):`);
      expect(net.output()).to.match(/\n {2}\| .*netpurse-payment listening on 127\.0\.0\.1:7420/);
      expect(net.output()).to.match(/still running: concentrator, clearing, terminal-1, merchant-validation, .*client-daemon/);
      expect(net.main.exitCode).to.equal(null);

      // The rest, one way and another: once none is left, npm start stops with a failure.
      process.kill(pidOf(net, "services/concentrator/main.ts"), "SIGTERM");
      for (const s of net.services) if (!s.script.endsWith("services/concentrator/main.ts") && !gone(s.pid)) process.kill(s.pid, "SIGKILL");
      const end = await net.exited;
      expect(end.code).to.equal(1);
      expect(net.output()).to.contain("netpurse: every service has died; stopping");
      expect(net.output()).to.contain("netpurse: concentrator died (exit code 0)");
      expect(net.output()).to.contain("netpurse: client-daemon died (killed by SIGKILL)");
    },
  );

  slowIt("[slow] takes every service with it when killed with SIGKILL: their processes end and their ports are free within seconds", async () => {
    const net = await npmStart();
    const ports = [...net.output().matchAll(/^ {2}\S+ +127\.0\.0\.1:(\d+)$/gm)].map((m) => Number(m[1]));
    expect(ports).to.include.members([7410, 7411, 7412, 7413, 7414, 7420, 7430, 7440, 7450, 7460, 7480]);
    const socket = join(data, "client", "run", "daemon.sock");
    expect(existsSync(socket)).to.equal(true);
    expect(net.services).to.have.length(13);

    net.main.kill("SIGKILL");
    await net.exited;
    await waitFor(() => net.services.every((s) => gone(s.pid)), 6_000, "every service to end with its launcher");
    for (const port of ports) expect(await portFree(port), `port ${port} is free`).to.equal(true);
    // The daemon stopped cleanly: it removed its socket.
    expect(existsSync(socket)).to.equal(false);
  });
});
