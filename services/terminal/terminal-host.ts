// A terminal host: it holds PSAM slots, dials the concentrator (one of a
// list at a time: when its stream ends or it cannot attach, the next), keeps
// one long-lived stream, announces its slots and works off PSAM jobs one per
// slot at a time. For a draw request it replays the card's responses to the
// PSAM one by one, as if the card were in the slot (step 688), and it keeps
// its own data store of recorded transactions, reversals and closed batches
// (step 630). The PSAM's MACs over its answers (DEBIT command issued, its
// verdict, a reversal) go to the payment server as they are: the payment
// server believes an answer only when its MAC verifies. It closes each PSAM's
// batch on a count, an age or an operator's command, keeps the closed batch
// in its outbox and has the batch submitter (batch-submitter.ts) send it to
// clearing; a close holds the PSAM's slot only for reading the batch and
// CLOSE BATCH itself, never while the batch travels. Its PSAMs are software
// PSAMs (files) or cards in PC/SC readers whose names match a pattern: one
// taken out leaves the pool at once, one put in joins it.

import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ApduError, SW, swHex } from "../../lib/apdu/apdu.js";
import { InProcessTransport, type CardTransport } from "../../lib/apdu/transport.js";
import type { PcscReaders } from "../../lib/pcsc/readers.js";
import { PcscTransport } from "../../lib/pcsc/transport.js";
import { addressList } from "../../lib/address-list.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { keepConnected } from "../../lib/streams.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import type { Security } from "../../lib/pki/security.js";
import { hexOf, psamId as toPsamId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { repeat, type Periodic } from "../../lib/periodic.js";
import { DrawAmountCommand, Verdict } from "../../lib/protocol/psam.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { DebitResponse } from "../../lib/protocol/purse.js";
import { StoreUnavailable, type Db } from "../../lib/store/db.js";
import {
  BatchNotClosedReason,
  DebitVerdict,
  PsamJobStatus,
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type AttachTerminalRequest,
  type BatchNotClosed,
  type CloseBatchesCommand,
  type CloseBatchesReport,
  type ClosedBatch,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { BatchSubmitter, terminalCrashPoint, type BatchSubmitterOptions } from "./batch-submitter.js";
import { PsamDriver } from "./psam/psam-driver.js";
import { SoftwarePsam } from "./psam/software-psam.js";
import { TerminalStore, type ClosedBatchSummary } from "./store.js";

export interface TerminalHostOptions {
  terminalId: string;
  /** The concentrators: one address, or several separated by commas, attached to one at a time in turn. */
  concentratorAddress: string;
  /** TLS to the concentrator, as this terminal's identity. */
  security: Security;
  /** Software PSAMs: their files. */
  psamFiles: string[];
  /** PSAMs in PC/SC readers: every reader whose name matches `pattern` is a slot. */
  psamReaders?: { readers: PcscReaders; pattern: RegExp };
  db: Db;
  log: Logger;
  /** Most jobs in flight the host accepts (default: one per slot, at least 1). */
  window?: number;
  /** Close the PSAM's batch once it holds this many records (default 200). */
  batchCloseAt?: number;
  /** Close a PSAM's non-empty batch once its first record is this old (default 1 h). */
  batchCloseAfterMs?: number;
  /** Clearing's address: closed batches are sent there. Without it they wait in the outbox. */
  clearingAddress?: string;
  /** The batch submitter's deadline and retry timing (batch-submitter.ts). */
  submitter?: Pick<BatchSubmitterOptions, "deadlineMs" | "retryMinMs" | "retryMaxMs" | "refusedRetryMs">;
  /** Fault injection for tests: do each job, then wait this long before answering (a slow or dying link). */
  answerDelayMs?: number;
}

interface Slot {
  index: number;
  /** What the PSAM in it said of itself when it was connected (for an EMPTY slot: the PSAM that left). */
  psam: { psamId: string; keyVersions: number[]; currency: number };
  driver: PsamDriver;
  transport: CardTransport;
  mutex: Mutex;
  failed: boolean;
  /** The PC/SC reader of the slot, if it is one. */
  reader?: string;
  /** Its PSAM was taken out of the reader. */
  empty?: boolean;
  /** When the current batch's first record was made (ms since the epoch); undefined while it is empty. */
  batchSince?: number | undefined;
  /** A close of this slot's batch is queued or running. */
  closing?: boolean;
}

/** Defaults of the batch closing options. */
export const BATCH_CLOSE_DEFAULTS = { closeAt: 200, closeAfterMs: 3_600_000 } as const;

/** The PSAM's verdict byte as the contract names it. */
const DEBIT_VERDICTS = new Map<number, DebitVerdict>([
  [Verdict.RECORDED, DebitVerdict.DEBIT_VERDICT_RECORDED],
  [Verdict.DECLINED_BY_CARD, DebitVerdict.DEBIT_VERDICT_DECLINED_BY_CARD],
  [Verdict.AUTHENTICATED, DebitVerdict.DEBIT_VERDICT_AUTHENTICATED],
]);

export class TerminalHost {
  private slots: Slot[] = [];
  private readonly store: TerminalStore;
  private stopped = false;
  private abort = new AbortController();
  private connected: Promise<void>;
  private markConnected!: () => void;
  private loop: Promise<void> | undefined;
  /** The concentrator of the current stream, once welcomed. */
  private attachedTo: string | undefined;
  /** The current stream's outgoing side, for slot updates outside a job. */
  private out: AsyncQueue<AttachTerminalRequest> | undefined;
  private submitter: BatchSubmitter | undefined;
  private ageCheck: Periodic | undefined;
  /** How long the last batch close held its slot, in ms (for operators and tests). */
  lastCloseHeldMs = 0;

  constructor(private readonly o: TerminalHostOptions) {
    this.store = new TerminalStore(o.db);
    this.connected = new Promise((r) => (this.markConnected = r));
  }

  async start(): Promise<void> {
    this.slots = await Promise.all(
      this.o.psamFiles.map(async (file, index) => {
        const transport = new InProcessTransport(await SoftwarePsam.open(file));
        return this.connectSlot(index, transport);
      }),
    );
    if (this.o.psamReaders) await this.watchReaders(this.o.psamReaders);
    if (this.o.clearingAddress) {
      this.submitter = new BatchSubmitter({
        clearingAddress: this.o.clearingAddress,
        security: this.o.security,
        store: this.store,
        log: this.o.log,
        ...this.o.submitter,
      });
      this.submitter.start();
    } else {
      this.o.log.warn("no clearing address: closed batches wait in the outbox");
    }
    const closeAfterMs = this.o.batchCloseAfterMs ?? BATCH_CLOSE_DEFAULTS.closeAfterMs;
    this.ageCheck = repeat({
      what: "closing old batches",
      everyMs: Math.max(50, Math.min(5_000, Math.floor(closeAfterMs / 2))),
      firstInMs: Math.min(5_000, closeAfterMs),
      log: this.o.log,
      task: () => this.closeOldBatches(closeAfterMs),
    });
    this.loop = this.run();
  }

  /** Connects to a PSAM, learns who it is and brings the store up to date with it. */
  private async connectSlot(index: number, transport: CardTransport, reader?: string): Promise<Slot> {
    const driver = new PsamDriver(transport);
    await driver.connect();
    const st = await driver.readStatus();
    const psam = { psamId: st.psamId.toString("hex"), keyVersions: await driver.readKeyVersions(), currency: st.currency };
    const slot: Slot = { index, psam, driver, transport, mutex: new Mutex(), failed: false, ...(reader ? { reader } : {}) };
    await this.syncStore(slot);
    return slot;
  }

  /**
   * PSAMs in PC/SC readers: the ones in matching readers now join the
   * slots, and from then on a PSAM taken out leaves the pool at once (its
   * job in flight, if any, fails as for a lost terminal: the payment server
   * settles it when the PSAM is back), and a PSAM put in is announced.
   */
  private async watchReaders(w: { readers: PcscReaders; pattern: RegExp }): Promise<void> {
    const matching = (name: string) => w.pattern.test(name);
    w.readers.on("card-inserted", (name: string) => {
      if (matching(name))
        this.psamInserted(w.readers, name).catch((e: unknown) => this.o.log.error("could not take in a PSAM", { reader: name, error: (e as Error).message }));
    });
    const out = (name: string) => {
      if (matching(name)) this.psamRemoved(name);
    };
    w.readers.on("card-removed", out);
    w.readers.on("reader-removed", out);
    for (const r of w.readers.list()) if (matching(r.name) && r.present) await this.psamInserted(w.readers, r.name);
    if (!this.slots.length) this.o.log.warn("no PSAM in any reader yet", { pattern: String(w.pattern), readers: w.readers.list().map((r) => r.name) });
  }

  /** Slot numbers of readers, kept for the host's life so that a reader's slot keeps its number. */
  private readonly readerSlots = new Map<string, number>();

  private readonly connecting = new Set<string>();

  private async psamInserted(readers: PcscReaders, name: string): Promise<void> {
    if (this.connecting.has(name) || this.slots.some((s) => s.reader === name && !s.empty && !s.failed)) return;
    this.connecting.add(name);
    try {
      await this.connectReader(readers, name);
    } finally {
      this.connecting.delete(name);
    }
  }

  private async connectReader(readers: PcscReaders, name: string): Promise<void> {
    const index = this.readerSlots.get(name) ?? this.o.psamFiles.length + this.readerSlots.size;
    this.readerSlots.set(name, index);
    const transport = new PcscTransport(readers, { name }, { log: this.o.log, hold: true });
    try {
      const slot = await this.connectSlot(index, transport, name);
      const i = this.slots.findIndex((s) => s.index === index);
      const old = i >= 0 ? this.slots[i] : undefined;
      if (old) {
        old.empty = true; // no more probes of the slot's former self
        await old.transport.close();
        this.slots[i] = slot;
      } else this.slots.push(slot);
      this.o.log.info("PSAM inserted; in the pool", { reader: name, psam: slot.psam.psamId, slot: index });
      if (this.out) this.out.push({ message: { $case: "slotUpdate", value: { slot: await this.slotInfo(slot) } } });
    } catch (e) {
      await transport.close();
      this.o.log.warn("a card in a PSAM reader does not answer as a PSAM; ignored", { reader: name, error: (e as Error).message });
    }
  }

  private psamRemoved(name: string): void {
    const slot = this.slots.find((s) => s.reader === name && !s.empty);
    if (!slot) return;
    slot.empty = true;
    this.o.log.warn("PSAM taken out; slot out of the pool", { reader: name, psam: slot.psam.psamId, slot: slot.index });
    this.slotInfo(slot)
      .then((info) => this.out?.push({ message: { $case: "slotUpdate", value: { slot: info } } }))
      .catch(() => undefined); // an EMPTY slot's info asks nothing of the PSAM
  }

  /**
   * Copies into the host's store what the PSAM holds that the store may have
   * missed (a crash between the PSAM's write and the store's): the current
   * batch's records, and the last closed batch into the outbox unless the
   * store holds it already (a crash between CLOSE BATCH and the store's
   * write). Every write is idempotent.
   */
  private async syncStore(slot: Slot): Promise<void> {
    const st = await slot.driver.readStatus();
    const open = await slot.driver.readBatch();
    await this.store.recordTransactions(slot.psam.psamId, st.batchNumber, open, "sync");
    slot.batchSince = open.length ? Math.min(...open.map((r) => r.dateTime)) * 1000 : undefined;
    const closed = await slot.driver.lastClosedBatch();
    if (closed) await this.keepClosed(closed);
  }

  /**
   * Puts a closed batch into the outbox, unless the store holds it already.
   * One whose records the store lacks cannot be sent whole: it is set aside
   * ('incomplete') with an error, and clearing reports its number missing.
   */
  private async keepClosed(closed: ClosedBatchSummary): Promise<void> {
    const psamHex = closed.psamId.toString("hex");
    const what = { psam: psamHex, batch: closed.batchNumber, count: closed.count, total: closed.total };
    if (await this.store.batch(psamHex, closed.batchNumber)) return;
    const held = await this.store.batchTally(psamHex, closed.batchNumber);
    if (held.count === closed.count && held.total === closed.total) {
      if (await this.store.recordBatch(closed)) this.o.log.info("closed batch in the outbox", what);
      this.submitter?.wake();
      return;
    }
    const why = `the store holds ${held.count} records totalling ${held.total} of this batch; the PSAM closed ${closed.count} totalling ${closed.total}`;
    await this.store.recordBatch(closed, "incomplete", why);
    this.o.log.error("a closed batch's records are missing from the store: it cannot be sent whole, clearing will report its number missing", {
      ...what,
      why,
    });
  }

  /** Resolves once the host has been welcomed by the concentrator. */
  whenConnected(): Promise<void> {
    return this.connected;
  }

  /** The address of the concentrator the host is attached to now (welcomed); undefined between streams. */
  concentrator(): string | undefined {
    return this.attachedTo;
  }

  async close(): Promise<void> {
    this.stopped = true;
    this.ageCheck?.stop();
    this.abort.abort();
    await this.loop?.catch(() => undefined);
    await this.submitter?.close();
    for (const s of this.slots) await s.transport.close();
  }

  /**
   * Attaches to one concentrator of the list at a time, and whenever the
   * stream ends (or cannot be had) to the next, after the back-off: a
   * concentrator that died leaves its hosts to the others, where their PSAMs
   * appear to every payment server again. With one concentrator, the same
   * one again.
   */
  private async run(): Promise<void> {
    const concentrators = addressList(this.o.concentratorAddress, "concentrator address").map((address) => {
      const channel = openChannel(address, this.o.security.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
      return { address, channel, client: clientFactory().create(TerminalConcentratorServiceDefinition, channel) };
    });
    let next = 0;
    await keepConnected({
      what: "concentrator",
      session: () => {
        const c = concentrators[next]!;
        next = (next + 1) % concentrators.length;
        return this.session(c.client, c.address);
      },
      stopped: () => this.stopped,
      log: this.o.log,
    });
    for (const c of concentrators) c.channel.close();
  }

  private async session(client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>, address: string): Promise<void> {
    const out = new AsyncQueue<AttachTerminalRequest>();
    this.out = out;
    // PSAMs in readers may come later: room for a few more than are in now.
    const window = this.o.window ?? Math.max(this.o.psamReaders ? 4 : 1, this.slots.length);
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
            this.attachedTo = address;
            this.o.log.info("attached to the concentrator", { concentrator: msg.value.concentratorId, address, slots: this.slots.length });
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
          case "closeBatches": {
            const command = msg.value;
            this.closeForOperator(command).then(
              (report) => out.push({ message: { $case: "closeBatchesReport", value: report } }),
              (e: unknown) => this.o.log.error("could not close the batches an operator asked for", { error: (e as Error).message }),
            );
            break;
          }
        }
      }
    } finally {
      if (this.attachedTo === address) this.attachedTo = undefined;
      out.close();
    }
  }

  private async slotInfo(s: Slot): Promise<PsamSlot> {
    const base = { slot: s.index, psamId: toPsamId(s.psam.psamId), keyVersions: s.psam.keyVersions, currencies: [s.psam.currency], reader: s.reader ?? "" };
    if (s.empty) return { ...base, state: PsamSlotState.PSAM_SLOT_STATE_EMPTY, psamCounter: 0, pendingDebits: [], batchCount: 0 };
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
    // A PSAM moved to another reader: the slot it is in now.
    const slot = this.slots.find((s) => s.psam.psamId === psamHex && !s.empty) ?? this.slots.find((s) => s.psam.psamId === psamHex);
    if (!slot) return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, message: `no PSAM ${psamHex} in terminal ${this.o.terminalId}` };
    const result = await slot.mutex.run(async (): Promise<PsamJobResult> => {
      if (slot.empty)
        return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, message: `PSAM ${psamHex} was taken out of reader "${slot.reader}"` };
      try {
        const { refusal, claimSynced } = await this.refusalOf(slot, job);
        if (refusal) {
          this.o.log.warn("refused a job on another payment server's debit", { psam: psamHex, paymentServer: job.paymentServerId, why: refusal });
          return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED, message: refusal };
        }
        claimSynced?.catch(() => undefined); // awaited below, once the PSAM has worked: a failure then fails the job
        const outcome = await this.work(slot, job);
        // The claim's sync ran beside the PSAM's own write; the DEBIT command leaves only once both are on disk.
        await claimSynced;
        return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_OK, statusWord: 0x9000, outcome, slot: await this.slotInfo(slot) };
      } catch (e) {
        if (e instanceof ApduError) {
          return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED, statusWord: e.sw, message: e.message, slot: await this.slotInfo(slot) };
        }
        if (e instanceof JobInvalid || e instanceof LayoutError) return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_INVALID, message: e.message };
        // The host's store failed, not the PSAM: the slot stays in the pool (its state, an open debit included, goes with the answer).
        if (e instanceof StoreUnavailable)
          return { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, message: e.message, slot: await this.slotInfo(slot) };
        this.failSlot(slot, e);
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
  private async refusalOf(slot: Slot, job: PsamJob): Promise<{ refusal?: string; claimSynced?: Promise<void> }> {
    const who = job.paymentServerId;
    if (!who) return {};
    const task = job.task;
    if (task?.$case === "issueDebitCommand") {
      if (!job.transactionId) return {}; // refused as INVALID by the job itself
      const claim = await this.store.claim(job.transactionId.value, who);
      if (claim.granted) return { claimSynced: claim.synced };
      await claim.synced; // the refusal rests on a claim that must be on disk too
      return { refusal: `transaction ${job.transactionId.value} belongs to another payment server` };
    }
    if (task?.$case !== "verifyDebit" && task?.$case !== "reverseDebit") return {};
    const counter = task.value.psamCounter;
    const open = (await slot.driver.readPending()).find((p) => p.psamCounter === counter);
    const transaction = open?.transactionRef ?? (await this.store.settledTransaction(slot.psam.psamId, counter));
    const owner = transaction ? await this.store.ownerOf(transaction) : undefined;
    return owner && owner !== who ? { refusal: `the debit at PSAM counter ${counter} was issued for payment server ${owner}` } : {};
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
          // Full (the PSAM's capacity is below --batch-close-at): close it, this job holds the slot already, and draw again.
          const closed = await this.closeHeld(slot, "full");
          // Written beside the job, not inside the slot's hold: the next close makes sure it landed (closeHeld).
          if (closed) this.keep(() => this.keepClosed(closed)).catch(() => undefined);
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
        const verdict = DEBIT_VERDICTS.get(v.verdict);
        if (verdict === undefined) throw new Error(`the PSAM's answer to VERIFY DEBIT has an unknown verdict ${v.verdict}`);
        if (v.verdict === Verdict.RECORDED) {
          // The record is read from the PSAM in the job's turn; the host's copy is written without the answer waiting
          // for its sync (the PSAM holds the fact; the store's writes keep their order, so a later close sees it).
          const record = await this.batchRecord(slot, t.psamCounter);
          if (record) this.keep(() => this.store.recordTransaction(psamHex, v.batchNumber, record, job.jobId)).catch(() => undefined);
          this.o.log.info("debit recorded in batch", { psam: psamHex, psamCounter: t.psamCounter, batch: v.batchNumber });
          const st = await slot.driver.readStatus();
          if (st.batchCount > 0) slot.batchSince ??= Date.now();
          // Closed after this job has answered: the close waits its turn on the slot, the payment server does not wait for it.
          if (st.batchCount >= (this.o.batchCloseAt ?? BATCH_CLOSE_DEFAULTS.closeAt)) this.closeSoon(slot, "count");
        } else if (v.verdict === Verdict.AUTHENTICATED) {
          // An authentication moved no value: no batch record, nothing for the store to keep.
          this.o.log.info("authentication verified", { psam: psamHex, psamCounter: t.psamCounter });
        } else {
          await this.keep(() => this.store.recordReversal(psamHex, t.psamCounter, job.transactionId?.value ?? "", "declined by card"));
        }
        return {
          $case: "debitVerified",
          value: {
            verdict,
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

  /** Takes a PSAM that failed out of the pool, and tries it again later. */
  private failSlot(slot: Slot, e: unknown): void {
    slot.failed = true;
    this.o.log.error("PSAM failed; slot out of the pool", { psam: slot.psam.psamId, error: (e as Error).message });
    this.probeLater(slot);
  }

  /** Tries a failed PSAM again every 5 s; once it answers, it is announced back into the pool. */
  private probeLater(slot: Slot): void {
    const timer = setTimeout(() => {
      if (this.stopped || !slot.failed || slot.empty) return;
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

  /** The batch record of one PSAM counter (normally the newest; absent when a retry found it in a closed batch). */
  private async batchRecord(slot: Slot, psamCounter: number) {
    const st = await slot.driver.readStatus();
    for (let i = st.batchCount - 1; i >= 0; i--) {
      const r = await slot.driver.readBatchRecord(i);
      if (r?.psamCounter === psamCounter) return r;
    }
    return undefined;
  }

  /**
   * The host's store is its own record of what the PSAM already holds; a
   * failure to write it must not fail the job (the PSAM's answer is the fact),
   * and syncStore catches up at the next start.
   */
  private async keep(write: () => Promise<void>): Promise<void> {
    await write().catch((e) => this.o.log.error("terminal store write failed; it catches up at the next start", { error: (e as Error).message }));
  }

  /**
   * Closes the PSAM's batch; the caller holds the slot. Undefined when the
   * batch is empty (nothing is closed: the PSAM uses no batch number for it).
   * Every record of the batch is in the store before CLOSE BATCH (after it,
   * the PSAM holds them no more): they were stored one by one as they were
   * recorded, and only when the store's count or total differs from the
   * PSAM's is the batch read again. The outbox entry is the caller's to write,
   * after the slot is free again.
   */
  private async closeHeld(slot: Slot, why: string): Promise<ClosedBatchSummary | undefined> {
    const started = performance.now();
    const psamHex = slot.psam.psamId;
    const st = await slot.driver.readStatus();
    if (st.batchCount === 0) return undefined;
    // The PSAM gives back only its last closed batch's trailer: that one must be in the outbox before another close replaces it
    // (its store write may have failed), or its MAC is gone and the batch can never be sent.
    const previous = await slot.driver.lastClosedBatch();
    if (previous && !(await this.store.batch(psamHex, previous.batchNumber))) {
      await this.keepClosed(previous).catch((e: unknown) => {
        throw new OutboxNotWritten(
          `batch ${previous.batchNumber} is not in the outbox yet and cannot be written (${(e as Error).message}): not closing the next`,
        );
      });
    }
    const held = await this.store.batchTally(psamHex, st.batchNumber);
    if (held.count !== st.batchCount || held.total !== st.batchTotal) {
      await this.store.recordTransactions(psamHex, st.batchNumber, await slot.driver.readBatch(), "close");
    }
    const closed = await slot.driver.closeBatch();
    slot.batchSince = undefined;
    this.lastCloseHeldMs = performance.now() - started;
    this.o.log.info("batch closed", {
      psam: psamHex,
      batch: closed.batchNumber,
      count: closed.count,
      total: closed.total,
      why,
      slotHeldMs: Math.round(this.lastCloseHeldMs * 10) / 10,
    });
    terminalCrashPoint("after-close-batch");
    return closed;
  }

  /**
   * Closes the PSAM's batch when the slot is free (after the job on it, if
   * any), puts it in the outbox and wakes the submitter. Answers the batch
   * closed, or undefined when it was empty; throws when the PSAM failed.
   */
  private async closeNow(slot: Slot, why: string): Promise<{ closed: ClosedBatchSummary | undefined; slot: PsamSlot }> {
    const r = await slot.mutex.run(async () => {
      if (slot.failed) throw new Error(`PSAM ${slot.psam.psamId} is out of the pool`);
      try {
        const closed = await this.closeHeld(slot, why);
        return { closed, slot: await this.slotInfo(slot) };
      } catch (e) {
        if (!(e instanceof ApduError) && !(e instanceof OutboxNotWritten)) this.failSlot(slot, e);
        throw e;
      }
    });
    const closed = r.closed;
    if (closed) {
      await this.keep(() => this.keepClosed(closed));
      this.out?.push({ message: { $case: "slotUpdate", value: { slot: r.slot } } });
    }
    return r;
  }

  /** Closes the batch once the slot is free, unless a close is queued already. */
  private closeSoon(slot: Slot, why: string): void {
    if (slot.closing) return;
    slot.closing = true;
    this.closeNow(slot, why)
      .catch((e: unknown) => this.o.log.error("could not close the batch", { psam: slot.psam.psamId, why, error: (e as Error).message }))
      .finally(() => (slot.closing = false));
  }

  /** Closes the batches whose first record is older than `maxAgeMs`. */
  private async closeOldBatches(maxAgeMs: number): Promise<void> {
    const now = Date.now();
    for (const slot of this.slots) {
      if (!slot.failed && slot.batchSince !== undefined && now - slot.batchSince >= maxAgeMs) this.closeSoon(slot, "age");
    }
  }

  /** An operator's CloseBatchesCommand: closes the batch of each PSAM named (every PSAM when none is), and says what was closed. */
  private async closeForOperator(command: CloseBatchesCommand): Promise<CloseBatchesReport> {
    const wanted = new Set(command.psamIds.map((p) => hexOf(p.value)));
    const slots = wanted.size ? this.slots.filter((s) => wanted.has(s.psam.psamId)) : this.slots;
    const closed: ClosedBatch[] = [];
    const notClosed: BatchNotClosed[] = [];
    await Promise.all(
      slots.map(async (slot) => {
        const psamId = toPsamId(slot.psam.psamId);
        try {
          const r = await this.closeNow(slot, "operator");
          if (!r.closed) {
            notClosed.push({ terminalId: this.o.terminalId, psamId, reason: BatchNotClosedReason.BATCH_NOT_CLOSED_REASON_EMPTY });
            return;
          }
          const c = r.closed;
          closed.push({ terminalId: this.o.terminalId, psamId, batchNumber: c.batchNumber, count: c.count, total: money(c.total, c.currency, 0) });
        } catch (e) {
          this.o.log.error("could not close the batch an operator asked for", { psam: slot.psam.psamId, error: (e as Error).message });
          notClosed.push({ terminalId: this.o.terminalId, psamId, reason: BatchNotClosedReason.BATCH_NOT_CLOSED_REASON_PSAM_FAILED });
        }
      }),
    );
    return { requestId: command.requestId, closed, notClosed };
  }

  /** Reads the host's data store (for tests and operators). */
  get data(): TerminalStore {
    return this.store;
  }
}

class JobInvalid extends Error {}

/** The host's store cannot take a closed batch: the PSAM is fine, the next close waits. */
class OutboxNotWritten extends Error {}
