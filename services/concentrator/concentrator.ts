// The terminal concentrator (concentrator 212 of WO 98/49658): routes PSAM
// jobs from payment servers to terminal hosts by the terminal id in each
// job's header, and the results back. It holds only the live map of
// terminals, their PSAMs and the leases; nothing here is durable, because
// every job's outcome is durable at the payment server and in the PSAM.

import { ServerError, Status, type CallContext } from "nice-grpc";
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../../lib/async-queue.js";
import { serveStream } from "../../lib/streams.js";
import { hexOf, isName } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import {
  PsamJobStatus,
  PsamSlotState,
  type AttachTerminalRequest,
  type AttachTerminalResponse,
  type ConnectPaymentServerRequest,
  type ConnectPaymentServerResponse,
  type ListTerminalsResponse,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
  type TerminalConcentratorServiceImplementation,
  type TerminalInfo,
} from "../../gen/netpurse/terminal/v1/terminal.js";

export interface ConcentratorOptions {
  concentratorId: string;
  /** Most jobs in flight a payment server may have on its stream. */
  paymentServerWindow: number;
  /** Most jobs queued at the concentrator for one terminal beyond its window. */
  terminalQueueLimit: number;
  keepaliveIntervalMs: number;
  log: Logger;
}

interface TerminalConn {
  id: string;
  streamId: string;
  slots: PsamSlot[];
  window: number;
  attachedAt: Date;
  /** Concentrator job id -> job in flight at the terminal. */
  inFlight: Map<string, RoutedJob>;
  queue: RoutedJob[];
  out: AsyncQueue<AttachTerminalResponse>;
  keepalive: Keepalive;
}

interface PaymentServerConn {
  streamId: string;
  id: string;
  connectedAt: Date;
  inFlight: number;
  out: AsyncQueue<ConnectPaymentServerResponse>;
  keepalive: Keepalive;
}

interface RoutedJob {
  routedId: string;
  job: PsamJob;
  from: PaymentServerConn;
}

/** Pings a stream and closes it when two pings go unanswered. */
class Keepalive {
  private nonce = 0n;
  private unanswered = 0;
  private timer: NodeJS.Timeout;

  constructor(intervalMs: number, ping: (nonce: bigint) => void, onDead: () => void) {
    this.timer = setInterval(() => {
      if (this.unanswered >= 2) {
        this.stop();
        onDead();
        return;
      }
      this.unanswered++;
      ping(++this.nonce);
    }, intervalMs);
    this.timer.unref();
  }

