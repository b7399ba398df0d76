// The payment server's streams to the concentrators (ConnectPaymentServer),
// one to each of a list: they feed the one PSAM pool (psam-pool.ts) with
// the terminals the concentrators announce, carry PSAM jobs to leased PSAMs
// through the concentrator each terminal host is attached to now and bring
// their results back, and give leases back at the concentrators.
//
// A terminal host is attached to one concentrator at a time, but while it
// moves two may announce it: the old one until it notices the stream ended
// (or the payment server's stream to it ends), the new one from the host's
// new attach; and the two announcements reach us in either order. So each
// stream keeps its own view of its terminals, and the pool sees a terminal
// as the concentrator it attached to last shows it (the later attached_at):
// a late "detached" from the old one neither takes it out of the pool nor
// counts it twice.

import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { randomUUID } from "node:crypto";
import { addressList } from "../../lib/address-list.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { keepConnected } from "../../lib/streams.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";
import { hexOf, isName, psamId as toPsamId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import {
  PsamJobStatus,
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type ConnectPaymentServerRequest,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
  type TerminalInfo,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import type { Lease, PsamPool, SlotInfo, TerminalSlots } from "./psam-pool.js";

/** A slot as the pool needs it. */
const slotInfo = (s: PsamSlot): SlotInfo => ({
  psamId: hexOf(s.psamId?.value),
  keyVersions: s.keyVersions,
  currencies: s.currencies,
  ready: s.state === PsamSlotState.PSAM_SLOT_STATE_READY,
});

/**
 * A terminal as the pool needs it: one entry per PSAM. A PSAM moved to
 * another reader of the terminal leaves its old slot EMPTY; the slot where
 * it answers wins.
 */
const terminalSlots = (t: TerminalInfo): TerminalSlots => {
  const byPsam = new Map<string, SlotInfo>();
  for (const s of t.slots.map(slotInfo)) if (!byPsam.get(s.psamId)?.ready) byPsam.set(s.psamId, s);
  return { terminalId: t.terminalId, slots: [...byPsam.values()] };
};

/** A terminal as one concentrator announced it last. */
interface Announced {
  info: TerminalInfo;
  /** Its attach at that concentrator (ms since the epoch, the concentrator's clock). */
  attachedAt: number;
  /** When we learnt of that attach, in our order of announcements: breaks a tie of attachedAt. */
  seq: number;
}

/** Our stream to one concentrator. */
interface Upstream {
  address: string;
  /** The outgoing side while welcomed; undefined between streams. */
  out: AsyncQueue<ConnectPaymentServerRequest> | undefined;
  /** Jobs sent on this stream and not answered yet. */
  pending: Map<string, { resolve(r: PsamJobResult): void; timer: NodeJS.Timeout; job: PsamJob }>;
  /** The terminals attached there, as it announced them. */
  terminals: Map<string, Announced>;
  /** Why the concentrator refused our last stream, when it refused it as a duplicate (until it welcomes one). */
  refused?: string | undefined;
}

/** The payment server's streams to its concentrators, each reconnected with back-off. */
export class ConcentratorLink {
  private readonly upstreams: Upstream[];
  private stopped = false;
  private readonly abort = new AbortController();
  private loops: Promise<void>[] = [];
  private readyResolve!: () => void;
  private ready = new Promise<void>((r) => (this.readyResolve = r));
  private announcements = 0;

  constructor(
    private readonly o: {
      /** The concentrators: one address, or several separated by commas. */
      address: string;
      /** TLS to the concentrators, as this payment server's identity. */
      channel: ChannelSecurity;
      paymentServerId: string;
      /** Which replica of the payment server this is (empty when it runs alone): named in each hello. */
      replicaId?: string;
      pool: PsamPool;
      log: Logger;
      /** Called for every terminal the concentrators announce (attach or change), as the one it is attached to shows it. */
      onTerminal(t: TerminalInfo): void;
      /** Called with the PSAM state of a result that came after we gave up on its job. */
      onLateResult(terminalId: string, slot: PsamSlot): void;
    },
  ) {
    if (o.replicaId && !isName(o.replicaId, 64)) throw new Error(`replica id ${JSON.stringify(o.replicaId)}: 1..64 characters of [A-Za-z0-9._-]`);
    this.upstreams = addressList(o.address, "concentrator address").map((address) => ({ address, out: undefined, pending: new Map(), terminals: new Map() }));
  }

  start(): void {
    this.loops = this.upstreams.map((u) => this.run(u));
  }

  /** Resolves once at least one concentrator has welcomed us. */
  whenReady(): Promise<void> {
    return this.ready;
  }

  /** Why concentrators refused our streams as duplicates of another replica's, if any did (for the health's reason). */
  refusals(): string[] {
    return this.upstreams.flatMap((u) => (u.refused ? [u.refused] : []));
  }

  /** How many concentrators we hold a welcomed stream to now. */
  connectedCount(): number {
    return this.upstreams.filter((u) => u.out).length;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    await Promise.all(this.loops.map((l) => l.catch(() => undefined)));
  }

  private async run(u: Upstream): Promise<void> {
    const channel = openChannel(u.address, this.o.channel, { maxMessageBytes: 256 * 1024 });
    const client = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
    await keepConnected({
      what: `concentrator ${u.address}`,
      session: () => this.session(u, client),
      stopped: () => this.stopped,
      log: this.o.log,
      afterSession: () => {
        this.failAll(u, `the stream to concentrator ${u.address} ended before the terminal answered`);
        // It announces its pool afresh on the next stream; until then its terminals count only where another announces them.
        for (const id of [...u.terminals.keys()]) this.forget(u, id);
      },
    });
    channel.close();
  }

  private async session(u: Upstream, client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>): Promise<void> {
    const out = new AsyncQueue<ConnectPaymentServerRequest>();
    out.push({ message: { $case: "hello", value: { paymentServerId: this.o.paymentServerId, window: 4096, replicaId: this.o.replicaId ?? "" } } });
    try {
      for await (const m of client.connectPaymentServer(out, { signal: this.abort.signal })) {
        const msg = m.message;
        if (!msg) continue;
        switch (msg.$case) {
          case "welcome":
            u.out = out;
            u.refused = undefined;
            this.o.log.info("connected to the concentrator", { concentrator: msg.value.concentratorId, address: u.address });
            this.readyResolve();
            break;
          case "poolUpdate":
            if (msg.value.terminal) this.announce(u, msg.value.terminal);
            else if (msg.value.detachedTerminalId) this.forget(u, msg.value.detachedTerminalId);
            break;
          case "result": {
            const p = u.pending.get(msg.value.jobId);
            if (!p) {
              // Answered after we gave up on it: what the PSAM did shows in its state.
              if (msg.value.slot) {
                if (this.routeOf(msg.value.terminalId) === u) this.o.pool.updateSlot(msg.value.terminalId, slotInfo(msg.value.slot));
                this.o.onLateResult(msg.value.terminalId, msg.value.slot);
              }
              break;
            }
            u.pending.delete(msg.value.jobId);
            clearTimeout(p.timer);
            p.resolve(msg.value);
            break;
          }
          case "ping":
            out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
            break;
        }
      }
    } catch (e) {
      if (e instanceof ClientError && e.code === Status.ALREADY_EXISTS) {
        // Another live stream has this identity and replica id: retrying changes nothing until one of the two is renamed.
        this.o.log.error(
          "the concentrator refused this replica's stream: another one with the same payment server id and replica id is connected; give each replica its own --replica",
          {
            concentrator: u.address,
            paymentServer: this.o.paymentServerId,
            replica: this.o.replicaId ?? "(none)",
            details: e.details,
          },
        );
        u.refused = `concentrator ${u.address} refused the stream: payment server ${this.o.paymentServerId} replica "${this.o.replicaId ?? ""}" is connected there already (give each replica its own --replica)`;
      }
      throw e;
    } finally {
      if (u.out === out) u.out = undefined;
      out.close();
    }
  }

  /** A concentrator announced a terminal (attached or changed). */
  private announce(u: Upstream, info: TerminalInfo): void {
    const attachedAt = info.attachedAt?.getTime() ?? 0;
    const known = u.terminals.get(info.terminalId);
    // A change at the same attach keeps its place; a new attach there is news.
    const seq = known && known.attachedAt === attachedAt ? known.seq : ++this.announcements;
    u.terminals.set(info.terminalId, { info, attachedAt, seq });
    if (this.routeOf(info.terminalId) !== u) return; // an older attach elsewhere: the host has left it
    this.o.pool.updateTerminal(terminalSlots(info));
    this.o.onTerminal(info);
  }

  /** A concentrator no longer has a terminal (it detached, or our stream there ended). */
  private forget(u: Upstream, terminalId: string): void {
    const wasRoute = this.routeOf(terminalId) === u;
    if (!u.terminals.delete(terminalId) || !wasRoute) return;
    const now = this.routeOf(terminalId);
    if (!now) {
      this.o.pool.removeTerminal(terminalId);
      return;
    }
    // Attached elsewhere already: the pool takes that view, its leases kept.
    const info = now.terminals.get(terminalId)!.info;
    this.o.pool.updateTerminal(terminalSlots(info));
    this.o.onTerminal(info);
  }

  /** The concentrator a terminal host is attached to now: of those announcing it, the one it attached to last. */
  private routeOf(terminalId: string): Upstream | undefined {
    let best: { u: Upstream; a: Announced } | undefined;
    for (const u of this.upstreams) {
      const a = u.terminals.get(terminalId);
      if (!a) continue;
      if (!best || a.attachedAt > best.a.attachedAt || (a.attachedAt === best.a.attachedAt && a.seq > best.a.seq)) best = { u, a };
    }
    return best?.u;
  }

  private failAll(u: Upstream, message: string): void {
    for (const [id, p] of u.pending) {
      clearTimeout(p.timer);
      p.resolve(this.lost(p.job, message));
      u.pending.delete(id);
    }
  }

  private lost(job: PsamJob, message: string): PsamJobResult {
    return {
      jobId: job.jobId,
      terminalId: job.terminalId,
      psamId: job.psamId,
      status: PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST,
      statusWord: 0,
      message,
      slot: undefined,
      outcome: undefined,
    };
  }

  /**
   * Sends one job to a leased PSAM, through the concentrator its terminal
   * host is attached to now, and waits for its result. A job that gets no
   * answer within `timeoutMs`, or whose stream breaks, ends as
   * TERMINAL_LOST: the PSAM may or may not have done it.
   */
  runJob(lease: Lease, job: Omit<PsamJob, "jobId" | "terminalId" | "psamId" | "paymentServerId">, timeoutMs: number): Promise<PsamJobResult> {
    // payment_server_id is the concentrator's to set, from this server's certificate.
    const full: PsamJob = { ...job, jobId: randomUUID(), terminalId: lease.terminalId, psamId: toPsamId(lease.psamId), paymentServerId: "" };
    const u = this.routeOf(lease.terminalId);
    const out = u?.out;
    if (!u || !out) {
      const why = u ? `not connected to concentrator ${u.address}` : `terminal ${lease.terminalId} is attached to no concentrator we are connected to`;
      return Promise.resolve({ ...this.lost(full, why), status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM });
    }
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        u.pending.delete(full.jobId);
        resolve(this.lost(full, `no answer from terminal ${lease.terminalId} within ${timeoutMs} ms`));
      }, timeoutMs);
      u.pending.set(full.jobId, { resolve, timer, job: full });
      out.push({ message: { $case: "job", value: full } });
    });
  }

  /**
   * Gives a PSAM's lease back: at every concentrator that shows its terminal
   * (the one it is attached to now, and one it may have left without that
   * concentrator knowing yet); each gives back only a lease of ours.
   */
  release(l: Lease): void {
    for (const u of this.upstreams) {
      if (u.terminals.has(l.terminalId)) u.out?.push({ message: { $case: "release", value: { terminalId: l.terminalId, psamId: toPsamId(l.psamId) } } });
    }
  }
}
