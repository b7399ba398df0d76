// Starts netpurse services as separate processes, learns the address each
// bound from its "listening on" line, keeps their logs in files, says when
// one dies unasked, and stops them cleanly. Each child holds an IPC channel
// to the launcher and stops when it closes, so no service outlives its
// launcher, even one killed with SIGKILL. The main job, the end-to-end
// tests and the benchmarks use it.

import { spawn, type ChildProcess } from "node:child_process";
import { createWriteStream, mkdirSync, readFileSync, type WriteStream } from "node:fs";
import { join, resolve } from "node:path";
import { STATS_REQUEST, type ProcessStats } from "../../lib/stats.js";

const ROOT = resolve(new URL("../..", import.meta.url).pathname);
const TSX = import.meta.resolve("tsx");

/** Entry points of the parts, relative to the repository root. */
export const SCRIPTS = {
  concentrator: "services/concentrator/main.ts",
  terminal: "services/terminal/main.ts",
  payment: "services/payment/main.ts",
  merchantValidation: "services/merchant-validation/main.ts",
  merchant: "services/merchant/main.ts",
  benefits: "services/benefits/main.ts",
  clientDaemon: "client/daemon/main.ts",
  load: "services/load/main.ts",
  bank: "services/bank/main.ts",
  clearing: "services/clearing/main.ts",
  emulator: "services/emulator/main.ts",
} as const;

export interface Started {
  name: string;
  address: string;
  child: ChildProcess;
  logFile: string;
}

/** A service that ended without being asked to: how, and the last lines it wrote. */
export interface Death {
  name: string;
  code: number | null;
  signal: NodeJS.Signals | null;
  lastLines: string[];
  logFile: string;
}

/**
 * V8 flags every service runs with. A purchase allocates many short-lived
 * objects (messages, buffers, promises); with hundreds in flight, the default
 * young generation fills in a few milliseconds and each scavenge copies what
 * is still alive. A larger one collects the same garbage less often: at 64
 * PSAMs × 256 cardholders it raised purchases/s from about 145 to about 207
 * in one benchmark run (bench/README.md), for some 50 MiB more resident memory.
 */
export const SERVICE_NODE_FLAGS = ["--max-semi-space-size=32"];

/** How many of a child's last output lines the launcher keeps, for when it dies. */
const KEPT_LINES = 15;

export class Launcher {
  private readonly running = new Map<string, Started & { log: WriteStream }>();
  /** Children that have not printed their listening line yet: stopAll must reach them too. */
  private readonly starting = new Set<ChildProcess>();
  /** Children being stopped or killed on purpose: their exit is no death. */
  private readonly stopping = new Set<ChildProcess>();

  constructor(
    private readonly logDir: string,
    private readonly o: {
      echo?: (name: string, line: string) => void;
      env?: NodeJS.ProcessEnv;
      /** A started service ended without stop(), kill() or stopAll(). */
      onDeath?: (d: Death) => void;
    } = {},
  ) {
    mkdirSync(logDir, { recursive: true, mode: 0o700 });
  }

  /** Spawns `node --import tsx script args` and resolves once it prints its listening line. */
  /** Starts `script` as service `name`; `env` adds variables for this child alone. */
  start(name: string, script: string, args: string[], timeoutMs = 60_000, env: NodeJS.ProcessEnv = {}): Promise<Started> {
    if (this.running.has(name)) throw new Error(`${name} is running already`);
    const logFile = join(this.logDir, `${name}.log`);
    const log = createWriteStream(logFile, { flags: "a", mode: 0o600 });
    const child = spawn(process.execPath, [...SERVICE_NODE_FLAGS, "--import", TSX, join(ROOT, script), ...args], {
      cwd: ROOT,
      env: { ...process.env, ...this.o.env, ...env },
      // The IPC channel tells the child that the launcher is gone when it ends (lib/service-main.ts), and carries stats requests (lib/stats.ts).
      stdio: ["ignore", "pipe", "pipe", "ipc"],
    });
    this.starting.add(child);
    child.once("exit", () => this.starting.delete(child));
    const lastLines: string[] = [];
    return new Promise((resolveStart, reject) => {
      let buffered = "";
      const timer = setTimeout(() => fail(new Error(`${name} did not start within ${timeoutMs} ms`)), timeoutMs);
      const fail = (e: Error) => {
        clearTimeout(timer);
        child.kill("SIGKILL");
        const tail = safeTail(logFile);
        reject(new Error(`${e.message}${tail ? `\n--- last lines of ${logFile} ---\n${tail}` : ""}`));
      };
      const onLine = (line: string) => {
        log.write(line + "\n");
        if (lastLines.push(line) > KEPT_LINES) lastLines.shift();
        this.o.echo?.(name, line);
        const m = / listening on (\S+)/.exec(line);
        if (m && !this.running.has(name)) {
          clearTimeout(timer);
          this.starting.delete(child);
          const s = { name, address: m[1]!, child, logFile, log };
          this.running.set(name, s);
          resolveStart(s);
        }
      };
      const split = (chunk: Buffer) => {
        buffered += chunk.toString();
        let i;
        while ((i = buffered.indexOf("\n")) >= 0) {
          onLine(buffered.slice(0, i));
          buffered = buffered.slice(i + 1);
        }
      };
      child.stdout?.on("data", split);
      child.stderr?.on("data", split);
      child.on("exit", (code, signal) => {
        log.end();
        if (!this.running.has(name)) return fail(new Error(`${name} exited (${signal ?? `code ${code}`}) before it started`));
        this.running.delete(name);
        if (!this.stopping.delete(child)) this.o.onDeath?.({ name, code, signal, lastLines: [...lastLines], logFile });
      });
    });
  }

