// Issue #9, items 6-7: the limits of lib/grpc/server.ts hold under abuse.
// The attack measured before that work: about 20,000 half-open connections
// exhausted a server's open files; new connections were reset, its health
// check failed, and its memory went from 184 to 563 MiB and stayed there.
// Here the real payment server (TLS, its own TCP listener handing
// connections to grpc-js) runs in this process with small limits, and is
// flooded from this process with raw sockets, then abused one connection at
// a time: idle, silent after TLS, too many streams, too large a message.
//
// NETPURSE_FLOOD_CONNECTIONS=20000 floods at the size of the attack, in
// about 40 s (the default, 2,000, is already 30 times the cap and keeps the
// file at about 15 s in npm test). Linux only (/proc).

import * as grpc from "@grpc/grpc-js";
import { expect } from "chai";
import { ClientError, createChannel, createClient, Status, type Channel } from "nice-grpc";
import { HealthDefinition } from "nice-grpc-server-health";
import { randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { once } from "node:events";
import { createServer as createTcpServer, connect as tcpConnect, type AddressInfo, type Socket } from "node:net";
import { endianness } from "node:os";
import { performance } from "node:perf_hooks";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { DEFAULT_LIMITS } from "../../lib/grpc/server.js";
import { channelCredentials } from "../../lib/grpc/tls.js";
import { pkiPaths } from "../../lib/pki/authority.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { ensureDemoData, paths } from "../../services/network/layout.js";
import { psamRegistryPath } from "../../services/network/pki.js";
import { startPaymentServer } from "../../services/payment/server.js";
import { failure } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";
import { testSecurity, waitFor, type TestSecurity } from "../support/network.js";

/** The payment server's limits here: small, so that the flood is many times the cap and every timer fires within seconds. */
const LIMITS = { maxConnections: 64, maxConnectionsPerAddress: 16, handshakeTimeoutMs: 1_000, idleTimeoutMs: 1_500, maxConcurrentStreams: 4 };
/**
 * The flood's source addresses (Linux routes all of 127.0.0.0/8 to loopback):
 * sixteen hosts, so that together they reach maxConnections; the test's own
 * channels come from 127.0.0.1.
 */
const FLOOD_SOURCES = Array.from({ length: 16 }, (_, i) => `127.0.0.${i + 2}`);
const FLOOD = Number(process.env.NETPURSE_FLOOD_CONNECTIONS ?? 2_000);
if (!Number.isInteger(FLOOD) || FLOOD <= LIMITS.maxConnections) throw new Error(`NETPURSE_FLOOD_CONNECTIONS must be a number above ${LIMITS.maxConnections}`);
const MiB = 1024 * 1024;
/** Time allowed past a timer for the event loop of a loaded 2-core machine (measured: a few ms when idle). */
const SLACK_MS = 500;
/**
 * Growth of this process's RSS (after a full GC) that a flood may cause. Before
 * the limits the attack took the server from 184 to 563 MiB (+379) and kept it.
 * Measured with the limits, both ends of every socket being in this process:
 * -10 to +15 MiB for 2,000 connections, +6 to +32 MiB for 20,000 (the peak
 * during a burst of 19,436 client sockets, ~400 MiB, is returned after); five
 * floods of 20,000 in a row do not add up (RSS 144, 172, 164, 151, 152, 149
 * MiB): what remains is the V8 heap's and malloc's spare pages, not
 * connections. 64 MiB is twice the largest growth measured and a sixth of the
 * attack's. The heap in use is the sharper measure of a leak: +0 to +6 MiB
 * measured, bounded at 16.
 */
const RSS_GROWTH_MAX = 64 * MiB;
const HEAP_GROWTH_MAX = 16 * MiB;
const SERVING = 1; // grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING

setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;

/** RSS and heap in use after a full collection, so that garbage not yet collected does not count as growth. */
function memory(): { rss: number; heapUsed: number } {
  gc();
  gc();
  const { rss, heapUsed } = process.memoryUsage();
  return { rss, heapUsed };
}

/** This process's limit of open files (Linux; the soft limit, which Node raises to the hard one at start). */
function openFilesLimit(): number {
  const line = readFileSync("/proc/self/limits", "utf8")
    .split("\n")
    .find((l) => l.startsWith("Max open files"));
  const soft = Number(line?.split(/\s+/)[3]);
  return Number.isFinite(soft) ? soft : 1_024;
}

/** The server's address: it listens here, and the flood and the test's channels connect here. */
const SERVER_HOST = "127.0.0.1";

/**
 * An address:port of /proc/net/tcp{,6} ("0100007F:AEB7": each 32-bit word of
 * the address in the host's byte order) as "127.0.0.1:44727"; an IPv4-mapped
 * IPv6 address as its IPv4 one.
 */
function procEndpoint(field: string): string {
  const [hexAddress = "", hexPort = ""] = field.split(":");
  const bytes = Buffer.from(hexAddress, "hex");
  if (endianness() === "LE") for (let i = 0; i < bytes.length; i += 4) bytes.subarray(i, i + 4).reverse();
  const mapped = bytes.length === 16 && bytes.subarray(0, 10).every((b) => b === 0) && bytes.readUInt16BE(10) === 0xffff;
  const v4 = bytes.length === 4 ? bytes : mapped ? bytes.subarray(12) : undefined;
  const address = v4 ? [...v4].join(".") : (bytes.toString("hex").match(/.{4}/g) ?? []).join(":");
  return `${address}:${parseInt(hexPort, 16)}`;
}

/**
 * The server's side of its connections as the kernel holds them: sockets
 * whose local end is the server's address and port (not the listener, not
 * TIME_WAIT, which holds no file) from /proc/net/tcp — established ones,
 * accepted or still in the accept queue, and handshakes under way (SYN_RECV).
 * The port alone is not the server's: a socket bound to another loopback
 * address may get the same port number (the kernel allows it, the addresses
 * differ), and a flood socket that got it, left connected for the client
 * only (a ghost, see `flood`), would be counted as long as it is open.
 */
function serverSideSockets(port: number): number {
  const server = `${SERVER_HOST}:${port}`;
  let n = 0;
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    for (const line of text.split("\n").slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (local !== undefined && state !== "0A" && state !== "06" && procEndpoint(local) === server) n++;
    }
  }
  return n;
}

