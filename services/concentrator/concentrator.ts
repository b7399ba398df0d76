// The terminal concentrator (concentrator 212 of WO 98/49658): routes PSAM
// jobs from payment servers to terminal hosts by the terminal id in each
// job's header, and the results back. It holds only the live map of
// terminals, their PSAMs and the leases; nothing here is durable, because
// every job's outcome is durable at the payment server and in the PSAM.

import { ServerError, Status, type CallContext } from "nice-grpc";
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../../lib/async-queue.js";
import { serveStream } from "../../lib/streams.js";
import { hexOf, isName, psamId as toPsamId } from "../../lib/ids.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { peerOf, peerRevoked, type Peer } from "../../lib/grpc/server.js";
import type { Logger } from "../../lib/log.js";
import {
  BatchNotClosedReason,
  PsamJobStatus,
  PsamSlotState,
  type AttachTerminalRequest,
  type AttachTerminalResponse,
  type CloseBatchesReport,
  type CloseBatchesRequest,
  type CloseBatchesResponse,
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
  /** The PSAMs the issuer provisioned for each terminal (PSAM id in hex -> terminal id); when given, a terminal may announce only its own. */
  psamRegistry?: ReadonlyMap<string, string>;
  /** A lease held longer than this is taken back from its payment server. */
  maxLeaseMs: number;
  /** Most PSAMs one payment server (one identity, all its replicas' streams together) may hold at once (beside its fair share of the pool when several are connected). */
  maxLeasesPerPaymentServer: number;
  /** A job that waited this long at the concentrator without reaching its terminal is answered, not sent. */
  queuedJobTtlMs: number;
  /** How long an attached terminal has to answer a ping before a second stream under its identity replaces it. */
  livenessProofMs: number;
  /** Most jobs in flight a payment server may have on its stream. */
  paymentServerWindow: number;
  /** Most jobs queued at the concentrator for one terminal beyond its window. */
  terminalQueueLimit: number;
  keepaliveIntervalMs: number;
  /** How long CloseBatches waits for each terminal host's report. */
  closeBatchesTimeoutMs: number;
  log: Logger;
}

interface TerminalConn {
  id: string;
  /** Who its certificate proves it is (checked again for revocation while it stays attached). */
  peer: Peer;
  streamId: string;
  slots: PsamSlot[];
  window: number;
  attachedAt: Date;
  /** Concentrator job id -> job in flight at the terminal. */
  inFlight: Map<string, RoutedJob>;
  queue: RoutedJob[];
  out: AsyncQueue<AttachTerminalResponse>;
  keepalive: Keepalive;
  /** CloseBatchesCommands sent and not answered yet, by request id: each takes the host's report (undefined: none will come). */
  closeRequests: Map<string, (report: CloseBatchesReport | undefined) => void>;
}

interface PaymentServerConn {
  peer: Peer;
  streamId: string;
  /** Its identity, as its certificate proves it: what owns debits and what the pool is shared by. */
  id: string;
  /** The replica the stream says it is ("" for a payment server that runs alone): a label, it grants nothing. */
  replica: string;
  connectedAt: Date;
  inFlight: number;
  out: AsyncQueue<ConnectPaymentServerResponse>;
  keepalive: Keepalive;
}

interface RoutedJob {
  routedId: string;
  job: PsamJob;
  from: PaymentServerConn;
  /** When it was queued at the concentrator (ms since the epoch). */
  queuedAt: number;
}

/** Pings a stream and closes it when two pings go unanswered. */
class Keepalive {
  private nonce = 0n;
  private unanswered = 0;
  private timer: NodeJS.Timeout;

  private readonly proofs = new Map<bigint, () => void>();

  constructor(
    intervalMs: number,
    private readonly ping: (nonce: bigint) => void,
    onDead: () => void,
  ) {
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
    const proof = this.proofs.get(nonce);
    if (proof) proof();
  }

  /** Pings now and resolves true if the answer comes within `withinMs`: the stream's end is alive. */
  proveAlive(withinMs: number): Promise<boolean> {
    const nonce = ++this.nonce;
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.proofs.delete(nonce);
        resolve(false);
      }, withinMs);
      this.proofs.set(nonce, () => {
        clearTimeout(timer);
        this.proofs.delete(nonce);
        this.unanswered = 0;
        resolve(true);
      });
      this.ping(nonce);
    });
  }

  stop(): void {
    clearInterval(this.timer);
  }
}

