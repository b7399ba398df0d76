// A TCP proxy that delays every chunk it forwards, in each direction, by a
// fixed time: the cardholder's distance from the payment server, without tc
// netem. Each direction keeps its own queue, so bytes leave in the order
// they came; a connection's end is delayed like its data. It counts
// connections, chunks and bytes, and how late its timers fired (a busy event
// loop stretches the delay, and the report should say by how much).

import { fork, type ChildProcess } from "node:child_process";
import { once } from "node:events";
import { createServer, connect, type Server, type Socket } from "node:net";
import { performance } from "node:perf_hooks";
import { percentile } from "./load.js";

export interface ProxyCounts {
  connections: number;
  /** Towards the server (the payment server or the remote reader). */
  bytesUp: number;
  chunksUp: number;
  bytesDown: number;
  chunksDown: number;
}

export interface ProxyStats extends ProxyCounts {
  delayMs: number;
  /** How much later than due chunks were forwarded, ms (timer and event loop lag). */
  latenessP50Ms: number;
  latenessP99Ms: number;
}

/** What the benchmark needs of a delay proxy, in its own process or in this one. */
export interface DelayPath {
  readonly address: string;
  forwardTo(address: string): void;
  stats(): Promise<ProxyStats>;
  close(): Promise<void>;
}

/** Lateness samples kept for the percentiles: enough for a p99, bounded in memory. */
const LATENESS_SAMPLES = 20_000;

/** Source bytes waiting in one direction's queue beyond which the source is paused. */
const HIGH_WATER_BYTES = 1 << 20;

export class DelayProxy {
  private target: { host: string; port: number } | undefined;
  private readonly sockets = new Set<Socket>();
  private readonly timers = new Set<NodeJS.Timeout>();
  private readonly lateness: number[] = [];
  private readonly counts: ProxyCounts = { connections: 0, bytesUp: 0, chunksUp: 0, bytesDown: 0, chunksDown: 0 };

  private constructor(
    private readonly server: Server,
    readonly delayMs: number,
  ) {}

  /** A proxy in a child process (bench/delay-proxy-process.ts), so that this process's load cannot make it late. */
  static async fork(delayMs: number): Promise<DelayPath> {
    const child = fork(new URL("./delay-proxy-process.ts", import.meta.url), [String(delayMs)], {
      execArgv: ["--import", "tsx"],
      stdio: ["ignore", "inherit", "inherit", "ipc"],
    });
    const [first] = (await Promise.race([
      once(child, "message"),
      once(child, "exit").then(([code]) => Promise.reject(new Error(`the delay proxy process exited with ${String(code)} before listening`))),
    ])) as [{ address: string }];
    return new ProxyProcess(child, first.address);
  }

  /** Listens on a free loopback port; forwardTo() names the target before anyone connects. */
  static async start(delayMs: number): Promise<DelayProxy> {
    const server = createServer({ noDelay: true });
    const proxy = new DelayProxy(server, delayMs);
    server.on("connection", (s) => proxy.accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    return proxy;
  }

  /** host:port that clients connect to instead of the target. */
  get address(): string {
    const a = this.server.address();
    if (!a || typeof a === "string") throw new Error("the delay proxy is not listening");
    return `127.0.0.1:${a.port}`;
  }

  /** The target may be known only after the proxy's own address was handed out (merchants advertise it at start). */
  forwardTo(address: string): void {
    const i = address.lastIndexOf(":");
    this.target = { host: address.slice(0, i), port: Number(address.slice(i + 1)) };
  }

  statsNow(): ProxyStats {
    const sorted = [...this.lateness].sort((a, b) => a - b);
    return { ...this.counts, delayMs: this.delayMs, latenessP50Ms: percentile(sorted, 0.5), latenessP99Ms: percentile(sorted, 0.99) };
  }

  async close(): Promise<void> {
    for (const t of this.timers) clearTimeout(t);
    this.timers.clear();
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(client: Socket): void {
    if (!this.target) {
      client.destroy();
      return;
    }
    this.counts.connections++;
    const upstream = connect({ ...this.target, noDelay: true });
    for (const s of [client, upstream]) {
      this.sockets.add(s);
      s.once("close", () => this.sockets.delete(s));
      // Either side failing ends both: a half-open proxied connection would only hang the caller.
      s.once("error", () => {
        client.destroy();
        upstream.destroy();
      });
    }
    this.relay(client, upstream, "Up");
    this.relay(upstream, client, "Down");
  }

  /** Forwards `from` to `to`, each chunk (and the end) `delayMs` after it arrived, in arrival order. */
  private relay(from: Socket, to: Socket, direction: "Up" | "Down"): void {
    const queue: { due: number; chunk: Buffer | undefined }[] = [];
    let queuedBytes = 0;
    let timer: NodeJS.Timeout | undefined;
    const schedule = () => {
      const wait = Math.max(1, Math.ceil(queue[0]!.due - performance.now()));
      timer = setTimeout(flush, wait);
      this.timers.add(timer);
    };
    const flush = () => {
      this.timers.delete(timer!);
      timer = undefined;
      const now = performance.now();
      while (queue.length && queue[0]!.due <= now) {
        const { due, chunk } = queue.shift()!;
        this.noteLateness(now - due);
        if (chunk === undefined) {
          if (to.writable) to.end();
          continue;
        }
        queuedBytes -= chunk.length;
        if (to.writable) to.write(chunk);
      }
      if (from.isPaused() && queuedBytes < HIGH_WATER_BYTES && to.writableLength < HIGH_WATER_BYTES) from.resume();
      if (queue.length) schedule();
    };
    const enqueue = (chunk: Buffer | undefined) => {
      queue.push({ due: performance.now() + this.delayMs, chunk });
      if (!timer) schedule();
    };
    from.on("data", (chunk: Buffer) => {
      this.counts[`bytes${direction}` as const] += chunk.length;
      this.counts[`chunks${direction}` as const]++;
      queuedBytes += chunk.length;
      enqueue(chunk);
      // Bounded memory: stop reading while too much waits (in our queue or in the socket's).
      if (queuedBytes >= HIGH_WATER_BYTES || to.writableLength >= HIGH_WATER_BYTES) from.pause();
    });
    to.on("drain", () => {
      if (from.isPaused() && queuedBytes < HIGH_WATER_BYTES) from.resume();
    });
    from.once("end", () => enqueue(undefined));
  }

  private noteLateness(ms: number): void {
    if (this.lateness.length < LATENESS_SAMPLES) this.lateness.push(ms);
    else this.lateness[Math.floor(Math.random() * LATENESS_SAMPLES)] = ms; // a uniform-ish sample of a long run
  }
}

/** The parent's handle on a forked DelayProxy. */
class ProxyProcess implements DelayPath {
  constructor(
    private readonly child: ChildProcess,
    readonly address: string,
  ) {}

  forwardTo(address: string): void {
    this.child.send({ forwardTo: address });
  }

  async stats(): Promise<ProxyStats> {
    const reply = once(this.child, "message") as Promise<[{ stats: ProxyStats }]>;
    this.child.send({ stats: true });
    return (await reply)[0].stats;
  }

  async close(): Promise<void> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return;
    const exited = once(this.child, "exit");
    this.child.disconnect();
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 5000);
    await exited;
    clearTimeout(timer);
  }
}