  pong(nonce: bigint): void {
    if (nonce === this.nonce) this.unanswered = 0;
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

const slotKey = (terminalId: string, psamHex: string) => `${terminalId}/${psamHex}`;

export class Concentrator {
  private readonly terminals = new Map<string, TerminalConn>();
  private readonly paymentServers = new Map<string, PaymentServerConn>();
  /** slot key -> payment server stream holding the lease. */
  private readonly leases = new Map<string, PaymentServerConn>();

  constructor(private readonly o: ConcentratorOptions) {}

  readonly service: TerminalConcentratorServiceImplementation = {
    attachTerminal: (requests, context) => this.attachTerminal(requests, context),
    connectPaymentServer: (requests, context) => this.connectPaymentServer(requests, context),
    listTerminals: async () => this.listTerminals(),
  };

  // ---- terminal hosts ---------------------------------------------------

  private attachTerminal(requests: AsyncIterable<AttachTerminalRequest>, context: CallContext): AsyncIterable<AttachTerminalResponse> {
    const out = new AsyncQueue<AttachTerminalResponse>();
    const streamId = randomUUID();
    let conn: TerminalConn | undefined;
    const onMessage = (req: AttachTerminalRequest) => {
      const m = req.message;
      if (!m) return;
      if (!conn) {
        if (m.$case !== "hello") throw new ServerError(Status.INVALID_ARGUMENT, "the first message on AttachTerminal must be a TerminalHello");
        conn = this.registerTerminal(m.value, streamId, out);
        return;
      }
      switch (m.$case) {
        case "hello":
          throw new ServerError(Status.INVALID_ARGUMENT, "TerminalHello sent twice on one stream");
        case "slotUpdate":
          if (m.value.slot) this.updateSlot(conn, m.value.slot);
          break;
        case "result":
          this.terminalResult(conn, m.value);
          break;
        case "pong":
          conn.keepalive.pong(m.value.nonce);
          break;
      }
    };
    return serveStream(requests, context.signal, out, onMessage, () => {
      if (conn) this.detachTerminal(conn, "stream ended");
    });
  }

  private registerTerminal(
    hello: { terminalId: string; slots: PsamSlot[]; window: number },
    streamId: string,
    out: AsyncQueue<AttachTerminalResponse>,
  ): TerminalConn {
    if (!isName(hello.terminalId, 64)) throw new ServerError(Status.INVALID_ARGUMENT, "terminal_id must be 1..64 characters of [A-Za-z0-9._-]");
    if (hello.window < 1 || hello.window > 1024) throw new ServerError(Status.INVALID_ARGUMENT, "window must be 1..1024");
    if (hello.slots.length > 256) throw new ServerError(Status.INVALID_ARGUMENT, "at most 256 PSAM slots per terminal");
    for (const s of hello.slots) {
      if ((s.psamId?.value.length ?? 0) !== 4) throw new ServerError(Status.INVALID_ARGUMENT, `slot ${s.slot}: psam_id must be 4 bytes`);
    }
    const old = this.terminals.get(hello.terminalId);
    if (old) {
      this.o.log.warn("terminal re-attached; replacing its older stream", { terminal: hello.terminalId });
      this.detachTerminal(old, "replaced by a new stream");
      old.out.close();
    }
    const conn: TerminalConn = {
      id: hello.terminalId,
      streamId,
      slots: hello.slots,
      window: hello.window,
      attachedAt: new Date(),
      inFlight: new Map(),
      queue: [],
      out,
      keepalive: new Keepalive(
        this.o.keepaliveIntervalMs,
        (nonce) => out.push({ message: { $case: "ping", value: { nonce } } }),
        () => {
          this.o.log.warn("terminal missed two keepalives; dropping it", { terminal: hello.terminalId });
          out.close(new ServerError(Status.UNAVAILABLE, "keepalive timeout"));
        },
      ),
    };
    this.terminals.set(conn.id, conn);
    out.push({
      message: { $case: "welcome", value: { concentratorId: this.o.concentratorId, window: conn.window, keepaliveIntervalMs: this.o.keepaliveIntervalMs } },
    });
    this.o.log.info("terminal attached", { terminal: conn.id, psams: conn.slots.map((s) => hexOf(s.psamId?.value)).join(","), window: conn.window });
    this.broadcast(conn);
    return conn;
  }

  private updateSlot(conn: TerminalConn, slot: PsamSlot): void {
    const i = conn.slots.findIndex((s) => s.slot === slot.slot);
    if (i < 0) conn.slots.push(slot);
    else conn.slots[i] = slot;
    this.broadcast(conn);
  }

  private detachTerminal(conn: TerminalConn, why: string): void {
    if (this.terminals.get(conn.id) !== conn) return;
    this.terminals.delete(conn.id);
    conn.keepalive.stop();
    for (const r of conn.inFlight.values()) {
      this.answer(r, {
        status: PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST,
        message: `terminal ${conn.id} lost before it answered (${why}); the PSAM may have done the job`,
      });
    }
    for (const r of conn.queue) {
      this.answer(r, { status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, message: `terminal ${conn.id} detached before the job was sent` });
    }
    conn.inFlight.clear();
    conn.queue = [];
    for (const s of conn.slots) this.leases.delete(slotKey(conn.id, hexOf(s.psamId?.value)));
    this.o.log.info("terminal detached", { terminal: conn.id, why });
    for (const ps of this.paymentServers.values())
      ps.out.push({ message: { $case: "poolUpdate", value: { terminal: undefined, detachedTerminalId: conn.id } } });
  }

  private terminalResult(conn: TerminalConn, result: PsamJobResult): void {
    const r = conn.inFlight.get(result.jobId);
    if (!r) {
      this.o.log.warn("result for an unknown job; dropped", { terminal: conn.id, job: result.jobId });
      return;
    }
    conn.inFlight.delete(result.jobId);
    if (result.slot) {
      const i = conn.slots.findIndex((s) => s.slot === result.slot!.slot);
      if (i >= 0) conn.slots[i] = result.slot;
    }
    this.answer(r, { ...result, jobId: r.job.jobId });
    this.pump(conn);
  }

  /** Sends queued jobs while the terminal's window allows. */
  private pump(conn: TerminalConn): void {
    while (conn.queue.length && conn.inFlight.size < conn.window) {
      const r = conn.queue.shift()!;
      conn.inFlight.set(r.routedId, r);
      conn.out.push({ message: { $case: "job", value: { ...r.job, jobId: r.routedId } } });
    }
  }

  // ---- payment servers --------------------------------------------------

  private connectPaymentServer(requests: AsyncIterable<ConnectPaymentServerRequest>, context: CallContext): AsyncIterable<ConnectPaymentServerResponse> {
    const out = new AsyncQueue<ConnectPaymentServerResponse>();
    let conn: PaymentServerConn | undefined;
    const onMessage = (req: ConnectPaymentServerRequest) => {
      const m = req.message;
      if (!m) return;
      if (!conn) {
        if (m.$case !== "hello") throw new ServerError(Status.INVALID_ARGUMENT, "the first message on ConnectPaymentServer must be a PaymentServerHello");
        if (!isName(m.value.paymentServerId, 64))
          throw new ServerError(Status.INVALID_ARGUMENT, "payment_server_id must be 1..64 characters of [A-Za-z0-9._-]");
        conn = this.registerPaymentServer(m.value.paymentServerId, out);
        return;
      }
      switch (m.$case) {
        case "hello":
          throw new ServerError(Status.INVALID_ARGUMENT, "PaymentServerHello sent twice on one stream");
        case "job":
          this.route(conn, m.value);
          break;
        case "release":
          this.release(conn, m.value.terminalId, hexOf(m.value.psamId?.value));
          break;
        case "pong":
          conn.keepalive.pong(m.value.nonce);
          break;
      }
    };
    return serveStream(requests, context.signal, out, onMessage, () => {
      if (conn) this.disconnectPaymentServer(conn);
    });
  }

  private registerPaymentServer(id: string, out: AsyncQueue<ConnectPaymentServerResponse>): PaymentServerConn {
    const conn: PaymentServerConn = {
      streamId: randomUUID(),
      id,
      connectedAt: new Date(),
      inFlight: 0,
      out,
      keepalive: new Keepalive(
        this.o.keepaliveIntervalMs,
        (nonce) => out.push({ message: { $case: "ping", value: { nonce } } }),
        () => out.close(new ServerError(Status.UNAVAILABLE, "keepalive timeout")),
      ),
    };
    this.paymentServers.set(conn.streamId, conn);
    out.push({
      message: {
        $case: "welcome",
        value: { concentratorId: this.o.concentratorId, window: this.o.paymentServerWindow, keepaliveIntervalMs: this.o.keepaliveIntervalMs },
      },
    });
    for (const t of this.terminals.values()) out.push({ message: { $case: "poolUpdate", value: { terminal: this.info(t, conn), detachedTerminalId: "" } } });
    this.o.log.info("payment server connected", { paymentServer: id });
    return conn;
  }

  private disconnectPaymentServer(conn: PaymentServerConn): void {
    conn.keepalive.stop();
    this.paymentServers.delete(conn.streamId);
    // Its jobs not yet sent would be answered to nobody: drop them.
    for (const t of this.terminals.values()) t.queue = t.queue.filter((r) => r.from !== conn);
    const freed = new Set<TerminalConn>();
    for (const [k, holder] of this.leases) {
      if (holder !== conn) continue;
      this.leases.delete(k);
      const t = this.terminals.get(k.slice(0, k.lastIndexOf("/")));
      if (t) freed.add(t);
    }
    for (const t of freed) this.broadcast(t);
    this.o.log.info("payment server disconnected", { paymentServer: conn.id });
  }

  private route(from: PaymentServerConn, job: PsamJob): void {
    const psamHex = hexOf(job.psamId?.value);
    const fail = (status: PsamJobStatus, message: string): void =>
      void from.out.push({
        message: {
          $case: "result",
          value: { jobId: job.jobId, terminalId: job.terminalId, psamId: job.psamId, status, statusWord: 0, message, slot: undefined, outcome: undefined },
        },
      });
    if (!job.jobId || job.jobId.length > 64) return fail(PsamJobStatus.PSAM_JOB_STATUS_INVALID, "job_id must be 1..64 characters");
    if (!job.task) return fail(PsamJobStatus.PSAM_JOB_STATUS_INVALID, "job has no task");
    if (from.inFlight >= this.o.paymentServerWindow)
      return fail(PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED, `more than ${this.o.paymentServerWindow} jobs in flight`);
    const t = this.terminals.get(job.terminalId);
    const slot = t?.slots.find((s) => hexOf(s.psamId?.value) === psamHex);
    if (!t || !slot) return fail(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, `no attached terminal ${job.terminalId} with PSAM ${psamHex}`);
    if (slot.state === PsamSlotState.PSAM_SLOT_STATE_FAILED) return fail(PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, `PSAM ${psamHex} is out of the pool`);
    const key = slotKey(t.id, psamHex);
    const holder = this.leases.get(key);
    if (holder && holder !== from) return fail(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY, `PSAM ${psamHex} is leased to payment server ${holder.id}`);
    if (!holder) {
      this.leases.set(key, from);
      this.broadcast(t, from);
    }
    if (t.inFlight.size >= t.window && t.queue.length >= this.o.terminalQueueLimit) {
      return fail(PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED, `terminal ${t.id} has ${t.queue.length} jobs queued`);
    }
    from.inFlight++;
    t.queue.push({ routedId: randomUUID(), job, from });
    this.pump(t);
  }

  private answer(r: RoutedJob, result: Partial<PsamJobResult> & { status: PsamJobStatus }): void {
    r.from.inFlight--;
    if (!this.paymentServers.has(r.from.streamId)) return; // its stream is gone; the payment server recovers from its log
    r.from.out.push({
      message: {
        $case: "result",
        value: {
          jobId: r.job.jobId,
          terminalId: r.job.terminalId,
          psamId: r.job.psamId,
          statusWord: 0,
          message: "",
          slot: undefined,
          outcome: undefined,
          ...result,
        },
      },
    });
  }

  private release(from: PaymentServerConn, terminalId: string, psamHex: string): void {
    const key = slotKey(terminalId, psamHex);
    if (this.leases.get(key) !== from) return;
    this.leases.delete(key);
    const t = this.terminals.get(terminalId);
    if (t) this.broadcast(t, from);
  }

  // ---- views ------------------------------------------------------------

  /** A terminal as a payment server sees it: slots leased to others show BUSY. */
  private info(t: TerminalConn, viewer?: PaymentServerConn): TerminalInfo {
    return {
      terminalId: t.id,
      attachedAt: t.attachedAt,
      jobsInFlight: t.inFlight.size,
      window: t.window,
      slots: t.slots.map((s) => {
        const holder = this.leases.get(slotKey(t.id, hexOf(s.psamId?.value)));
        const busy = holder && holder !== viewer && s.state === PsamSlotState.PSAM_SLOT_STATE_READY;
        return busy ? { ...s, state: PsamSlotState.PSAM_SLOT_STATE_BUSY } : s;
      }),
    };
  }

  /** Tells payment servers about a terminal; the one that caused a lease change already knows. */
  private broadcast(t: TerminalConn, except?: PaymentServerConn): void {
    for (const ps of this.paymentServers.values()) {
      if (ps === except) continue;
      ps.out.push({ message: { $case: "poolUpdate", value: { terminal: this.info(t, ps), detachedTerminalId: "" } } });
    }
  }

  listTerminals(): ListTerminalsResponse {
    return {
      terminals: [...this.terminals.values()].map((t) => this.info(t)),
      paymentServers: [...this.paymentServers.values()].map((p) => ({
        paymentServerId: p.id,
        connectedAt: p.connectedAt,
        jobsInFlight: p.inFlight,
        psamsLeased: [...this.leases.values()].filter((h) => h === p).length,
      })),
    };
  }

  close(): void {
    for (const t of this.terminals.values()) {
      t.keepalive.stop();
      t.out.close();
    }
    for (const p of this.paymentServers.values()) {
      p.keepalive.stop();
      p.out.close();
    }
  }
}