const max = (xs: number[]) => xs.reduce((m, x) => Math.max(m, x), 0);
const ms = (x: number) => `${Math.round(x)} ms`;
const mib = (x: number) => `${(x / MiB).toFixed(1)} MiB`;
const signed = (x: number) => (x >= 0 ? "+" : "") + mib(x);

interface Flood {
  /** Sockets opened; sockets whose TCP handshake completed (for the client). */
  opened: number;
  connected: number;
  /** For each socket the server closed: ms from its connection to its close. */
  lifetimes: number[];
  /** Most connections the server held at once (RunningServer.connections(), sampled every 5 ms). */
  maxHeld: number;
  /** Most client sockets open at once in this process. */
  maxOpen: number;
  /** ms from the first socket opened to the server's side of all of them gone. */
  durationMs: number;
  /** Sockets left open for the client though the server held nothing for them (destroyed by the test): see `burst`. */
  ghosts: number;
  /** Sockets whose handshake never completed: the kernel dropped their SYNs (destroyed by the test). */
  unanswered: number;
  rssBefore: number;
  rssPeak: number;
  rssAfter: number;
  heapBefore: number;
  heapAfter: number;
}

/**
 * Opens `n` raw TCP connections to the server that send `payload` (or
 * nothing) and never close themselves, and waits until the server's side of
 * every one is gone.
 *
 * `steady`: keeps maxConnections + 64 sockets open, opening a new one as soon
 * as the server closes one: the flood runs as fast as the server sheds
 * connections (here, where the flood shares the server's event loop, faster
 * would only fill the kernel's accept queue, since libuv accepts one
 * connection per turn of the loop: libuv PR #3696). Every socket reaches the
 * server at once, so that the time each lives is the server's doing alone.
 *
 * `burst`: all at once (up to this process's file limit), as the attack did.
 * The kernel's accept queue (511) overflows: it drops SYNs, which the client
 * retries 1, 3, 7, 15... s later, and completes some handshakes with SYN
 * cookies whose last ACK it then drops, keeping no state: the client thinks
 * them connected, the server holds nothing for them ("ghosts", which nobody
 * closes since nobody knows of them). So the end is when neither grpc-js nor
 * the kernel has held any connection on the port for 2 s (serverSideSockets);
 * what the client still holds then is destroyed, and lifetimes include the
 * kernel's retries.
 */