  get(name: string): Started | undefined {
    return this.running.get(name);
  }

  /** SIGTERM, then SIGKILL after `graceMs`. */
  async stop(name: string, graceMs = 5_000): Promise<void> {
    const s = this.running.get(name);
    if (!s) return;
    const exited = new Promise<void>((r) => s.child.once("exit", () => r()));
    this.stopping.add(s.child);
    s.child.kill("SIGTERM");
    const t = setTimeout(() => s.child.kill("SIGKILL"), graceMs);
    await exited;
    clearTimeout(t);
  }

  /** Kills at once, as a crash or a pulled cable would. */
  async kill(name: string): Promise<void> {
    const s = this.running.get(name);
    if (!s) return;
    const exited = new Promise<void>((r) => s.child.once("exit", () => r()));
    this.stopping.add(s.child);
    s.child.kill("SIGKILL");
    await exited;
  }

  /** Stops everything, in the reverse order of starting. */
  async stopAll(): Promise<void> {
    for (const child of this.starting) child.kill("SIGKILL");
    for (const name of [...this.running.keys()].reverse()) await this.stop(name);
  }

  pid(name: string): number | undefined {
    return this.running.get(name)?.child.pid;
  }

  /** Asks a running service for its figures (lib/stats.ts) over the IPC channel. */
  async stats(name: string, timeoutMs = 5_000): Promise<ProcessStats> {
    const m = await this.ask(name, { type: STATS_REQUEST }, timeoutMs);
    if (!m.stats) throw new Error(`${name} answered without its figures`);
    return m.stats;
  }

  private requests = 0;

  private ask(name: string, request: { type: string } & Record<string, unknown>, timeoutMs: number): Promise<{ stats?: ProcessStats; error?: string }> {
    const s = this.running.get(name);
    if (!s) return Promise.reject(new Error(`${name} is not running`));
    const id = ++this.requests;
    return new Promise((resolve, reject) => {
      const onMessage = (m: { type?: string; id?: number; stats?: ProcessStats; error?: string }) => {
        if (m.type !== request.type || m.id !== id) return;
        done();
        resolve(m);
      };
      const timer = setTimeout(() => {
        done();
        reject(new Error(`${name} did not answer ${request.type} within ${timeoutMs} ms`));
      }, timeoutMs);
      const done = () => {
        clearTimeout(timer);
        s.child.off("message", onMessage);
      };
      s.child.on("message", onMessage);
      s.child.send({ ...request, id });
    });
  }

  /** The services running now (started and not ended), in the order they started. */
  names(): string[] {
    return [...this.running.keys()];
  }
}

function safeTail(file: string): string {
  try {
    return readFileSync(file, "utf8").trimEnd().split("\n").slice(-15).join("\n");
  } catch {
    return "";
  }
}

/**
 * Starts the whole network as processes on the given addresses (port 0
 * picks free ones) over an existing data folder.
 */