const slotKey = (terminalId: string, psamHex: string) => `${terminalId}/${psamHex}`;

/** A payment server stream as logs and messages name it. */
const nameOf = (p: { id: string; replica: string }) => (p.replica ? `${p.id} (replica ${p.replica})` : p.id);

/** A PSAM that failed or was taken out of its reader takes no jobs. */
const outOfPool = (s: PsamSlot) => s.state === PsamSlotState.PSAM_SLOT_STATE_FAILED || s.state === PsamSlotState.PSAM_SLOT_STATE_EMPTY;

/** A slot with only the open debits `viewer` may see: its own, and those whose owner the host does not know. */
const ownDebits = (s: PsamSlot, viewer: { id: string }): PsamSlot => ({
  ...s,
  pendingDebits: s.pendingDebits.filter((p) => p.paymentServerId === "" || p.paymentServerId === viewer.id),
});

export class Concentrator {
  private readonly terminals = new Map<string, TerminalConn>();
  private readonly paymentServers = new Map<string, PaymentServerConn>();
  /** slot key -> the payment server stream holding the lease, and since when. */
  private readonly leases = new Map<string, { holder: PaymentServerConn; since: number }>();
  /** Streams that claim an attached terminal's identity, waiting for the attached one's proof of liveness. */
  private readonly contenders = new Set<string>();
  private readonly leaseSweep: NodeJS.Timeout;

  constructor(private readonly o: ConcentratorOptions) {
    this.leaseSweep = setInterval(
      () => {
        this.takeBackOldLeases();
        this.expireQueuedJobs();
        this.endRevokedStreams();
      },
      Math.min(1_000, o.maxLeaseMs, o.queuedJobTtlMs),
    );
    this.leaseSweep.unref();
  }

  readonly service: TerminalConcentratorServiceImplementation = {
    attachTerminal: (requests, context) => this.attachTerminal(requests, peerOf(context), context),
    connectPaymentServer: (requests, context) => this.connectPaymentServer(requests, peerOf(context), context),
    listTerminals: async () => this.listTerminals(),
    closeBatches: (request, context) => this.closeBatches(request, context.signal),
  };

  // ---- terminal hosts ---------------------------------------------------