async function flood(
  port: number,
  n: number,
  o: { mode: "steady" | "burst"; payload?: Buffer; held: () => Promise<number>; deadlineMs: number; from?: string[] },
): Promise<Flood> {
  const before = memory();
  const r: Flood = {
    ...{ opened: 0, connected: 0, lifetimes: [], maxHeld: 0, maxOpen: 0, durationMs: 0, ghosts: 0, unanswered: 0 },
    ...{ rssBefore: before.rss, rssPeak: before.rss, rssAfter: 0, heapBefore: before.heapUsed, heapAfter: 0 },
  };
  const concurrency = o.mode === "steady" ? LIMITS.maxConnections + 64 : Math.min(n, openFilesLimit() - LIMITS.maxConnections - 500);
  const open = new Set<Socket>();
  const connected = new Set<Socket>();
  let refill = () => undefined as void;
  const openOne = () => {
    r.opened++;
    const from = o.from ?? FLOOD_SOURCES;
    const s = tcpConnect({ port, host: SERVER_HOST, localAddress: from[r.opened % from.length] });
    open.add(s);
    r.maxOpen = Math.max(r.maxOpen, open.size);
    let connectedAt: number | undefined;
    s.on("connect", () => {
      connectedAt = performance.now();
      connected.add(s);
      r.connected++;
      if (o.payload) s.write(o.payload);
    });
    s.on("error", () => undefined); // ECONNRESET: the server's close is what is measured
    s.resume(); // reads (and drops) what the server sends, so that its close is seen
    s.on("close", () => {
      open.delete(s);
      connected.delete(s);
      if (connectedAt !== undefined) r.lifetimes.push(performance.now() - connectedAt);
      refill();
    });
  };
  const t0 = performance.now();
  let sampling = true;
  const sampler = (async () => {
    while (sampling) {
      r.maxHeld = Math.max(r.maxHeld, await o.held());
      r.rssPeak = Math.max(r.rssPeak, process.memoryUsage().rss);
      await new Promise((res) => setTimeout(res, 5));
    }
  })();
  /** Neither grpc-js nor the kernel has held a connection on the port for `forMs`. */
  const serverClear = (forMs: number) => {
    let since: number | undefined;
    return async () => {
      if ((await o.held()) !== 0 || serverSideSockets(port) !== 0) since = undefined;
      else since ??= performance.now();
      return since !== undefined && performance.now() - since >= forMs;
    };
  };
  try {
    if (o.mode === "steady") {
      let scheduled = false;
      refill = () => {
        if (scheduled) return;
        scheduled = true;
        setImmediate(() => {
          scheduled = false;
          while (r.opened < n && open.size < concurrency) openOne();
        });
      };
      refill();
      await waitFor(() => r.opened === n && open.size === 0, o.deadlineMs, `the server to close all ${n} connections`);
    } else {
      while (r.opened < n) {
        while (r.opened < n && open.size < concurrency) openOne();
        const clear = serverClear(2_000);
        await waitFor(async () => open.size === 0 || (await clear()), o.deadlineMs, "the server's side of every connection to be gone");
        for (const s of open) {
          // A ghost is reset: a FIN would carry a valid SYN cookie, and the kernel would then make the connection after all.
          if (connected.has(s)) {
            r.ghosts++;
            s.resetAndDestroy();
          } else {
            r.unanswered++;
            s.destroy();
          }
        }
        await waitFor(() => open.size === 0, 5_000, "the test's own sockets to close");
      }
    }
    await waitFor(serverClear(500), 10_000, "the server's side of the connections to be gone");
    r.durationMs = performance.now() - t0;
  } finally {
    sampling = false;
    await sampler;
    for (const s of open) s.destroy();
  }
  await new Promise((res) => setTimeout(res, 500)); // the server's last closes and timers
  ({ rss: r.rssAfter, heapUsed: r.heapAfter } = memory());
  return r;
}