export async function launchNetwork(
  l: Launcher,
  p: {
    data: string;
    terminals: { id: string; args?: string[] }[];
    /** Merchant ids, each with its address (default: a free port). */
    merchants: { id: string; listen?: string }[];
    /** Benefits sites (DATA/benefits/ID), each with its address; started before the merchants, which grant points at them. */
    sites?: { id: string; listen?: string }[];
    /** Where each listens (default: a free loopback port). The client daemon serves its Unix socket (DATA/client/run/daemon.sock) and, only if given here, loopback TCP with its token. */
    listen?: Partial<Record<"concentrator" | "payment" | "merchantValidation" | "clientDaemon" | "bank" | "load" | "clearing", string>>;
    cardPath: string;
    paymentArgs?: string[];
    /** The payment server address merchants name in their offers (default: the payment server's own), e.g. a proxy in front of it. */
    offerPaymentServer?: string;
    /** Plaintext and no authentication on every link (--insecure), for debugging only. */
    insecure?: boolean;
    /** The card and the PSAMs behind PC/SC: the daemon takes the first reader holding a netpurse card, each terminal host the readers matching this pattern. */
    psamReaders?: string;
    /** Concentrators (default 1): concentrator-1 on `listen.concentrator`, the others on the ports after it (or free ones). */
    concentrators?: number;
    /** Payment servers (default 1): replicas of payment-1 sharing `database`, on `listen.payment` and the ports after it (or free ones). */
    paymentServers?: number;
    /** The PostgreSQL database every service with a store keeps its state in (a schema each); default: their SQLite files. */
    database?: string;
  },
): Promise<Record<string, string>> {
  const at = (k: keyof NonNullable<typeof p.listen>, i = 0) => {
    const base = p.listen?.[k] ?? "127.0.0.1:0";
    const m = /^(.*):(\d+)$/.exec(base);
    // The n-th of several: the port n after the first's, unless the first's is chosen freely (0).
    return i === 0 || !m || m[2] === "0" ? base : `${m[1]}:${Number(m[2]) + i}`;
  };
  const data = ["--data", p.data, ...(p.insecure ? ["--insecure"] : [])];
  // The database's URL holds its password: it goes to the services in their environment, never on a command line others may read (ps).
  const store = p.database !== undefined ? { NETPURSE_DATABASE_URL: p.database } : {};
  const startWithStore = (name: string, script: string, args: string[]) => l.start(name, script, args, undefined, store);
  const addresses: Record<string, string> = {};
  const concentrators: string[] = [];
  for (let i = 0; i < (p.concentrators ?? 1); i++) {
    const id = `concentrator-${i + 1}`;
    const started = await l.start(i === 0 ? "concentrator" : id, SCRIPTS.concentrator, ["--listen", at("concentrator", i), "--id", id, ...data]);
    concentrators.push(started.address);
    addresses[i === 0 ? "concentrator" : `concentrator:${i + 1}`] = started.address;
  }
  const concentratorList = concentrators.join(",");
  // Clearing before those who send to it: terminal hosts submit their closed batches, the load server its settled loads.
  const clearing = (await startWithStore("clearing", SCRIPTS.clearing, ["--listen", at("clearing"), ...data])).address;
  addresses.clearing = clearing;
  await Promise.all(
    p.terminals.map((t) =>
      l.start(t.id, SCRIPTS.terminal, [
        "--id",
        t.id,
        "--concentrator",
        concentratorList,
        "--clearing",
        clearing,
        ...data,
        ...(p.psamReaders !== undefined ? ["--psam-readers", p.psamReaders] : []),
        ...(t.args ?? []),
      ]),
    ),
  );
  const replicas = p.paymentServers ?? 1;
  const payments: string[] = [];
  for (let i = 0; i < replicas; i++) {
    // Replicas are one payment server, payment-1 (one identity, one database), each stream at the concentrators named by its replica id.
    const started = await startWithStore(i === 0 ? "payment" : `payment-r${i + 1}`, SCRIPTS.payment, [
      "--listen",
      at("payment", i),
      "--concentrator",
      concentratorList,
      ...(replicas > 1 ? ["--replica", `r${i + 1}`] : []),
      ...data,
      ...(p.paymentArgs ?? []),
    ]);
    payments.push(started.address);
    if (replicas > 1) addresses[`payment:r${i + 1}`] = started.address;
  }
  // Callers reach the replicas as one target, balanced round robin on their side.
  const payment = { address: payments.join(",") };
  addresses.payment = payment.address;
  const validation = await startWithStore("merchant-validation", SCRIPTS.merchantValidation, [
    "--listen",
    at("merchantValidation"),
    "--payment-server",
    payment.address,
    ...data,
  ]);
  addresses.merchantValidation = validation.address;
  for (const s of p.sites ?? []) {
    const site = await startWithStore(`benefits-${s.id}`, SCRIPTS.benefits, [
      "--listen",
      s.listen ?? "127.0.0.1:0",
      "--id",
      s.id,
      "--validation",
      validation.address,
      "--payment-server",
      p.offerPaymentServer ?? payment.address,
      ...data,
    ]);
    addresses[`benefits:${s.id}`] = site.address;
  }
  const merchants = await Promise.all(
    p.merchants.map((m) =>
      startWithStore(`merchant-${m.id}`, SCRIPTS.merchant, [
        "--listen",
        m.listen ?? "127.0.0.1:0",
        "--id",
        m.id,
        "--validation",
        validation.address,
        "--payment-server",
        p.offerPaymentServer ?? payment.address,
        ...data,
      ]),
    ),
  );
  p.merchants.forEach((m, i) => (addresses[`merchant:${m.id}`] = merchants[i]!.address));
  addresses.load = (await startWithStore("load", SCRIPTS.load, ["--listen", at("load"), "--clearing", clearing, ...data])).address;
  addresses.bank = (await startWithStore("bank", SCRIPTS.bank, ["--listen", at("bank"), "--load-server", addresses.load, ...data])).address;
  const daemonTcp = p.listen?.clientDaemon ? ["--listen-tcp", p.listen.clientDaemon] : [];
  // The daemon's address is its socket, unix:PATH.
  const card = p.psamReaders !== undefined ? ["--pcsc"] : ["--card", p.cardPath];
  addresses.clientDaemon = (await l.start("client-daemon", SCRIPTS.clientDaemon, [...card, ...data, ...daemonTcp])).address;
  return addresses;
}