  private attachTerminal(requests: AsyncIterable<AttachTerminalRequest>, peer: Peer, context: CallContext): AsyncIterable<AttachTerminalResponse> {
    const out = new AsyncQueue<AttachTerminalResponse>();
    const streamId = randomUUID();
    let conn: TerminalConn | undefined;
    let hello = false;
    const onMessage = (req: AttachTerminalRequest) => {
      const m = req.message;
      if (!m) return;
      if (!hello) {
        if (m.$case !== "hello") throw new ServerError(Status.INVALID_ARGUMENT, "the first message on AttachTerminal must be a TerminalHello");
        hello = true;
        this.checkTerminal(m.value, peer);
        this.admitSecond(
          "terminal",
          m.value.terminalId,
          () => this.terminals.get(m.value.terminalId),
          (stale) => {
            this.detachTerminal(stale, "replaced by a new stream after it failed to answer a ping");
            stale.out.close();
          },
          out,
        ).then(
          (admitted) => {
            if (admitted && !out.closed) conn = this.registerTerminal(m.value, peer, streamId, out);
          },
          (e: unknown) => out.close(e instanceof Error ? e : new Error(String(e))),
        );
        return;
      }
      if (!conn) return; // sent before the welcome, while its identity was being checked: it announces itself again

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
        case "closeBatchesReport":
          conn.closeRequests.get(m.value.requestId)?.(m.value);
          break;
      }
    };
    return serveStream(requests, context.signal, out, onMessage, () => {
      if (conn) this.detachTerminal(conn, "stream ended");
    });
  }

  /**
   * A terminal attaches only under the identity its certificate proves, and
   * announces only PSAMs the issuer provisioned for it.
   */
  private checkTerminal(hello: { terminalId: string; slots: PsamSlot[]; window: number }, peer: Peer): void {
    if (!isName(hello.terminalId, 64)) throw new ServerError(Status.INVALID_ARGUMENT, "terminal_id must be 1..64 characters of [A-Za-z0-9._-]");
    if (hello.window < 1 || hello.window > 1024) throw new ServerError(Status.INVALID_ARGUMENT, "window must be 1..1024");
    if (hello.slots.length > 256) throw new ServerError(Status.INVALID_ARGUMENT, "at most 256 PSAM slots per terminal");
    for (const s of hello.slots) {
      if ((s.psamId?.value.length ?? 0) !== 4) throw new ServerError(Status.INVALID_ARGUMENT, `slot ${s.slot}: psam_id must be 4 bytes`);
    }
    if (peer.proven && peer.id !== hello.terminalId) {
      this.o.log.warn("refused a terminal claiming another's identity", { claimed: hello.terminalId, certificate: peer.id });
      throw new NetpurseError(
        Status.PERMISSION_DENIED,
        ErrorReason.ERROR_REASON_NOT_ALLOWED,
        `your certificate is terminal ${peer.id}: you may attach only as ${peer.id}, not as ${hello.terminalId}`,
      );
    }
    for (const s of hello.slots) this.checkProvisioned(hello.terminalId, s);
  }

  private checkProvisioned(terminalId: string, s: PsamSlot): void {
    if (!this.o.psamRegistry) return;
    const psam = hexOf(s.psamId?.value);
    const owner = this.o.psamRegistry.get(psam);
    if (owner === terminalId) return;
    this.o.log.warn("refused a PSAM not provisioned for its terminal", { terminal: terminalId, psam, provisionedFor: owner ?? "no terminal" });
    throw new NetpurseError(
      Status.PERMISSION_DENIED,
      ErrorReason.ERROR_REASON_NOT_ALLOWED,
      `PSAM ${psam} is not provisioned for terminal ${terminalId}${owner ? "" : " (the issuer never provisioned it)"}`,
    );
  }

  /**
   * A second stream under the identity of an attached terminal or connected
   * payment server replaces the first only when the first cannot prove it is
   * alive: it is pinged, and an answer within the proof time keeps it (the
   * newcomer is refused). One stream per terminal identity, and per payment
   * server identity and replica id: a copy of a certificate cannot evict a
   * live peer, and the pool's share is per identity however many replicas
   * it names (leaseCap).
   */
  private async admitSecond<C extends { keepalive: Keepalive }>(
    what: string,
    id: string,
    current: () => C | undefined,
    replace: (stale: C) => void,
    out: { closed: boolean },
  ): Promise<boolean> {
    const old = current();
    if (!old) return true;
    const key = `${what}/${id}`;
    if (this.contenders.has(key)) {
      throw new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_NOT_ALLOWED, `another stream is already proving whether ${what} ${id} is alive`);
    }
    this.contenders.add(key);
    try {
      const alive = await old.keepalive.proveAlive(this.o.livenessProofMs);
      if (alive && current() === old) {
        this.o.log.warn(`refused a second stream for a ${what} that is attached and answering`, { [what === "terminal" ? "terminal" : "paymentServer"]: id });
        throw new NetpurseError(
          Status.ALREADY_EXISTS,
          ErrorReason.ERROR_REASON_NOT_ALLOWED,
          `${what} ${id} is connected and answers its pings: a second stream does not replace it`,
        );
      }
      if (out.closed) return false;
      const stale = current();
      if (stale) {
        this.o.log.warn(`${what} reconnected; its older stream did not answer a ping and is replaced`, { id });
        replace(stale);
      }
      return true;
    } finally {
      this.contenders.delete(key);
    }
  }

  private paymentServerNamed(id: string, replica: string): PaymentServerConn | undefined {
    for (const p of this.paymentServers.values()) if (p.id === id && p.replica === replica) return p;
    return undefined;
  }

  private registerTerminal(
    hello: { terminalId: string; slots: PsamSlot[]; window: number },
    peer: Peer,
    streamId: string,
    out: AsyncQueue<AttachTerminalResponse>,
  ): TerminalConn {
    const conn: TerminalConn = {
      id: hello.terminalId,
      peer,
      streamId,
      slots: hello.slots,
      window: hello.window,
      attachedAt: new Date(),
      inFlight: new Map(),
      queue: [],
      out,
      closeRequests: new Map(),
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
    this.checkProvisioned(conn.id, slot);
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
    for (const answer of [...conn.closeRequests.values()]) answer(undefined);
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
    const slot = result.slot;
    if (slot) {
      const i = conn.slots.findIndex((s) => s.slot === slot.slot);
      if (i >= 0) conn.slots[i] = slot;
    }
    this.answer(r, { ...result, jobId: r.job.jobId, slot: slot && ownDebits(slot, r.from) });
    if (result.status === PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED) this.dropIdleLease(conn, r);
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

  private connectPaymentServer(
    requests: AsyncIterable<ConnectPaymentServerRequest>,
    peer: Peer,
    context: CallContext,
  ): AsyncIterable<ConnectPaymentServerResponse> {
    const out = new AsyncQueue<ConnectPaymentServerResponse>();
    let conn: PaymentServerConn | undefined;
    let hello = false;
    const onMessage = (req: ConnectPaymentServerRequest) => {
      const m = req.message;
      if (!m) return;
      if (!hello) {
        if (m.$case !== "hello") throw new ServerError(Status.INVALID_ARGUMENT, "the first message on ConnectPaymentServer must be a PaymentServerHello");
        if (!isName(m.value.paymentServerId, 64))
          throw new ServerError(Status.INVALID_ARGUMENT, "payment_server_id must be 1..64 characters of [A-Za-z0-9._-]");
        const replica = m.value.replicaId;
        if (replica !== "" && !isName(replica, 64)) throw invalidField("replica_id", "must be empty or 1..64 characters of [A-Za-z0-9._-]");
        if (peer.proven && peer.id !== m.value.paymentServerId) {
          this.o.log.warn("refused a payment server claiming another's identity", { claimed: m.value.paymentServerId, certificate: peer.id });
          throw new NetpurseError(
            Status.PERMISSION_DENIED,
            ErrorReason.ERROR_REASON_NOT_ALLOWED,
            `your certificate is payment server ${peer.id}: you may connect only as ${peer.id}, not as ${m.value.paymentServerId}`,
          );
        }
        const id = m.value.paymentServerId;
        hello = true;
        this.admitSecond(
          "payment server",
          nameOf({ id, replica }),
          () => this.paymentServerNamed(id, replica),
          (stale) => {
            this.disconnectPaymentServer(stale);
            stale.out.close();
          },
          out,
        ).then(
          (admitted) => {
            if (admitted && !out.closed) conn = this.registerPaymentServer(id, replica, peer, out);
          },
          (e: unknown) => out.close(e instanceof Error ? e : new Error(String(e))),
        );
        return;
      }
      if (m.$case === "hello") throw new ServerError(Status.INVALID_ARGUMENT, "PaymentServerHello sent twice on one stream");
      if (!conn) return; // before its welcome, while its identity was being checked
      switch (m.$case) {
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

  private registerPaymentServer(id: string, replica: string, peer: Peer, out: AsyncQueue<ConnectPaymentServerResponse>): PaymentServerConn {
    const conn: PaymentServerConn = {
      peer,
      streamId: randomUUID(),
      id,
      replica,
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
    this.o.log.info("payment server connected", { paymentServer: id, ...(replica ? { replica } : {}) });
    return conn;
  }

  private disconnectPaymentServer(conn: PaymentServerConn): void {
    if (!this.paymentServers.delete(conn.streamId)) return; // already (replaced by a newer stream)
    conn.keepalive.stop();
    // Its jobs not yet sent would be answered to nobody: drop them.
    for (const t of this.terminals.values()) t.queue = t.queue.filter((r) => r.from !== conn);
    const freed = new Set<TerminalConn>();
    for (const [k, lease] of this.leases) {
      if (lease.holder !== conn) continue;
      this.leases.delete(k);
      const t = this.terminals.get(k.slice(0, k.lastIndexOf("/")));
      if (t) freed.add(t);
    }
    for (const t of freed) this.broadcast(t);
    this.o.log.info("payment server disconnected", { paymentServer: conn.id, ...(conn.replica ? { replica: conn.replica } : {}) });
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
    // A PSAM moved to another reader leaves its old slot EMPTY: the slot it is in now counts.
    const holding = t?.slots.filter((s) => hexOf(s.psamId?.value) === psamHex) ?? [];
    const slot = holding.find((s) => !outOfPool(s)) ?? holding[0];
    if (!t || !slot) return fail(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, `no attached terminal ${job.terminalId} with PSAM ${psamHex}`);
    if (outOfPool(slot)) return fail(PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, `PSAM ${psamHex} is out of the pool`);
    // Another payment server's open debit is not this one's to verify or reverse: refused before it takes the PSAM from its owner.
    const task = job.task;
    if (task?.$case === "verifyDebit" || task?.$case === "reverseDebit") {
      const owner = slot.pendingDebits.find((p) => p.psamCounter === task.value.psamCounter)?.paymentServerId;
      if (owner && owner !== from.id) {
        this.o.log.warn("refused a job on another payment server's debit", { paymentServer: from.id, owner, psam: psamHex });
        return fail(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED, `the debit at PSAM counter ${task.value.psamCounter} was issued for another payment server`);
      }
    }
    const key = slotKey(t.id, psamHex);
    const lease = this.leases.get(key);
    // One stream at a time, even among replicas of one identity: each replica leases PSAMs for its own transactions.
    if (lease && lease.holder !== from)
      return fail(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY, `PSAM ${psamHex} is leased to payment server ${nameOf(lease.holder)}`);
    if (!lease) {
      // Per identity, over all its replicas' streams: replica ids are not proven, so more of them must not mean more PSAMs.
      const held = this.leasesOfIdentity(from.id);
      const cap = this.leaseCap();
      if (held >= cap) {
        this.o.log.warn("refused a lease beyond the payment server's share of the pool", { paymentServer: nameOf(from), held, cap });
        return fail(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY, `payment server ${from.id} holds ${held} PSAMs, its share of the pool; release one first`);
      }
      this.leases.set(key, { holder: from, since: Date.now() });
      this.broadcast(t, from);
    }
    if (t.inFlight.size >= t.window && t.queue.length >= this.o.terminalQueueLimit) {
      return fail(PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED, `terminal ${t.id} has ${t.queue.length} jobs queued`);
    }
    from.inFlight++;
    // The terminal host learns whose job it is from us, from the payment server's certificate, never from the job.
    t.queue.push({ routedId: randomUUID(), job: { ...job, paymentServerId: from.id }, from, queuedAt: Date.now() });
    this.pump(t);
  }

  /** A lease a refused job took is given back, unless its holder has other work on that PSAM: a refusal must not keep a PSAM from its owner. */
  private dropIdleLease(t: TerminalConn, r: RoutedJob): void {
    const psam = hexOf(r.job.psamId?.value);
    const key = slotKey(t.id, psam);
    if (this.leases.get(key)?.holder !== r.from) return;
    const busy = (x: RoutedJob) => x.from === r.from && hexOf(x.job.psamId?.value) === psam;
    if ([...t.inFlight.values()].some(busy) || t.queue.some(busy)) return;
    this.leases.delete(key);
    this.broadcast(t);
  }

  private leasesOf(conn: PaymentServerConn): number {
    let n = 0;
    for (const l of this.leases.values()) if (l.holder === conn) n++;
    return n;
  }

  /** Leases held by every stream of one payment server identity. */
  private leasesOfIdentity(id: string): number {
    let n = 0;
    for (const l of this.leases.values()) if (l.holder.id === id) n++;
    return n;
  }

  /**
   * The most PSAMs one payment server identity may hold, all its replicas
   * together: the configured maximum, and with several identities
   * connected their fair share of the pool, so that one of them (a hostile
   * one, say) cannot starve the others.
   */
  private leaseCap(): number {
    const servers = new Set([...this.paymentServers.values()].map((p) => p.id)).size;
    let slots = 0;
    for (const t of this.terminals.values()) slots += t.slots.filter((s) => !outOfPool(s)).length;
    const share = servers > 1 ? Math.max(1, Math.ceil(slots / servers)) : Infinity;
    return Math.min(this.o.maxLeasesPerPaymentServer, share);
  }

  /** Takes back leases held past the longest a lease may last, unless a job of their holder is at the PSAM right now. */
  private takeBackOldLeases(): void {
    const now = Date.now();
    const changed = new Set<TerminalConn>();
    for (const [key, lease] of this.leases) {
      if (now - lease.since <= this.o.maxLeaseMs) continue;
      const t = this.terminals.get(key.slice(0, key.lastIndexOf("/")));
      const psam = key.slice(key.lastIndexOf("/") + 1);
      const busy = t && [...t.inFlight.values()].some((r) => r.from === lease.holder && hexOf(r.job.psamId?.value) === psam);
      if (busy) continue;
      this.leases.delete(key);
      this.o.log.warn("took back a lease held too long", {
        paymentServer: nameOf(lease.holder),
        psam: key,
        heldMs: now - lease.since,
        maxMs: this.o.maxLeaseMs,
      });
      if (t) changed.add(t);
    }
    for (const t of changed) this.broadcast(t);
  }

  /** Ends the streams of peers whose certificate was revoked after they connected. */
  private endRevokedStreams(): void {
    const revoked = (p: Peer, what: string) => {
      if (!peerRevoked(p)) return false;
      this.o.log.warn("ending the stream of a peer whose certificate is revoked", { peer: what });
      return true;
    };
    const end = new NetpurseError(Status.UNAUTHENTICATED, ErrorReason.ERROR_REASON_UNAUTHENTICATED, "your certificate has been revoked");
    for (const t of this.terminals.values()) if (revoked(t.peer, `terminal ${t.id}`)) t.out.close(end);
    for (const p of this.paymentServers.values()) if (revoked(p.peer, `payment server ${nameOf(p)}`)) p.out.close(end);
  }

  /** Answers jobs that waited in a terminal's queue too long: they were never sent, so another PSAM may take them. */
  private expireQueuedJobs(): void {
    const now = Date.now();
    for (const t of this.terminals.values()) {
      const stale = t.queue.filter((r) => now - r.queuedAt > this.o.queuedJobTtlMs);
      if (stale.length === 0) continue;
      t.queue = t.queue.filter((r) => now - r.queuedAt <= this.o.queuedJobTtlMs);
      for (const r of stale) {
        this.answer(r, {
          status: PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED,
          message: `not sent: waited ${now - r.queuedAt} ms in the queue for terminal ${t.id} (at most ${this.o.queuedJobTtlMs} ms)`,
        });
      }
    }
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
    if (this.leases.get(key)?.holder !== from) return; // only its own lease
    this.leases.delete(key);
    const t = this.terminals.get(terminalId);
    if (t) this.broadcast(t, from);
  }

  // ---- closing batches ---------------------------------------------------

  /**
   * An operator's CloseBatches: each terminal host concerned closes its
   * PSAMs' batches itself, asked on its stream; a host that does not answer
   * in time is reported, not waited for.
   */
  private async closeBatches(req: CloseBatchesRequest, signal: AbortSignal): Promise<CloseBatchesResponse> {
    if (req.terminalId !== "" && !isName(req.terminalId, 64)) throw invalidField("terminal_id", "must be 1..64 characters of [A-Za-z0-9._-]");
    if (req.psamId && req.psamId.value.length !== 4) throw invalidField("psam_id", `must be 4 bytes, got ${req.psamId.value.length}`);
    const psam = req.psamId ? hexOf(req.psamId.value) : undefined;
    let targets = [...this.terminals.values()];
    if (req.terminalId !== "") {
      const t = this.terminals.get(req.terminalId);
      if (!t) throw notFound(`no terminal host ${req.terminalId} is attached`);
      targets = [t];
    }
    if (psam !== undefined) {
      targets = targets.filter((t) => t.slots.some((s) => hexOf(s.psamId?.value) === psam));
      if (targets.length === 0) throw notFound(`no attached terminal host${req.terminalId ? ` ${req.terminalId}` : ""} holds PSAM ${psam}`);
    }
    const reports = await Promise.all(targets.map(async (t) => ({ t, report: await this.askToClose(t, psam, signal) })));
    const response: CloseBatchesResponse = { closed: [], notClosed: [] };
    for (const { t, report } of reports) {
      if (!report) {
        this.o.log.warn("a terminal host did not report the batches it closed in time", { terminal: t.id });
        response.notClosed.push({ terminalId: t.id, psamId: undefined, reason: BatchNotClosedReason.BATCH_NOT_CLOSED_REASON_TERMINAL_UNANSWERED });
        continue;
      }
      // The terminal id is the one its certificate proved, whatever its report says; and a host speaks only for the PSAMs in its
      // own slots (and the one asked for): a report on another host's PSAM would hide that its batch was never closed.
      const own = (p: { value: Uint8Array } | undefined) => {
        const hex = hexOf(p?.value);
        return t.slots.some((s) => hexOf(s.psamId?.value) === hex) && (psam === undefined || hex === psam);
      };
      const ignored = [...report.closed, ...report.notClosed].filter((x) => x.psamId !== undefined && !own(x.psamId));
      if (ignored.length > 0) this.o.log.warn("a terminal host reported on PSAMs it does not hold; ignored", { terminal: t.id, reports: ignored.length });
      response.closed.push(...report.closed.filter((c) => own(c.psamId)).map((c) => ({ ...c, terminalId: t.id })));
      response.notClosed.push(...report.notClosed.filter((n) => n.psamId === undefined || own(n.psamId)).map((n) => ({ ...n, terminalId: t.id })));
    }
    const order = (a: { terminalId: string; psamId?: { value: Uint8Array } | undefined }, b: typeof a) =>
      a.terminalId.localeCompare(b.terminalId) || hexOf(a.psamId?.value).localeCompare(hexOf(b.psamId?.value));
    response.closed.sort(order);
    response.notClosed.sort(order);
    this.o.log.info("batches closed for an operator", { closed: response.closed.length, notClosed: response.notClosed.length });
    return response;
  }

  /** Sends a terminal host a CloseBatchesCommand; resolves with its report, or undefined when none comes in time. */
  private askToClose(t: TerminalConn, psam: string | undefined, signal: AbortSignal): Promise<CloseBatchesReport | undefined> {
    const requestId = randomUUID();
    return new Promise((resolve) => {
      const done = (report: CloseBatchesReport | undefined) => {
        clearTimeout(timer);
        signal.removeEventListener("abort", onAbort);
        t.closeRequests.delete(requestId);
        resolve(report);
      };
      const onAbort = () => done(undefined);
      const timer = setTimeout(() => done(undefined), this.o.closeBatchesTimeoutMs);
      signal.addEventListener("abort", onAbort);
      t.closeRequests.set(requestId, done);
      t.out.push({ message: { $case: "closeBatches", value: { requestId, psamIds: psam === undefined ? [] : [toPsamId(psam)] } } });
    });
  }

  // ---- views ------------------------------------------------------------

  /**
   * A terminal as a payment server sees it: slots leased to others show
   * BUSY, and of the open debits only its own (and those whose owner the
   * host does not know); operators see everything.
   */
  private info(t: TerminalConn, viewer?: PaymentServerConn): TerminalInfo {
    return {
      terminalId: t.id,
      attachedAt: t.attachedAt,
      jobsInFlight: t.inFlight.size,
      window: t.window,
      slots: t.slots.map((s) => {
        const holder = this.leases.get(slotKey(t.id, hexOf(s.psamId?.value)))?.holder;
        const busy = holder && holder !== viewer && s.state === PsamSlotState.PSAM_SLOT_STATE_READY;
        const shown = viewer ? ownDebits(s, viewer) : s;
        return busy ? { ...shown, state: PsamSlotState.PSAM_SLOT_STATE_BUSY } : shown;
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
        replicaId: p.replica,
        connectedAt: p.connectedAt,
        jobsInFlight: p.inFlight,
        psamsLeased: this.leasesOf(p),
      })),
    };
  }

  close(): void {
    clearInterval(this.leaseSweep);
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