function report(name: string, r: Flood) {
  const held = r.lifetimes.filter((x) => x >= LIMITS.handshakeTimeoutMs / 2).length;
  console.log(
    `      ${name}: ${r.opened} sockets (at most ${r.maxOpen} open at once here; file limit ${openFilesLimit()}), ${r.connected} connected;` +
      ` the server held at most ${r.maxHeld} at once (cap ${LIMITS.maxConnections}); closed by the server: ${r.lifetimes.length - held} at once,` +
      ` ${held} after >= ${ms(LIMITS.handshakeTimeoutMs / 2)}, longest ${ms(max(r.lifetimes))}; ghosts ${r.ghosts}, unanswered ${r.unanswered}; all gone in ${ms(r.durationMs)};` +
      ` RSS ${mib(r.rssBefore)} -> peak ${mib(r.rssPeak)} -> ${mib(r.rssAfter)} (${signed(r.rssAfter - r.rssBefore)}),` +
      ` heap in use ${mib(r.heapBefore)} -> ${mib(r.heapAfter)} (${signed(r.heapAfter - r.heapBefore)})`,
  );
}

// HTTP/2 frames (RFC 9113) for a client that ignores the server's settings.
const H2 = { DATA: 0x0, HEADERS: 0x1, RST_STREAM: 0x3, SETTINGS: 0x4, GOAWAY: 0x7, END_STREAM: 0x1, END_HEADERS: 0x4, ACK: 0x1 };
const frame = (type: number, flags: number, stream: number, payload: Buffer = Buffer.alloc(0)) => {
  const h = Buffer.alloc(9);
  h.writeUIntBE(payload.length, 0, 3);
  h.writeUInt8(type, 3);
  h.writeUInt8(flags, 4);
  h.writeUInt32BE(stream, 5);
  return Buffer.concat([h, payload]);
};
/** A header block of literal fields without indexing (HPACK, RFC 7541 6.2.2), no Huffman; every length below 127. */
const hpack = (headers: [string, string][]) =>
  Buffer.concat(headers.flatMap(([k, v]) => [Buffer.from([0x00, k.length]), Buffer.from(k), Buffer.from([v.length]), Buffer.from(v)]));

