// The payment server's stream to the concentrator (ConnectPaymentServer):
// it feeds the PSAM pool (psam-pool.ts) with the terminals the concentrator
// announces, carries PSAM jobs to leased PSAMs and brings their results back,
// and gives leases back at the concentrator.

import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { randomUUID } from "node:crypto";
import { AsyncQueue } from "../../lib/async-queue.js";
import { keepConnected } from "../../lib/streams.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";
import { hexOf, psamId as toPsamId } from "../../lib/ids.js";
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

/** The payment server's stream to the concentrator, reconnected with back-off. */
export class ConcentratorLink {
  private out: AsyncQueue<ConnectPaymentServerRequest> | undefined;
  private readonly pending = new Map<string, { resolve(r: PsamJobResult): void; timer: NodeJS.Timeout; job: PsamJob }>();
  private stopped = false;
  private readonly abort = new AbortController();
  private loop: Promise<void> | undefined;
  private readyResolve!: () => void;
  private ready = new Promise<void>((r) => (this.readyResolve = r));

  constructor(
    private readonly o: {
      address: string;
      /** TLS to the concentrator, as this payment server's identity. */
      channel: ChannelSecurity;
      paymentServerId: string;
      pool: PsamPool;
      log: Logger;
      /** Called for every terminal the concentrator announces (attach or change). */
      onTerminal(t: TerminalInfo): void;
      /** Called with the PSAM state of a result that came after we gave up on its job. */
      onLateResult(terminalId: string, slot: PsamSlot): void;
    },
  ) {}

  start(): void {
    this.loop = this.run();
  }

  whenReady(): Promise<void> {
    return this.ready;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    await this.loop?.catch(() => undefined);
  }

  private async run(): Promise<void> {
    const channel = openChannel(this.o.address, this.o.channel, { maxMessageBytes: 256 * 1024 });
    const client = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
    await keepConnected({
      what: "concentrator",
      session: () => this.session(client),
      stopped: () => this.stopped,
      log: this.o.log,
      afterSession: () => {
        this.failAll("the stream to the concentrator ended before the terminal answered");
        this.o.pool.clear(); // the concentrator announces the pool afresh on the next stream
      },
    });
    channel.close();
  }

  private async session(client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>): Promise<void> {
    const out = new AsyncQueue<ConnectPaymentServerRequest>();
    out.push({ message: { $case: "hello", value: { paymentServerId: this.o.paymentServerId, window: 4096 } } });
    try {
      for await (const m of client.connectPaymentServer(out, { signal: this.abort.signal })) {
        const msg = m.message;
        if (!msg) continue;
        switch (msg.$case) {
          case "welcome":
            this.out = out;
            this.o.log.info("connected to the concentrator", { concentrator: msg.value.concentratorId });
            this.readyResolve();
            break;
          case "poolUpdate":
            if (msg.value.terminal) {
              this.o.pool.updateTerminal(terminalSlots(msg.value.terminal));
              this.o.onTerminal(msg.value.terminal);
            } else if (msg.value.detachedTerminalId) {
              this.o.pool.removeTerminal(msg.value.detachedTerminalId);
            }
            break;
          case "result": {
            const p = this.pending.get(msg.value.jobId);
            if (!p) {
              // Answered after we gave up on it: what the PSAM did shows in its state.
              if (msg.value.slot) {
                this.o.pool.updateSlot(msg.value.terminalId, slotInfo(msg.value.slot));
                this.o.onLateResult(msg.value.terminalId, msg.value.slot);
              }
              break;
            }
            this.pending.delete(msg.value.jobId);
            clearTimeout(p.timer);
            p.resolve(msg.value);
            break;
          }
          case "ping":
            out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
            break;
        }
      }
    } finally {
      if (this.out === out) this.out = undefined;
      out.close();
    }
  }

  private failAll(message: string): void {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.resolve(this.lost(p.job, message));
      this.pending.delete(id);
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
   * Sends one job to a leased PSAM and waits for its result. A job that gets
   * no answer within `timeoutMs`, or whose stream breaks, ends as
   * TERMINAL_LOST: the PSAM may or may not have done it.
   */
  runJob(lease: Lease, job: Omit<PsamJob, "jobId" | "terminalId" | "psamId" | "paymentServerId">, timeoutMs: number): Promise<PsamJobResult> {
    // payment_server_id is the concentrator's to set, from this server's certificate.
    const full: PsamJob = { ...job, jobId: randomUUID(), terminalId: lease.terminalId, psamId: toPsamId(lease.psamId), paymentServerId: "" };
    const out = this.out;
    if (!out) return Promise.resolve({ ...this.lost(full, "not connected to the concentrator"), status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM });
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.pending.delete(full.jobId);
        resolve(this.lost(full, `no answer from terminal ${lease.terminalId} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(full.jobId, { resolve, timer, job: full });
      out.push({ message: { $case: "job", value: full } });
    });
  }

  /** Gives a PSAM's lease back at the concentrator. */
  release(l: Lease): void {
    this.out?.push({ message: { $case: "release", value: { terminalId: l.terminalId, psamId: toPsamId(l.psamId) } } });
  }
}
