// A terminal host: it holds PSAM slots, dials the concentrator, keeps one
// long-lived stream, announces its slots and works off PSAM jobs one per
// slot at a time. For a draw request it replays the card's responses to the
// PSAM one by one, as if the card were in the slot (step 688), and it keeps
// its own data store of recorded transactions, reversals and closed batches
// (step 630). The PSAM's MACs over its answers (DEBIT command issued, its
// verdict, a reversal) go to the payment server as they are: the payment
// server believes an answer only when its MAC verifies.

import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ApduError, SW, swHex } from "../../lib/apdu/apdu.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { keepConnected } from "../../lib/streams.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import type { Security } from "../../lib/pki/security.js";
import { hexOf, psamId as toPsamId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { DrawAmountCommand, Verdict } from "../../lib/protocol/psam.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { DebitResponse } from "../../lib/protocol/purse.js";
import type { Db } from "../../lib/store/db.js";
import {
  DebitVerdict,
  PsamJobStatus,
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type AttachTerminalRequest,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { PsamDriver } from "./psam/psam-driver.js";
import { SoftwarePsam } from "./psam/software-psam.js";
import { TerminalStore } from "./store.js";

export interface TerminalHostOptions {
  terminalId: string;
  concentratorAddress: string;
  /** TLS to the concentrator, as this terminal's identity. */
  security: Security;
  psamFiles: string[];
  db: Db;
  log: Logger;
  /** Most jobs in flight the host accepts (default: one per slot, at least 1). */
  window?: number;
  /** Close the PSAM's batch once it holds this many records. */
  batchCloseAt?: number;
  /** Fault injection for tests: do each job, then wait this long before answering (a slow or dying link). */
  answerDelayMs?: number;
}

interface Slot {
  index: number;
  psam: SoftwarePsam;
  driver: PsamDriver;
  mutex: Mutex;
  failed: boolean;
}

export class TerminalHost {
  private slots: Slot[] = [];
  private readonly store: TerminalStore;
  private stopped = false;
  private abort = new AbortController();
  private connected: Promise<void>;
  private markConnected!: () => void;
  private loop: Promise<void> | undefined;
  /** The current stream's outgoing side, for slot updates outside a job. */
  private out: AsyncQueue<AttachTerminalRequest> | undefined;

  constructor(private readonly o: TerminalHostOptions) {
    this.store = new TerminalStore(o.db);
    this.connected = new Promise((r) => (this.markConnected = r));
  }

  async start(): Promise<void> {
    this.slots = await Promise.all(
      this.o.psamFiles.map(async (file, index) => {
        const psam = await SoftwarePsam.open(file);
        const driver = new PsamDriver(new InProcessTransport(psam));
        await driver.connect();
        const slot = { index, psam, driver, mutex: new Mutex(), failed: false };
        await this.syncStore(slot);
        return slot;
      }),
    );
    this.loop = this.run();
  }

  /**
   * Copies into the host's store what the PSAM holds that the store may have
   * missed (a crash between the PSAM's write and the store's): the current
   * batch's records and the last closed batch. Every write is idempotent.
   */
  private async syncStore(slot: Slot): Promise<void> {
    const st = await slot.driver.readStatus();
    for (const r of await slot.driver.readBatch()) await this.store.recordTransaction(slot.psam.psamId, st.batchNumber, r, "sync");
    const closed = await slot.driver.lastClosedBatch();
    if (closed) await this.store.recordBatch(closed);
  }

  /** Resolves once the host has been welcomed by the concentrator. */
  whenConnected(): Promise<void> {
    return this.connected;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.abort.abort();
    await this.loop?.catch(() => undefined);
  }

  /** Connects, and reconnects with back-off whenever the stream ends. */
  private async run(): Promise<void> {
    const channel = openChannel(this.o.concentratorAddress, this.o.security.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
    const client = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
    await keepConnected({ what: "concentrator", session: () => this.session(client), stopped: () => this.stopped, log: this.o.log });
    channel.close();
  }

  private async session(client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>): Promise<void> {
    const out = new AsyncQueue<AttachTerminalRequest>();
    this.out = out;
    const window = this.o.window ?? Math.max(1, this.slots.length);
    out.push({
      message: { $case: "hello", value: { terminalId: this.o.terminalId, window, slots: await Promise.all(this.slots.map((s) => this.slotInfo(s))) } },
    });
    const stream = client.attachTerminal(out, { signal: this.abort.signal });
    try {
      for await (const m of stream) {
        const msg = m.message;
        if (!msg) continue;
        switch (msg.$case) {
          case "welcome":
            this.o.log.info("attached to the concentrator", { concentrator: msg.value.concentratorId, slots: this.slots.length });
            this.markConnected();
            break;
          case "ping":
            out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
            break;
          case "job": {
            const job = msg.value;
            const answer = (result: PsamJobResult) => out.push({ message: { $case: "result", value: result } });
            this.handle(job).then(answer, (e: unknown) => {
              this.o.log.error("job failed", { job: job.jobId, error: (e as Error).message });
              answer({ ...this.resultBase(job), status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, message: (e as Error).message });
            });
            break;
          }
        }
      }
    } finally {
      out.close();
    }
  }

  private async slotInfo(s: Slot): Promise<PsamSlot> {
    const base = { slot: s.index, psamId: toPsamId(s.psam.psamId), keyVersions: s.psam.keyVersions, currencies: [s.psam.currency] };
    if (s.failed) return { ...base, state: PsamSlotState.PSAM_SLOT_STATE_FAILED, psamCounter: 0, pendingDebits: [], batchCount: 0 };
    const st = await s.driver.readStatus();
    const pending = await s.driver.readPending();
    const pendingDebits = await Promise.all(
      pending.map(async (p) => ({
        psamCounter: p.psamCounter,
        transactionId: txnId(p.transactionRef),
        amount: money(p.amount, p.currency, 0),
        paymentServerId: (await this.store.ownerOf(p.transactionRef)) ?? "",
      })),
    );
    return { ...base, state: PsamSlotState.PSAM_SLOT_STATE_READY, psamCounter: st.psamCounter, batchCount: st.batchCount, pendingDebits };
  }

  private resultBase(job: PsamJob) {
    return { jobId: job.jobId, terminalId: this.o.terminalId, psamId: job.psamId, statusWord: 0, message: "", slot: undefined, outcome: undefined };
  }

  private async handle(job: PsamJob): Promise<PsamJobResult> {
    const psamHex = hexOf(job.psamId?.value);
    const base = this.resultBase(job);
    const slot = this.slots.find((s) => s.psam.psamId === psamHex);
    if (!slot) return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, message: `no PSAM ${psamHex} in terminal ${this.o.terminalId}` };
    const result = await slot.mutex.run(async (): Promise<PsamJobResult> => {
      try {
        const refusal = await this.refusalOf(slot, job);
        if (refusal) {
          this.o.log.warn("refused a job on another payment server's debit", { psam: psamHex, paymentServer: job.paymentServerId, why: refusal });
          return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED, message: refusal };
        }
        const outcome = await this.work(slot, job);
        return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_OK, statusWord: 0x9000, outcome, slot: await this.slotInfo(slot) };
      } catch (e) {
        if (e instanceof ApduError) {
          return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED, statusWord: e.sw, message: e.message, slot: await this.slotInfo(slot) };
        }
        if (e instanceof JobInvalid || e instanceof LayoutError) return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_INVALID, message: e.message };
        slot.failed = true;
        this.o.log.error("PSAM failed; slot out of the pool", { psam: psamHex, error: (e as Error).message });
        this.probeLater(slot);
        return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, message: (e as Error).message, slot: await this.slotInfo(slot) };
      }
    });
    if (this.o.answerDelayMs) await new Promise((r) => setTimeout(r, this.o.answerDelayMs));
    return result;
  }

  /**
   * Why a payment server may not have this job done, if it may not: a DEBIT
   * command is issued for the payment server that asked first for the
   * transaction, and only that one may have the debit verified or reversed.
   * The PSAM's own record of the counter says which transaction it is, not
   * the job. Debits issued before owners were recorded (or jobs without an
   * owner, on an --insecure network) are not checked.
   */
  private async refusalOf(slot: Slot, job: PsamJob): Promise<string | undefined> {
    const who = job.paymentServerId;
    if (!who) return undefined;
    const task = job.task;
    if (task?.$case === "issueDebitCommand") {
      if (!job.transactionId) return undefined; // refused as INVALID by the job itself
      return (await this.store.claim(job.transactionId.value, who)) ? undefined : `transaction ${job.transactionId.value} belongs to another payment server`;
    }
    if (task?.$case !== "verifyDebit" && task?.$case !== "reverseDebit") return undefined;
    const counter = task.value.psamCounter;
    const open = (await slot.driver.readPending()).find((p) => p.psamCounter === counter);
    const transaction = open?.transactionRef ?? (await this.store.settledTransaction(slot.psam.psamId, counter));
    const owner = transaction ? await this.store.ownerOf(transaction) : undefined;
    return owner && owner !== who ? `the debit at PSAM counter ${counter} was issued for payment server ${owner}` : undefined;
  }

  private async work(slot: Slot, job: PsamJob): Promise<PsamJobResult["outcome"]> {
    const task = job.task;
    const psamHex = slot.psam.psamId;
    switch (task?.$case) {
      case "issueDebitCommand": {
        const t = task.value;
        if (!t.amount || !t.merchantId || !job.transactionId) throw new JobInvalid("issue_debit_command needs amount, merchant_id and transaction_id");
        if (t.amount.amountMinor < 0n || t.amount.amountMinor > 0xffffffffn || t.amount.currency > 0xffff)
          throw new JobInvalid("issue_debit_command: amount out of range");
        // The draw is encoded before the PSAM sees anything: a malformed job fails here, as INVALID.
        const request = {
          cardAtr: Buffer.from(t.cardAtr),
          initializeResponse: Buffer.from(t.initializeResponse),
          draw: { amount: Number(t.amount.amountMinor), currency: t.amount.currency, transactionRef: job.transactionId.value, merchantId: t.merchantId.value },
          returnExpectedSignature: t.returnExpectedSignature,
        };
        DrawAmountCommand.encode(request.draw);
        const issued = await slot.driver.issueDebitCommand(request).catch(async (e) => {
          if (!(e instanceof ApduError && e.sw === SW.BATCH_FULL)) throw e;
          await this.closeBatch(slot); // full: close it and draw again
          return slot.driver.issueDebitCommand(request);
        });
        this.o.log.info("debit command issued", { psam: psamHex, psamCounter: issued.psamCounter, transaction: job.transactionId.value });
        return {
          $case: "debitCommandIssued",
          value: {
            debitCommand: issued.debitCommand,
            psamCounter: issued.psamCounter,
            expectedCardSignature: issued.expectedCardSignature ?? Buffer.alloc(0),
            issuedMac: issued.issuedMac,
          },
        };
      }
      case "verifyDebit": {
        const t = task.value;
        if (t.cardStatusWord !== 0x9000 || t.debitResponse.length !== DebitResponse.size) {
          throw new JobInvalid(
            `verify_debit needs the card's 9000 answer of ${DebitResponse.size} bytes (got SW ${swHex(t.cardStatusWord)}, ${t.debitResponse.length} bytes)`,
          );
        }
        const v = await slot.driver.verifyDebit(t.psamCounter, Buffer.from(t.debitResponse));
        const answer = DebitResponse.decode(t.debitResponse);
        if (v.verdict === Verdict.RECORDED) {
          await this.keep(() => this.storeRecord(slot, t.psamCounter, v.batchNumber, job.jobId));
          this.o.log.info("debit recorded in batch", { psam: psamHex, psamCounter: t.psamCounter, batch: v.batchNumber });
          const st = await slot.driver.readStatus();
          if (st.batchCount >= (this.o.batchCloseAt ?? 200)) await this.closeBatch(slot);
        } else {
          await this.keep(() => this.store.recordReversal(psamHex, t.psamCounter, job.transactionId?.value ?? "", "declined by card"));
        }
        return {
          $case: "debitVerified",
          value: {
            verdict: v.verdict === Verdict.RECORDED ? DebitVerdict.DEBIT_VERDICT_RECORDED : DebitVerdict.DEBIT_VERDICT_DECLINED_BY_CARD,
            recordMac: v.recordMac,
            batchNumber: v.batchNumber,
            newBalance: money(answer.balance, slot.psam.currency, 0),
            cardResult: answer.result,
            verdictMac: v.verdictMac,
          },
        };
      }
      case "reverseDebit": {
        const reversalMac = await slot.driver.reverseDebit(task.value.psamCounter);
        await this.keep(() => this.store.recordReversal(psamHex, task.value.psamCounter, job.transactionId?.value ?? "", "reversed by payment server"));
        this.o.log.info("debit reversed", { psam: psamHex, psamCounter: task.value.psamCounter });
        return { $case: "debitReversed", value: { psamCounter: task.value.psamCounter, reversalMac } };
      }
      default:
        throw new JobInvalid("job has no task");
    }
  }

  /** Tries a failed PSAM again every 5 s; once it answers, it is announced back into the pool. */
  private probeLater(slot: Slot): void {
    const timer = setTimeout(() => {
      if (this.stopped || !slot.failed) return;
      slot.mutex
        .run(async () => {
          await slot.driver.connect();
          await slot.driver.readStatus();
          slot.failed = false;
          this.o.log.info("PSAM answers again; slot back in the pool", { psam: slot.psam.psamId });
          this.out?.push({ message: { $case: "slotUpdate", value: { slot: await this.slotInfo(slot) } } });
        })
        .catch(() => this.probeLater(slot));
    }, 5_000);
    timer.unref();
  }

  /** Stores the batch record of one PSAM counter (normally the newest; absent when a retry found it in a closed batch). */
  private async storeRecord(slot: Slot, psamCounter: number, batchNumber: number, jobId: string): Promise<void> {
    const st = await slot.driver.readStatus();
    for (let i = st.batchCount - 1; i >= 0; i--) {
      const r = await slot.driver.readBatchRecord(i);
      if (r?.psamCounter === psamCounter) return this.store.recordTransaction(slot.psam.psamId, batchNumber, r, jobId);
    }
  }

  /**
   * The host's store is its own record of what the PSAM already holds; a
   * failure to write it must not fail the job (the PSAM's answer is the fact),
   * and syncStore catches up at the next start.
   */
  private async keep(write: () => Promise<void>): Promise<void> {
    await write().catch((e) => this.o.log.error("terminal store write failed; it catches up at the next start", { error: (e as Error).message }));
  }

  /** Closes the PSAM's batch, having first stored every record in it. */
  private async closeBatch(slot: Slot): Promise<void> {
    const st = await slot.driver.readStatus();
    for (const r of await slot.driver.readBatch()) await this.store.recordTransaction(slot.psam.psamId, st.batchNumber, r, "close");
    const closed = await slot.driver.closeBatch();
    await this.keep(() => this.store.recordBatch(closed));
    this.o.log.info("batch closed", { psam: slot.psam.psamId, batch: closed.batchNumber, count: closed.count, total: closed.total });
  }

  /** Reads the host's data store (for tests and operators). */
  get data(): TerminalStore {
    return this.store;
  }
}

class JobInvalid extends Error {}