describe("contract: connection limits under abuse (issue #9)", function () {
  this.timeout(180_000);
  let cleanup: () => Promise<void>;
  let security: TestSecurity;
  let concentrator: Awaited<ReturnType<typeof startConcentrator>>;
  let payment: Awaited<ReturnType<typeof startPaymentServer>>;
  let port: number;
  const channels: Channel[] = [];

  before(async () => {
    const t = await tempDir("netpurse-limits-");
    cleanup = t.cleanup;
    await ensureDemoData(t.dir, { terminals: [], shops: [], card: { name: "demo", value: 0, maxBalance: 50_000, expiry: "2031-12-31" } });
    security = await testSecurity(t.dir);
    concentrator = await startConcentrator({
      security: await security.of("concentrator", "concentrator-1"),
      psamRegistry: psamRegistryPath(t.dir),
      listen: "127.0.0.1:0",
    });
    payment = await startPaymentServer({
      security: await security.of("payment", "payment-1"),
      listen: `${SERVER_HOST}:0`,
      dir: paths(t.dir).payment,
      concentrator: concentrator.address,
      limits: LIMITS,
    });
    port = Number(payment.address.slice(payment.address.lastIndexOf(":") + 1));
  });
  after(async () => {
    for (const c of channels) c.close();
    await payment?.close();
    await concentrator?.close();
    await cleanup?.();
  });

  /** A new TLS channel to the payment server, as a cardholder (CA only) or as the operator (for GetPurchase). */
  const channel = async (as: "cardholder" | "operator" = "cardholder") => {
    const sec = as === "operator" ? await security.of("operator", "operator") : security.cardholder;
    const c = openChannel(payment.address, sec.channel({ kind: "payment" }));
    channels.push(c);
    return c;
  };

  /** The payment server serves: health SERVING over a new TLS connection, and GetPurchase answered by its handler. */
  async function expectServing() {
    const health = clientFactory().create(HealthDefinition, await channel());
    expect((await health.check({ service: "netpurse.payment.v1.PaymentService" }, { deadline: 5_000 })).status).to.equal(SERVING);
    const client = clientFactory().create(PaymentServiceDefinition, await channel("operator"));
    const f = await failure(client.getPurchase({ transactionId: { value: randomUUID() } }, { deadline: 5_000 }));
    expect(f, f.details).to.include({ code: "NOT_FOUND", reason: "NOT_FOUND" });
  }

  async function closeChannels() {
    for (const c of channels.splice(0)) c.close();
    await waitFor(async () => (await payment.connections()) === 0, 5_000, "the test's own connections to close");
  }

  const held = () => payment.connections();

  describe("a flood of connections", () => {
    before(async () => {
      // Warm up (code loaded, TLS contexts built, JIT) so that the RSS measured is the flood's alone.
      await expectServing();
      await flood(port, 200, { mode: "steady", held, deadlineMs: 10_000 });
      await closeChannels();
    });
    afterEach(closeChannels);

    it(`half-open, ${FLOOD} TCP connections that never send a byte: at most maxConnections held, the rest closed at once, each held closed after handshakeTimeoutMs, memory bounded, the server healthy after`, async () => {
      const r = await flood(port, FLOOD, { mode: "steady", held, deadlineMs: 60_000 });
      report("half-open, steady", r);
      expect(r.connected).to.equal(FLOOD);
      expect(r.maxHeld, "connections held at once").to.equal(LIMITS.maxConnections);
      // Each socket was either refused at once (over the cap) or held until its handshake timed out, never longer.
      const refused = r.lifetimes.filter((x) => x < LIMITS.handshakeTimeoutMs / 2);
      const timedOut = r.lifetimes.filter((x) => x >= LIMITS.handshakeTimeoutMs / 2);
      expect(refused.length).to.be.at.least(FLOOD - LIMITS.maxConnections * (Math.ceil(r.durationMs / LIMITS.handshakeTimeoutMs) + 1));
      expect(max(refused)).to.be.below(SLACK_MS);
      expect(Math.min(...timedOut)).to.be.at.least(LIMITS.handshakeTimeoutMs - 50);
      expect(max(timedOut)).to.be.below(LIMITS.handshakeTimeoutMs + SLACK_MS);
      expect(r.rssAfter - r.rssBefore, "RSS growth").to.be.below(RSS_GROWTH_MAX);
      expect(r.heapAfter - r.heapBefore, "heap growth").to.be.below(HEAP_GROWTH_MAX);
      await expectServing();
    });

    it(`half-open, ${FLOOD} TCP connections opened all at once: at most maxConnections held, the server's side of every one gone once the kernel's retries end, memory bounded, the server healthy after`, async () => {
      // A connection that is not the server's but has the server's port number as its own (bound to another loopback
      // address, as a flood socket sometimes is by chance), open throughout: it must not count as the server's side.
      const elsewhere = createTcpServer((c) => c.on("error", () => undefined)).listen(0, SERVER_HOST);
      await once(elsewhere, "listening");
      const bystander = tcpConnect({ port: (elsewhere.address() as AddressInfo).port, host: SERVER_HOST, localAddress: "127.0.0.250", localPort: port });
      bystander.on("error", () => undefined);
      try {
        await once(bystander, "connect");
        expect(serverSideSockets(port), "the server's side of its connections, with a bystander on its port number").to.equal(0);
        const r = await flood(port, FLOOD, { mode: "burst", held, deadlineMs: 150_000 });
        report("half-open, all at once", r);
        expect(r.maxHeld, "connections held at once").to.be.at.most(LIMITS.maxConnections);
        expect(r.rssAfter - r.rssBefore, "RSS growth").to.be.below(RSS_GROWTH_MAX);
        expect(r.heapAfter - r.heapBefore, "heap growth").to.be.below(HEAP_GROWTH_MAX);
      } finally {
        bystander.destroy();
        await new Promise((res) => elsewhere.close(res));
      }
      await expectServing();
    });

    it(`garbage, ${FLOOD} TCP connections that send bytes that are not TLS: each closed at once, the server healthy after`, async () => {
      const r = await flood(port, FLOOD, { mode: "steady", payload: Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), held, deadlineMs: 60_000 });
      report("garbage, steady", r);
      expect(r.connected).to.equal(FLOOD);
      expect(r.maxHeld).to.be.at.most(LIMITS.maxConnections);
      // Closed by the failed TLS handshake (or refused over the cap), not by its timeout.
      expect(max(r.lifetimes)).to.be.below(Math.min(SLACK_MS, LIMITS.handshakeTimeoutMs / 2));
      expect(r.rssAfter - r.rssBefore, "RSS growth").to.be.below(RSS_GROWTH_MAX);
      expect(r.heapAfter - r.heapBefore, "heap growth").to.be.below(HEAP_GROWTH_MAX);
      await expectServing();
    });
  });

  it("one source flooding holds at most maxConnectionsPerAddress: a cardholder from another address is served while it floods", async () => {
    // The attacker keeps twice maxConnections half-open connections from one address, reopening each the server closes.
    let attacking = true;
    let opened = 0;
    const sockets = new Set<Socket>();
    const openOne = () => {
      if (!attacking) return;
      opened++;
      const s = tcpConnect({ port, host: "127.0.0.1", localAddress: "127.0.0.99" });
      sockets.add(s);
      s.on("error", () => undefined);
      s.resume();
      s.on("close", () => {
        sockets.delete(s);
        setImmediate(openOne);
      });
    };
    for (let i = 0; i < 2 * LIMITS.maxConnections; i++) openOne();
    let maxHeld = 0;
    const sampler = setInterval(() => {
      held().then(
        (n) => (maxHeld = Math.max(maxHeld, n)),
        () => undefined,
      );
    }, 5);
    try {
      await waitFor(async () => (await held()) >= Math.min(LIMITS.maxConnectionsPerAddress, LIMITS.maxConnections), 5_000, "the flood to take its slots");
      await expectServing();
      expect(attacking, "the flood still running").to.equal(true);
    } finally {
      attacking = false;
      clearInterval(sampler);
      for (const s of sockets) s.destroy();
    }
    console.log(
      `      one source flooding: ${opened} connections opened, the server held at most ${maxHeld} at once (cap per address ${LIMITS.maxConnectionsPerAddress})`,
    );
    expect(opened).to.be.above(2 * LIMITS.maxConnections);
    // The flood's share, plus the two channels of expectServing.
    expect(maxHeld).to.be.at.most(LIMITS.maxConnectionsPerAddress + 2);
    await closeChannels();
  });

  it("a client that sends its TLS ClientHello a byte at a time is cut at handshakeTimeoutMs, however often it sends", async () => {
    const s = tcpConnect({ port, host: "127.0.0.1" });
    s.on("error", () => undefined);
    s.resume();
    await new Promise<void>((res, rej) => s.once("connect", res).once("error", rej));
    const t0 = performance.now();
    // A handshake record, then a ClientHello of 512 bytes announced, of which a byte comes every fifth of the timeout.
    s.write(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x04, 0x01, 0x00, 0x02, 0x00]));
    let dripped = 0;
    const drip = setInterval(() => {
      if (s.destroyed) return;
      s.write(Buffer.alloc(1));
      dripped++;
    }, LIMITS.handshakeTimeoutMs / 5);
    const closed = await new Promise<number>((res) => s.once("close", () => res(performance.now() - t0)));
    clearInterval(drip);
    console.log(`      a ClientHello dripped a byte every ${ms(LIMITS.handshakeTimeoutMs / 5)}: cut after ${ms(closed)} and ${dripped} bytes`);
    expect(dripped).to.be.at.least(3);
    expect(closed).to.be.within(LIMITS.handshakeTimeoutMs - 50, LIMITS.handshakeTimeoutMs + SLACK_MS);
    await waitFor(async () => (await payment.connections()) === 0, 1_000, "the server to let the connection go");
  });

  describe("idle connections", () => {
    beforeEach(closeChannels);

    it("a TLS channel that makes one call and then stays idle is closed by the server after idleTimeoutMs", async () => {
      const c = await channel();
      await createClient(HealthDefinition, c).check({ service: "" });
      const t0 = performance.now();
      expect(await payment.connections()).to.equal(1);
      await waitFor(async () => (await payment.connections()) === 0, 2 * LIMITS.idleTimeoutMs + SLACK_MS + 1_000, "the idle connection to be closed");
      const closed = performance.now() - t0;
      const state = grpc.connectivityState[c.getConnectivityState(false)];
      console.log(`      idle channel closed by the server after ${ms(closed)} (idleTimeoutMs ${LIMITS.idleTimeoutMs}); the channel is now ${state}`);
      // grpc-js checks idleness when a timer fires, against Date.now(); the timer runs on the event loop's clock, cached at
      // the start of the turn that refreshed it, so it may fire a little early, find the connection idle for just under
      // idleTimeoutMs and wait a whole period more: the connection is closed between idleTimeoutMs and twice that.
      expect(closed).to.be.within(LIMITS.idleTimeoutMs - 50, 2 * LIMITS.idleTimeoutMs + SLACK_MS);
      expect(state).to.equal("IDLE"); // it reconnects on its next call
    });

    it("a connection that completes TLS and then never sends the HTTP/2 preface is closed after idleTimeoutMs", async () => {
      const s = tlsConnect({ port, host: "127.0.0.1", servername: "localhost", ALPNProtocols: ["h2"], ca: readFileSync(pkiPaths(security.dir).caCert) });
      await new Promise<void>((res, rej) => s.once("secureConnect", res).once("error", rej));
      const t0 = performance.now();
      s.on("error", () => undefined);
      s.resume(); // reads (and drops) the server's SETTINGS, so that its close is seen
      const closed = await new Promise<number>((res) => s.once("close", () => res(performance.now() - t0)));
      console.log(`      a TLS connection silent after its handshake was closed after ${ms(closed)}`);
      expect(closed).to.be.within(LIMITS.idleTimeoutMs - 50, 2 * LIMITS.idleTimeoutMs + SLACK_MS); // as above
    });
  });

  describe("streams per connection", () => {
    beforeEach(closeChannels);
    afterEach(closeChannels);

    it("a gRPC client opening more than maxConcurrentStreams on one connection: the extra streams wait for a free one, never run beyond the cap", async () => {
      const c = await channel();
      const health = createClient(HealthDefinition, c);
      await health.check({ service: "" }); // connected, the server's SETTINGS received
      const n = LIMITS.maxConcurrentStreams + 4;
      const aborts = Array.from({ length: n }, () => new AbortController());
      // Health/Watch answers as soon as its handler runs, then stays open: a stream that has had its first answer is running.
      let running = 0;
      const outcomes = aborts.map(async (a) => {
        try {
          for await (const m of health.watch({ service: "" }, { signal: a.signal })) {
            expect(m.status).to.equal(SERVING);
            running++;
          }
          return "ended";
        } catch (e) {
          return e instanceof Error && e.name === "AbortError" ? "aborted" : `failed: ${String(e)}`;
        }
      });
      await waitFor(() => running >= LIMITS.maxConcurrentStreams, 5_000, "the first streams to run");
      await new Promise((r) => setTimeout(r, 500));
      const connections = await payment.connections();
      console.log(`      ${n} streams opened on one channel: ${running} running, the rest waiting; ${connections} connection(s)`);
      expect(running).to.equal(LIMITS.maxConcurrentStreams);
      expect(connections).to.equal(1);
      for (let i = 0; i < 4; i++) {
        aborts[i]?.abort();
        await waitFor(() => running === LIMITS.maxConcurrentStreams + i + 1, 5_000, "a waiting stream to run once one ended");
      }
      for (const a of aborts) a.abort();
      expect(await Promise.all(outcomes)).to.deep.equal(Array(n).fill("aborted"));
    });

    it("a client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS has its extra streams refused or its connection closed, never more than the cap run", async () => {
      const s: TLSSocket = tlsConnect({
        port,
        host: "127.0.0.1",
        servername: "localhost",
        ALPNProtocols: ["h2"],
        ca: readFileSync(pkiPaths(security.dir).caCert),
      });
      s.on("error", () => undefined);
      await new Promise<void>((res, rej) => s.once("secureConnect", res).once("error", rej));
      const running = new Set<number>();
      const refused = new Map<number, number>();
      let goaway: { last: number; code: number } | undefined;
      let settings: number | undefined;
      let closed = false;
      s.once("close", () => (closed = true));
      let buf = Buffer.alloc(0);
      s.on("data", (d: Buffer) => {
        buf = Buffer.concat([buf, d]);
        while (buf.length >= 9 && buf.length >= 9 + buf.readUIntBE(0, 3)) {
          const len = buf.readUIntBE(0, 3);
          const [type, flags, stream, payload] = [buf.readUInt8(3), buf.readUInt8(4), buf.readUInt32BE(5) & 0x7fffffff, buf.subarray(9, 9 + len)];
          buf = buf.subarray(9 + len);
          if (type === H2.SETTINGS && !(flags & H2.ACK)) {
            for (let i = 0; i + 6 <= payload.length; i += 6) if (payload.readUInt16BE(i) === 0x3) settings = payload.readUInt32BE(i + 2);
            s.write(frame(H2.SETTINGS, H2.ACK, 0));
          }
          if (type === H2.DATA && payload.length > 0) running.add(stream);
          if (type === H2.RST_STREAM) refused.set(stream, payload.readUInt32BE(0));
          if (type === H2.GOAWAY) goaway = { last: payload.readUInt32BE(0) & 0x7fffffff, code: payload.readUInt32BE(4) };
        }
      });
      s.write(Buffer.concat([Buffer.from("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), frame(H2.SETTINGS, 0, 0)]));
      await waitFor(() => settings !== undefined, 5_000, "the server's SETTINGS");
      expect(settings).to.equal(LIMITS.maxConcurrentStreams);
      const n = LIMITS.maxConcurrentStreams + 4;
      const block = hpack([
        [":method", "POST"],
        [":scheme", "https"],
        [":path", "/grpc.health.v1.Health/Watch"],
        [":authority", "localhost"],
        ["content-type", "application/grpc"],
        ["te", "trailers"],
      ]);
      // All at once, as if the server had said nothing: each a Watch call with an empty request, half-closed.
      const streams = Array.from({ length: n }, (_, i) => 2 * i + 1);
      s.write(Buffer.concat(streams.flatMap((id) => [frame(H2.HEADERS, H2.END_HEADERS, id, block), frame(H2.DATA, H2.END_STREAM, id, Buffer.alloc(5))])));
      await waitFor(() => running.size + refused.size >= n || goaway !== undefined || closed, 5_000, "the server to answer every stream");
      await new Promise((r) => setTimeout(r, 300));
      console.log(
        `      ${n} streams sent at once past a cap of ${settings}: ${running.size} ran (${[...running].join(",")}), refused: ${[...refused].map(([id, code]) => `${id} (code ${code})`).join(", ") || "none"}; GOAWAY: ${goaway ? `last stream ${goaway.last}, code ${goaway.code}` : "none"}; connection ${closed ? "closed by the server" : "open"}`,
      );
      expect(running.size).to.be.at.most(LIMITS.maxConcurrentStreams);
      // The extra streams: refused one by one (REFUSED_STREAM, 0x7), or the connection ended for the protocol error
      // (what Node's HTTP/2 does once the client has acknowledged the SETTINGS: it destroys the session and its socket).
      for (const id of streams.filter((id) => !running.has(id)))
        expect(refused.get(id) === 0x7 || goaway !== undefined || closed, `stream ${id}`).to.equal(true);
      s.destroy();
      await waitFor(async () => (await payment.connections()) === 0, 5_000, "the abusive connection to be gone");
    });
  });

  it("a message above maxMessageBytes is refused by the server with RESOURCE_EXHAUSTED; one just below it reaches its handler", async () => {
    // payment.test.ts ("a message beyond the 64 KiB bound is refused by the transport") sends its 70,000-byte draw request
    // through netpurse's own channel, whose own bound refuses it before it leaves the client ("Attempted to send message with
    // a size larger than 65536"); this channel sends anything, so that the server's bound is what is tested.
    const tls = security.cardholder.channel({ kind: "payment" });
    if (!("tls" in tls)) throw new Error("the test network runs TLS");
    const c = createChannel(payment.address, channelCredentials(tls.tls), {
      "grpc.ssl_target_name_override": "localhost",
      "grpc.max_send_message_length": -1,
      "grpc.max_receive_message_length": -1,
    });
    channels.push(c);
    const health = createClient(HealthDefinition, c);
    const limit = DEFAULT_LIMITS.maxMessageBytes;
    // A HealthCheckRequest of `bytes` bytes: its service name, after a tag (1 byte) and a length (a 3-byte varint here).
    const request = (bytes: number) => ({ service: "x".repeat(bytes - 4) });
    const refused = await health.check(request(limit + 1)).catch((e: unknown) => e);
    expect(refused).to.be.instanceOf(ClientError);
    const e = refused as ClientError;
    console.log(`      a request of ${limit + 1} bytes: ${Status[e.code]} "${e.details}"`);
    expect(e.code, e.details).to.equal(Status.RESOURCE_EXHAUSTED);
    // At the bound the request reaches the health service, which knows no such service (and would log its 64 KiB name).
    const level = process.env.NETPURSE_LOG_LEVEL;
    process.env.NETPURSE_LOG_LEVEL = "warn";
    const served = await health
      .check(request(limit))
      .catch((e: unknown) => e)
      .finally(() => (level === undefined ? delete process.env.NETPURSE_LOG_LEVEL : (process.env.NETPURSE_LOG_LEVEL = level)));
    expect((served as ClientError).code).to.equal(Status.NOT_FOUND);
  });
});
