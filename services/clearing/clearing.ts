// The concentration point and the clearing and administration system
// (FIG. 2 and 3): terminal hosts send closed PSAM batches, the load server
// sends settled loads. Nothing is counted on a caller's word: a batch counts
// only when the PSAM's batch MAC verifies, a record is paid only when its
// record MAC and the card's own signature verify, a load only when the
// card's S1 and S3 do. Everything is posted once, keyed by its kind
// (purchase or load) and transaction id, in one database transaction with the
// batch or load that brought it. A points batch (its currency a loyalty
// programme's code, docs/loyalty.md) is checked the same way and posted to
// the programme's points ledger, never to money; an authentication PSAM's
// batch (currency 999) holds no record.

import { createHash } from "node:crypto";
import type { CallContext } from "nice-grpc";
import {
  BatchRecord as BatchRecordMessage,
  BatchStatus,
  BatchTrailer,
  LoadOutcome,
  LoadProof,
  LoadRecord,
  LoadStatus,
  PartyKind,
  QuarantineReason,
  quarantineReasonFromJSON,
  quarantineReasonToJSON,
  loadProofToJSON,
  loadOutcomeToJSON,
  type AuditCheck,
  type Batch,
  type CardBalance,
  type ClearingServiceImplementation,
  type LoadAcknowledgement,
  type Payout,
  type QuarantineEntry,
  type QuarantinedRecord,
  type Settlement,
  type SubmitBatchResponse,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { ErrorReason, type Money } from "../../gen/netpurse/card/v1/card.js";
import { invalidField, NetpurseError, notFound, Status } from "../../lib/grpc/errors.js";
import { isPositiveInt, pagePosition, pageSize, pageToken } from "../../lib/grpc/page-token.js";
import { peerOf } from "../../lib/grpc/server.js";
import { hexOf, psamId as toPsamId, purseId as toPurseId, requireMerchantId, requireName, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { AUTHENTICATION_CURRENCY, isMoneyCurrency, isProgrammeCode, money } from "../../lib/money.js";
import { InitializeForLoadCommand, InitializeForLoadResponse, LoadCommand, LoadResponse, LoadResult } from "../../lib/protocol/load.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import type { PsamBatchRecord } from "../../lib/protocol/psam.js";
import type { Queryable } from "../../lib/store/db.js";
import type { ClearingMerchant } from "./merchants.js";
import type { ClearingSecurityModule } from "./security-module.js";
import { account, dayOf, type BatchRow, type ClearingStore, type LoadRow, type QuarantineRow } from "./store.js";

/** Most records one batch submission may carry. */
export const MAX_BATCH_RECORDS = 10_000;
/** Most loads one SubmitLoads call may carry. */
export const MAX_LOADS_PER_CALL = 100;
const MAX_MISSING_REPORTED = 100;
const PAGE = { fallback: 50, max: 500 };
/** Merchants per page of a settlement day. */
const SETTLEMENT_PAGE = { fallback: 100, max: 500 };
const DAY_RE = /^\d{4}-\d{2}-\d{2}$/;

export interface ClearingOptions {
  store: ClearingStore;
  module: ClearingSecurityModule;
  /** Merchant id -> its registration (acquirer, currency). */
  merchants: () => ReadonlyMap<string, ClearingMerchant>;
  /** PSAM id (hex) -> the terminal it was provisioned for; undefined on an --insecure network, where any terminal may send any PSAM's batch. */
  psamRegistry: ReadonlyMap<string, string> | undefined;
  log: Logger;
  clock: () => Date;
  /** Overrides of SUBMISSION_LIMITS (tests). */
  submissionLimits?: Partial<SubmissionLimits>;
}

const u32 = (n: number) => Number.isInteger(n) && n >= 0 && n <= 0xffffffff;

/** A currency a batch or record may carry: money, an authentication (999) or a programme's points; its meaning is checked after the MACs. */
const isBatchCurrency = (c: number) => isMoneyCurrency(c) || c === AUTHENTICATION_CURRENCY || isProgrammeCode(c);
const BATCH_CURRENCY = "must be a money currency 1..998, 999 (authentication) or a loyalty programme code 1000..65535";

function bytesOf(b: Uint8Array, size: number, field: string): Buffer {
  if (b.length !== size) throw invalidField(field, `must be ${size} bytes, got ${b.length}`);
  return Buffer.from(b);
}

/** A submitted record as the PSAM's layout has it; INVALID_ARGUMENT naming the field when it cannot be one. */
function recordOf(r: BatchRecordMessage, field: string): PsamBatchRecord {
  const amount = r.amount;
  if (!amount || amount.amountMinor < 0n || amount.amountMinor > 0xffffffffn) throw invalidField(`${field}.amount`, "missing or out of 0..4294967295");
  if (!isBatchCurrency(amount.currency)) throw invalidField(`${field}.amount.currency`, BATCH_CURRENCY);
  for (const [name, v] of [
    ["psam_counter", r.psamCounter],
    ["session_counter", r.sessionCounter],
    ["card_counter", r.cardCounter],
  ] as const) {
    if (!u32(v)) throw invalidField(`${field}.${name}`, "out of range");
  }
  if (r.keyVersion > 0xff) throw invalidField(`${field}.key_version`, "must be 0..255");
  if (r.balanceAfter < 0n || r.balanceAfter > 0xffffffffn) throw invalidField(`${field}.balance_after`, "out of 0..4294967295");
  if (!r.dateTime) throw invalidField(`${field}.date_time`, "missing");
  const dateTime = Math.floor(r.dateTime.getTime() / 1000);
  if (!u32(dateTime)) throw invalidField(`${field}.date_time`, "out of range");
  return {
    psamCounter: r.psamCounter,
    purseId: bytesOf(r.purseId?.value ?? new Uint8Array(), 8, `${field}.purse_id`),
    keyVersion: r.keyVersion,
    sessionCounter: r.sessionCounter,
    challenge: bytesOf(r.challenge, 8, `${field}.challenge`),
    cardCounter: r.cardCounter,
    balanceAfter: Number(r.balanceAfter),
    amount: Number(amount.amountMinor),
    currency: amount.currency,
    dateTime,
    transactionRef: requireTransactionId(r.transactionId, `${field}.transaction_id`),
    merchantId: requireMerchantId(r.merchantId, `${field}.merchant_id`),
    cardSignature: bytesOf(r.cardSignature, 8, `${field}.card_signature`),
    recordMac: bytesOf(r.recordMac, 8, `${field}.record_mac`),
  };
}

const digestOf = (...parts: Uint8Array[]) => {
  const h = createHash("sha256");
  for (const p of parts) h.update(p).update("\0");
  return h.digest("hex");
};

const reasonName = (r: QuarantineReason) => quarantineReasonToJSON(r);
const reasonOfName = (s: string | null) => (s ? quarantineReasonFromJSON(s) : QuarantineReason.QUARANTINE_REASON_UNSPECIFIED);

/** Whether a timestamp is a date JavaScript can hold (protobuf allows seconds far beyond it). */
const isDate = (d: Date) => Number.isFinite(d.getTime());

function requireDay(day: string, field = "day"): string {
  const d = new Date(`${day}T00:00:00Z`);
  if (!DAY_RE.test(day) || !isDate(d) || dayOf(d) !== day) throw invalidField(field, `"${day.slice(0, 32)}" is not a day YYYY-MM-DD`);
  return day;
}

const denied = (message: string) => new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_NOT_ALLOWED, message);

/** How many batch submissions may be open at once (per terminal host, in all), and how long one may take (between messages, in all). */
export interface SubmissionLimits {
  perTerminal: number;
  total: number;
  idleMs: number;
  totalMs: number;
}

export const SUBMISSION_LIMITS: SubmissionLimits = { perTerminal: 4, total: 64, idleMs: 30_000, totalMs: 300_000 };

/**
 * The messages of a client stream, ended with DEADLINE_EXCEEDED when none
 * comes for `idleMs` or the whole takes longer than `totalMs`: a stream that
 * never sends its last message holds nothing for long.
 */
async function* withinLimits<T>(stream: AsyncIterable<T>, idleMs: number, totalMs: number): AsyncIterable<T> {
  const it = stream[Symbol.asyncIterator]();
  const end = Date.now() + totalMs;
  let timer: NodeJS.Timeout | undefined;
  try {
    for (;;) {
      const wait = Math.min(idleMs, end - Date.now());
      const late = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () =>
            reject(
              new NetpurseError(
                Status.DEADLINE_EXCEEDED,
                ErrorReason.ERROR_REASON_UNSPECIFIED,
                "the batch submission stalled or took too long; nothing of it was counted",
              ),
            ),
          Math.max(0, wait),
        );
      });
      const next = await Promise.race([it.next(), late]);
      clearTimeout(timer);
      if (next.done) return;
      yield next.value;
    }
  } finally {
    clearTimeout(timer);
    // Not awaited: the stream's return waits for the next message of a stalled peer, which is what this ends.
    it.return?.()?.catch(() => undefined);
  }
}

export class Clearing {
  private readonly openSubmissions = new Map<string, number>();
  private openTotal = 0;
  private readonly limits: SubmissionLimits;

  constructor(private readonly o: ClearingOptions) {
    this.limits = { ...SUBMISSION_LIMITS, ...o.submissionLimits };
  }

  /** The peer's terminal id when it is a terminal host (undefined on an --insecure network); PERMISSION_DENIED otherwise. */
  private terminalOf(context: CallContext): string | undefined {
    const peer = peerOf(context);
    if (!peer.proven) return undefined;
    if (peer.kind !== "terminal") throw denied(`${peer.kind}/${peer.id} is not a terminal host`);
    return peer.id;
  }

  /** Checks the caller may act for this PSAM: the terminal the issuer provisioned it for. */
  private authorisePsam(psamHex: string, terminalId: string | undefined): void {
    const registry = this.o.psamRegistry;
    if (!registry) return;
    const owner = registry.get(psamHex);
    if (owner === undefined) {
      throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_UNKNOWN_PSAM, `PSAM ${psamHex} is not in the issuer's PSAM registry`);
    }
    if (terminalId !== undefined && owner !== terminalId) throw denied(`PSAM ${psamHex} was provisioned for terminal ${owner}, not ${terminalId}`);
  }

  readonly service: ClearingServiceImplementation = {
    submitBatch: async (request, context) => {
      const terminalId = this.terminalOf(context);
      // A submission holds its records in memory until its trailer: few at once per host, none left hanging.
      const host = terminalId ?? "";
      const open = this.openSubmissions.get(host) ?? 0;
      if (open >= this.limits.perTerminal || this.openTotal >= this.limits.total) {
        throw new NetpurseError(
          Status.RESOURCE_EXHAUSTED,
          ErrorReason.ERROR_REASON_UNSPECIFIED,
          `clearing holds ${open} open submissions of this terminal host (at most ${this.limits.perTerminal}) and ${this.openTotal} in all (at most ${this.limits.total}): send the next batch when one is acknowledged`,
          { retryAfterMs: 1_000 },
        );
      }
      this.openSubmissions.set(host, open + 1);
      this.openTotal++;
      try {
        const records: BatchRecordMessage[] = [];
        let trailer: BatchTrailer | undefined;
        for await (const m of withinLimits(request, this.limits.idleMs, this.limits.totalMs)) {
          if (trailer) throw invalidField("trailer", "the trailer must be the stream's last message: a message came after it");
          const item = m.item;
          if (!item) throw invalidField("item", "a message with neither a record nor a trailer");
          if (item.$case === "trailer") trailer = item.value;
          else {
            if (records.length >= MAX_BATCH_RECORDS) throw invalidField("record", `a batch holds at most ${MAX_BATCH_RECORDS} records`);
            records.push(item.value);
          }
        }
        if (!trailer) throw invalidField("trailer", "the stream ended without a trailer: the batch is incomplete and was not counted");
        return await this.submitted(records, trailer, terminalId);
      } finally {
        this.openTotal--;
        const left = (this.openSubmissions.get(host) ?? 1) - 1;
        if (left > 0) this.openSubmissions.set(host, left);
        else this.openSubmissions.delete(host);
      }
    },

    submitLoads: async (request, context) => {
      const peer = peerOf(context);
      if (peer.proven && peer.kind !== "load") throw denied(`${peer.kind}/${peer.id} is not the load server`);
      const loads = request.loads;
      if (loads.length === 0 || loads.length > MAX_LOADS_PER_CALL) throw invalidField("loads", `must hold 1..${MAX_LOADS_PER_CALL} loads`);
      const checked = loads.map((l, i) => this.checkLoad(l, `loads[${i}]`));
      const ids = new Set(checked.map((c) => c.id));
      if (ids.size !== checked.length) throw invalidField("loads", "a transaction id appears twice");
      const now = this.o.clock();
      const acknowledgements = await this.o.store.db.transaction(async (q) => {
        const out: LoadAcknowledgement[] = [];
        for (const c of checked) out.push(await this.recordLoad(q, c, now));
        return out;
      });
      for (const a of acknowledgements) {
        if (a.status === LoadStatus.LOAD_STATUS_QUARANTINED && !a.duplicate) {
          this.o.log.warn("load quarantined", { transaction: a.transactionId?.value, reason: reasonName(a.quarantinedBecause) });
        }
      }
      return { acknowledgements };
    },

    getSettlement: async (request) => {
      const day = request.day === "" ? await this.o.store.postingDay(this.o.store.db, this.o.clock()) : requireDay(request.day);
      const size = pageSize(request.pageSize, SETTLEMENT_PAGE);
      const afterMerchant = pagePosition(request.pageToken, "settlement", day, (p): p is string => typeof p === "string" && p !== "");
      const { settlement, nextMerchant } = await this.settlement(day, { size, ...(afterMerchant === undefined ? {} : { afterMerchant }) });
      return { settlement, nextPageToken: nextMerchant === undefined ? "" : pageToken("settlement", day, nextMerchant) };
    },

    closeSettlementDay: async (request) => {
      const day = requireDay(request.day);
      const now = this.o.clock();
      if (day > dayOf(now)) throw invalidField("day", `${day} has not begun yet (today is ${dayOf(now)}, UTC)`);
      // Closed and summed in one transaction: a posting that read the day open either lands in this settlement, or is run
      // again and goes to the next day (on PostgreSQL, SERIALIZABLE runs one of the two again; SQLite runs them one by one).
      const { settlement } = await this.settlement(day, { size: SETTLEMENT_PAGE.fallback, closeAt: now });
      this.o.log.info("settlement day closed", { day });
      return { settlement };
    },

    getMerchantStatement: async (request, context) => {
      const merchantId = requireMerchantId(request.merchantId);
      const peer = peerOf(context);
      if (peer.proven && !(peer.kind === "operator" || (peer.kind === "merchant" && peer.id === merchantId))) {
        throw denied(`${peer.kind}/${peer.id} may not read merchant ${merchantId}'s statement`);
      }
      const m = this.o.merchants().get(merchantId);
      if (!m) throw new NetpurseError(Status.NOT_FOUND, ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `clearing pays no merchant ${merchantId}`);
      const day = request.day === "" ? undefined : requireDay(request.day);
      const size = pageSize(request.pageSize, PAGE);
      const scope = `${merchantId}/${day ?? "*"}`;
      const before = pagePosition(request.pageToken, "statement", scope, isPositiveInt) ?? Number.MAX_SAFE_INTEGER;
      const rows = await this.o.store.statement(merchantId, day, before, size + 1);
      const page = rows.slice(0, size);
      const totals = await this.o.store.statementTotals(merchantId, day);
      return {
        merchantId: { value: merchantId },
        acquirerId: m.acquirerId,
        total: totals.map((t) => money(t.total, t.currency, t.exponent)),
        purchases: totals.reduce((n, t) => n + t.n, 0),
        lines: page.map((r) => ({
          transactionId: txnId(r.transaction_id),
          amount: money(r.amount_minor, r.currency, r.exponent),
          settlementDay: r.settlement_day,
          postedAt: new Date(r.posted_at),
          psamId: toPsamId(r.psam_id),
          psamCounter: r.psam_counter,
          batchNumber: r.batch_number,
          purseId: toPurseId(r.purse_id),
        })),
        nextPageToken: rows.length > size ? pageToken("statement", scope, page[page.length - 1]!.seq) : "",
      };
    },

    getBatch: async (request, context) => {
      const psamHex = hexOf(bytesOf(request.psamId?.value ?? new Uint8Array(), 4, "psam_id"));
      if (!isPositiveInt(request.batchNumber)) throw invalidField("batch_number", "must be 1 or more");
      const peer = peerOf(context);
      if (peer.proven && peer.kind !== "operator") {
        if (peer.kind !== "terminal") throw denied(`${peer.kind}/${peer.id} may not read batches`);
        this.authorisePsam(psamHex, peer.id);
      }
      const size = pageSize(request.pageSize, PAGE);
      const scope = `${psamHex}/${request.batchNumber}`;
      const after = pagePosition(request.pageToken, "batch quarantine", scope, isPositiveInt) ?? 0;
      const row = await this.o.store.batch(psamHex, request.batchNumber);
      if (!row) {
        const rejected = await this.o.store.rejectedBatch(psamHex, request.batchNumber);
        if (!rejected) throw notFound(`clearing holds no batch ${request.batchNumber} of PSAM ${psamHex}`);
        return { batch: this.rejectedBatchOf(rejected), quarantinedRecords: [], nextPageToken: "" };
      }
      const q = await this.o.store.quarantineOfBatch(psamHex, request.batchNumber, after, size + 1);
      const page = q.slice(0, size);
      return {
        batch: this.batchOf(row),
        quarantinedRecords: page.map((r) => this.quarantinedRecordOf(r)),
        nextPageToken: q.length > size ? pageToken("batch quarantine", scope, page[page.length - 1]!.id) : "",
      };
    },

    listQuarantined: async (request) => {
      const size = pageSize(request.pageSize, PAGE);
      const after = pagePosition(request.pageToken, "quarantine", "all", isPositiveInt) ?? 0;
      const rows = await this.o.store.quarantined(after, size + 1);
      const page = rows.slice(0, size);
      return {
        entries: page.map((r) => this.entryOf(r)),
        nextPageToken: rows.length > size ? pageToken("quarantine", "all", page[page.length - 1]!.id) : "",
      };
    },

    runAudit: async (request) => {
      if (request.cards.length > 1_000) throw invalidField("cards", "at most 1,000 cards");
      const cards = request.cards.map((c, i) => this.checkCardBalance(c, `cards[${i}]`));
      return this.audit(cards);
    },
  };

  /**
   * Counts a complete batch: verifies its trailer, then each record, and
   * posts every record that verifies and was not paid yet. A batch sent
   * again is checked again the same way (a record paid already is not paid
   * twice; one that failed before and verifies now is paid).
   */
  private async submitted(recordMessages: BatchRecordMessage[], trailer: BatchTrailer, terminalId: string | undefined): Promise<SubmitBatchResponse> {
    const psamId = bytesOf(trailer.psamId?.value ?? new Uint8Array(), 4, "trailer.psam_id");
    const psamHex = psamId.toString("hex");
    this.authorisePsam(psamHex, terminalId);
    if (!isPositiveInt(trailer.batchNumber) || !u32(trailer.batchNumber)) throw invalidField("trailer.batch_number", "must be 1..4294967295");
    const total = trailer.total;
    if (!total || total.amountMinor < 0n || total.amountMinor > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidField("trailer.total", "missing or out of range");
    if (!isBatchCurrency(total.currency)) throw invalidField("trailer.total.currency", BATCH_CURRENCY);
    if (trailer.closedAt && !isDate(trailer.closedAt)) throw invalidField("trailer.closed_at", "not a date");
    // A terminal host never closes an empty batch: one would only take a batch number for nothing. An authentication PSAM's batch is
    // always empty (an authentication writes no record): acknowledged, and it posts nothing.
    const authentication = total.currency === AUTHENTICATION_CURRENCY;
    if (trailer.count === 0 && !authentication) throw invalidField("trailer.count", "a batch holds at least one record");
    const batchMac = bytesOf(trailer.batchMac, 8, "trailer.batch_mac");
    const macHex = batchMac.toString("hex");
    const records = recordMessages.map((r, i) => recordOf(r, `records[${i}]`));
    const summary = { psamId, batchNumber: trailer.batchNumber, count: trailer.count, total: Number(total.amountMinor), currency: total.currency };
    const base = { psamId: toPsamId(psamHex), batchNumber: trailer.batchNumber };
    const missing = () => this.o.store.missingBatchNumbers(psamHex, trailer.batchNumber, MAX_MISSING_REPORTED);
    const now = this.o.clock();

    const rejectedBecause = !this.o.module.verifyBatchMac(summary, batchMac)
      ? QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC
      : authentication && (summary.count > 0 || records.length > 0)
        ? // Authentications never reach a batch: records under an authentication PSAM's batch key were made by whoever holds it.
          QuarantineReason.QUARANTINE_REASON_AUTHENTICATION_RECORDS
        : records.length !== summary.count ||
            records.reduce((s, r) => s + r.amount, 0) !== summary.total ||
            records.some((r) => r.currency !== summary.currency)
          ? QuarantineReason.QUARANTINE_REASON_BATCH_INCOMPLETE
          : undefined;
    if (rejectedBecause !== undefined) {
      await this.quarantineBatch(this.o.store.db, psamHex, trailer, terminalId, rejectedBecause, records.length, now);
      this.o.log.error("batch rejected: not counted", { psam: psamHex, batch: trailer.batchNumber, terminal: terminalId, reason: reasonName(rejectedBecause) });
      return {
        ...base,
        status: BatchStatus.BATCH_STATUS_REJECTED,
        rejectedBecause,
        posted: 0,
        quarantined: records.length,
        duplicate: false,
        missingBatchNumbers: await missing(),
        settlementDay: "",
      };
    }

    // Verification is pure computation: done before the database transaction, which decides only what was paid already.
    const verdicts = records.map((r, i) => ({ r, message: recordMessages[i]!, problem: this.recordProblem(psamId, trailer.batchNumber, r) }));
    const merchants = this.o.merchants();
    const result = await this.o.store.db.transaction(async (q) => {
      const known = await this.o.store.batchWithMac(q, psamHex, trailer.batchNumber, macHex);
      const conflict = !known && !!(await this.o.store.batch(psamHex, trailer.batchNumber, q));
      const day = await this.o.store.postingDay(q, now);
      let posted = 0;
      let postedNow = 0;
      const seen = new Set<string>();
      for (const { r, message, problem } of verdicts) {
        let reason = problem;
        const paidFor = await this.o.store.postedFrom(q, psamHex, r.psamCounter);
        if (paidFor?.transaction_id === r.transactionRef && paidFor.batch_number === trailer.batchNumber && !seen.has(r.transactionRef)) {
          // This very debit, paid when this batch (or another under its number) came before: counted, never paid again, and not
          // checked again against what may have changed since (a merchant removed). Nothing moves, so nothing needs proving.
          posted++;
          seen.add(r.transactionRef);
          continue;
        }
        if (reason === undefined && (paidFor !== undefined || (await this.o.store.isDebitPaid(q, r.transactionRef)))) {
          reason = QuarantineReason.QUARANTINE_REASON_ALREADY_POSTED;
        }
        if (reason !== undefined) {
          await this.quarantineRecord(q, psamHex, trailer.batchNumber, terminalId, r, message, reason, now);
          continue;
        }
        if (isProgrammeCode(r.currency)) await this.postRedemption(q, psamHex, trailer.batchNumber, r, r.merchantId, day, now);
        else await this.postPurchase(q, psamHex, trailer.batchNumber, r, merchants.get(r.merchantId)!, day, now);
        seen.add(r.transactionRef);
        posted++;
        postedNow++;
      }
      const counts = { posted, quarantined: records.length - posted };
      if (known) {
        await this.o.store.resubmitted(q, { psam_id: psamHex, batch_number: trailer.batchNumber, batch_mac: macHex, ...counts });
        return { row: { ...known, ...counts, resubmissions: known.resubmissions + 1 }, duplicate: true, conflict, postedNow };
      }
      const row: BatchRow = {
        psam_id: psamHex,
        batch_number: trailer.batchNumber,
        terminal_id: terminalId ?? "",
        record_count: summary.count,
        total_minor: summary.total,
        currency: summary.currency,
        batch_mac: macHex,
        closed_at: trailer.closedAt?.toISOString() ?? null,
        ...counts,
        settlement_day: day,
        received_at: now.toISOString(),
        resubmissions: 0,
      };
      await this.o.store.insertBatch(q, row);
      if (conflict) await this.quarantineBatch(q, psamHex, trailer, terminalId, QuarantineReason.QUARANTINE_REASON_BATCH_NUMBER_CONFLICT, records.length, now);
      return { row, duplicate: false, conflict, postedNow };
    });
    const { row } = result;
    const log = { psam: psamHex, batch: row.batch_number, terminal: terminalId, posted: row.posted, quarantined: row.quarantined };
    if (result.conflict) this.o.log.error("a second batch verifies under a batch number already taken: the PSAM's batch key is known outside it", log);
    if (result.duplicate) this.o.log.info("batch sent again; every record counted once", { ...log, postedNow: result.postedNow });
    else this.o.log.info("batch accepted", log);
    if (row.quarantined > 0) this.o.log.warn("records quarantined: not paid", log);
    return { ...base, ...this.ackOf(row), duplicate: result.duplicate, missingBatchNumbers: await missing() };
  }

  /** Keeps a rejected or conflicting batch's trailer for the operator (once per content). */
  private async quarantineBatch(
    q: Queryable,
    psamHex: string,
    trailer: BatchTrailer,
    terminalId: string | undefined,
    reason: QuarantineReason,
    records: number,
    now: Date,
  ): Promise<void> {
    const content = Buffer.from(BatchTrailer.encode(trailer).finish());
    await this.o.store.quarantine(q, {
      kind: "batch",
      psam_id: psamHex,
      batch_number: trailer.batchNumber,
      psam_counter: null,
      transaction_id: null,
      terminal_id: terminalId ?? "",
      reason: reasonName(reason),
      content,
      digest: digestOf(content, Buffer.from(`${records}/${reasonName(reason)}`)),
      quarantined_at: now.toISOString(),
    });
  }

  /** Why a record cannot be paid, if it cannot (its ALREADY_POSTED check comes inside the posting transaction). */
  private recordProblem(psamId: Buffer, batchNumber: number, r: PsamBatchRecord): QuarantineReason | undefined {
    if (!this.o.module.verifyRecordMac(psamId, batchNumber, r)) return QuarantineReason.QUARANTINE_REASON_BAD_RECORD_MAC;
    const proof = this.o.module.verifyCardSignature(psamId, r);
    if (proof === "PROGRAMME_UNKNOWN") return QuarantineReason.QUARANTINE_REASON_PROGRAMME_UNKNOWN;
    if (proof === "KEY_VERSION_UNKNOWN") return QuarantineReason.QUARANTINE_REASON_KEY_VERSION_UNKNOWN;
    if (proof !== "OK") return QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE;
    const m = this.o.merchants().get(r.merchantId);
    if (!m) return QuarantineReason.QUARANTINE_REASON_UNKNOWN_MERCHANT;
    // A merchant is registered in the money it sells in; a benefits site registered in EUR takes the points of any programme too:
    // points go to the points ledger, never to its money payable, so its currency has nothing to match.
    if (!isProgrammeCode(r.currency) && m.currency !== r.currency) return QuarantineReason.QUARANTINE_REASON_CURRENCY_MISMATCH;
    return undefined;
  }

  private async quarantineRecord(
    q: Queryable,
    psamHex: string,
    batchNumber: number,
    terminalId: string | undefined,
    r: PsamBatchRecord,
    message: BatchRecordMessage,
    reason: QuarantineReason,
    now: Date,
  ): Promise<void> {
    const content = Buffer.from(BatchRecordMessage.encode(message).finish());
    await this.o.store.quarantine(q, {
      kind: "record",
      psam_id: psamHex,
      batch_number: batchNumber,
      psam_counter: r.psamCounter,
      transaction_id: r.transactionRef,
      terminal_id: terminalId ?? "",
      reason: reasonName(reason),
      content,
      digest: digestOf(Buffer.from(`${psamHex}/${batchNumber}`), content),
      quarantined_at: now.toISOString(),
    });
  }

  private async postPurchase(q: Queryable, psamHex: string, batchNumber: number, r: PsamBatchRecord, m: ClearingMerchant, day: string, now: Date) {
    const at = now.toISOString();
    await this.o.store.resolveQuarantine(q, "record", r.transactionRef, at);
    await this.o.store.post(q, {
      transactionId: r.transactionRef,
      kind: "purchase",
      day,
      at,
      currency: r.currency,
      entries: [
        { account: account.float(this.o.module.issuerId), amount: r.amount },
        { account: account.payable(m.merchantId), amount: -r.amount },
      ],
    });
    await this.o.store.insertPurchase(q, {
      transaction_id: r.transactionRef,
      psam_id: psamHex,
      psam_counter: r.psamCounter,
      batch_number: batchNumber,
      purse_id: r.purseId.toString("hex"),
      merchant_id: m.merchantId,
      acquirer_id: m.acquirerId,
      issuer_id: this.o.module.issuerId,
      amount_minor: r.amount,
      currency: r.currency,
      exponent: m.exponent,
      settlement_day: day,
      posted_at: at,
    });
  }

  /** Posts a proven points redemption to its programme's points ledger: the cards gave the points up, the merchant took them. */
  private async postRedemption(q: Queryable, psamHex: string, batchNumber: number, r: PsamBatchRecord, merchantId: string, day: string, now: Date) {
    const at = now.toISOString();
    await this.o.store.resolveQuarantine(q, "record", r.transactionRef, at);
    await this.o.store.postRedemption(
      q,
      {
        transaction_id: r.transactionRef,
        psam_id: psamHex,
        psam_counter: r.psamCounter,
        batch_number: batchNumber,
        purse_id: r.purseId.toString("hex"),
        merchant_id: merchantId,
        programme: r.currency,
        points: r.amount,
        settlement_day: day,
        posted_at: at,
      },
      [
        { account: account.pointsCards(r.currency), points: r.amount },
        { account: account.pointsRedeemed(r.currency, merchantId), points: -r.amount },
      ],
    );
  }

  private ackOf(row: BatchRow) {
    return {
      status: BatchStatus.BATCH_STATUS_ACCEPTED,
      rejectedBecause: QuarantineReason.QUARANTINE_REASON_UNSPECIFIED,
      posted: row.posted,
      quarantined: row.quarantined,
      settlementDay: row.settlement_day,
    };
  }

  private batchOf(row: BatchRow): Batch {
    return {
      psamId: toPsamId(row.psam_id),
      batchNumber: row.batch_number,
      status: BatchStatus.BATCH_STATUS_ACCEPTED,
      rejectedBecause: QuarantineReason.QUARANTINE_REASON_UNSPECIFIED,
      count: row.record_count,
      total: money(row.total_minor, row.currency, this.exponentOf(row.currency)),
      posted: row.posted,
      quarantined: row.quarantined,
      terminalId: row.terminal_id,
      receivedAt: new Date(row.received_at),
      resubmissions: row.resubmissions,
      settlementDay: row.settlement_day,
    };
  }

  private rejectedBatchOf(row: QuarantineRow): Batch {
    const t = BatchTrailer.decode(row.content);
    return {
      psamId: toPsamId(row.psam_id ?? ""),
      batchNumber: row.batch_number ?? 0,
      // A conflicting batch was counted like any other; a rejected one was not.
      status:
        row.reason === reasonName(QuarantineReason.QUARANTINE_REASON_BATCH_NUMBER_CONFLICT)
          ? BatchStatus.BATCH_STATUS_ACCEPTED
          : BatchStatus.BATCH_STATUS_REJECTED,
      rejectedBecause: reasonOfName(row.reason),
      count: t.count,
      total: t.total,
      posted: 0,
      quarantined: 0,
      terminalId: row.terminal_id ?? "",
      receivedAt: new Date(row.quarantined_at),
      resubmissions: 0,
      settlementDay: "",
    };
  }

  private quarantinedRecordOf(row: QuarantineRow): QuarantinedRecord {
    return {
      psamId: toPsamId(row.psam_id ?? ""),
      batchNumber: row.batch_number ?? 0,
      record: BatchRecordMessage.decode(row.content),
      reason: reasonOfName(row.reason),
      quarantinedAt: new Date(row.quarantined_at),
    };
  }

  private entryOf(row: QuarantineRow): QuarantineEntry {
    if (row.kind === "record") return { entry: { $case: "record", value: this.quarantinedRecordOf(row) } };
    if (row.kind === "batch") {
      const batch = this.rejectedBatchOf(row);
      return batch.status === BatchStatus.BATCH_STATUS_ACCEPTED
        ? { entry: { $case: "conflictingBatch", value: batch } }
        : { entry: { $case: "rejectedBatch", value: batch } };
    }
    return {
      entry: { $case: "load", value: { load: LoadRecord.decode(row.content), reason: reasonOfName(row.reason), quarantinedAt: new Date(row.quarantined_at) } },
    };
  }

  /** The exponent merchants of a currency sell in (2 when none is registered); points and authentications have none. */
  private exponentOf(currency: number): number {
    if (!isMoneyCurrency(currency)) return 0;
    for (const m of this.o.merchants().values()) if (m.currency === currency) return m.exponent;
    return 2;
  }

  private checkLoad(l: LoadRecord, field: string) {
    const id = requireTransactionId(l.transactionId, `${field}.transaction_id`);
    const bankId = requireName(l.bankId, `${field}.bank_id`, 64);
    const purse = bytesOf(l.purseId?.value ?? new Uint8Array(), 8, `${field}.purse_id`);
    const amount = l.amount;
    if (!amount || amount.amountMinor <= 0n || amount.amountMinor > 0xffffffffn) throw invalidField(`${field}.amount`, "missing or out of 1..4294967295");
    // Points are credited by a programme's own security module at its benefits site, never through the load server: a load is money.
    if (!isMoneyCurrency(amount.currency) || amount.exponent > 4) throw invalidField(`${field}.amount`, "a money currency 1..998 and exponent 0..4");
    if (l.outcome !== LoadOutcome.LOAD_OUTCOME_LOADED && l.outcome !== LoadOutcome.LOAD_OUTCOME_NOT_LOADED) {
      throw invalidField(`${field}.outcome`, "must be LOADED or NOT_LOADED");
    }
    const withS3 = l.proof === LoadProof.LOAD_PROOF_S3 || l.proof === LoadProof.LOAD_PROOF_CARD_HISTORY;
    const proofFits =
      l.outcome === LoadOutcome.LOAD_OUTCOME_LOADED
        ? withS3 || l.proof === LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN
        : l.proof === LoadProof.LOAD_PROOF_NEGATIVE_RESULT;
    if (!proofFits) throw invalidField(`${field}.proof`, `${loadProofToJSON(l.proof)} cannot prove ${loadOutcomeToJSON(l.outcome)}`);
    const decode = <T>(name: string, size: number, bytes: Uint8Array, d: (b: Buffer) => T): T => {
      if (bytes.length !== size) throw invalidField(`${field}.${name}`, `must be ${size} bytes, got ${bytes.length}`);
      try {
        return d(Buffer.from(bytes));
      } catch (e) {
        if (e instanceof LayoutError) throw invalidField(`${field}.${name}`, e.message);
        throw e;
      }
    };
    const authorised = decode("authorised", InitializeForLoadCommand.size, l.authorised, (b) => InitializeForLoadCommand.decode(b));
    const init = decode("initialize_response", InitializeForLoadResponse.size, l.initializeResponse, (b) => InitializeForLoadResponse.decode(b));
    const command = decode("load_command", LoadCommand.size, l.loadCommand, (b) => LoadCommand.decode(b));
    const answer = withS3 ? decode("load_answer", LoadResponse.size, l.loadAnswer, (b) => LoadResponse.decode(b)) : undefined;
    if (!withS3 && l.loadAnswer.length > 0) throw invalidField(`${field}.load_answer`, "must be empty when the proof is not an S3");
    if (l.settledAt && !isDate(l.settledAt)) throw invalidField(`${field}.settled_at`, "not a date");
    const digest = digestOf(LoadRecord.encode({ ...l, settledAt: undefined }).finish());
    return { l, id, bankId, purse, amount, authorised, init, command, answer, digest };
  }

  /** Records one checked load once; the same load again answers as the first time. */
  private async recordLoad(q: Queryable, c: ReturnType<Clearing["checkLoad"]>, now: Date): Promise<LoadAcknowledgement> {
    let existing = await this.o.store.load(q, c.id);
    const amount = Number(c.amount.amountMinor);
    // A load never posted (quarantined, or reported not loaded) gives way to a load of that id that proves itself with the card's S3:
    // a record that proves nothing never keeps a proven load out.
    if (existing && existing.status !== "POSTED" && existing.digest !== c.digest && c.answer && this.loadProven(c, amount)) {
      await this.o.store.forgetLoad(q, c.id);
      existing = undefined;
    }
    if (existing) {
      if (existing.digest !== c.digest) {
        throw new NetpurseError(
          Status.ALREADY_EXISTS,
          ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
          `clearing recorded load ${c.id} with other content; nothing of this request was recorded`,
          { metadata: { transaction_id: c.id } },
        );
      }
      return this.loadAckOf(existing, true);
    }
    let status: LoadRow["status"] = "POSTED";
    let reason: QuarantineReason | undefined;
    if (c.l.outcome === LoadOutcome.LOAD_OUTCOME_NOT_LOADED) status = "NOT_LOADED";
    else if (!this.loadProven(c, amount)) {
      status = "QUARANTINED";
      reason = QuarantineReason.QUARANTINE_REASON_BAD_S3;
    }
    const day = status === "POSTED" ? await this.o.store.postingDay(q, now) : null;
    const row: LoadRow = {
      transaction_id: c.id,
      bank_id: c.bankId,
      purse_id: c.purse.toString("hex"),
      issuer_id: this.o.module.issuerId,
      amount_minor: amount,
      currency: c.amount.currency,
      exponent: c.amount.exponent,
      outcome: loadOutcomeToJSON(c.l.outcome),
      proof: loadProofToJSON(c.l.proof),
      status,
      reason: reason === undefined ? null : reasonName(reason),
      digest: c.digest,
      settlement_day: day,
      recorded_at: now.toISOString(),
    };
    await this.o.store.insertLoad(q, row);
    if (status === "POSTED") {
      await this.o.store.resolveQuarantine(q, "load", c.id, now.toISOString());
      await this.o.store.post(q, {
        transactionId: c.id,
        kind: "load",
        day: day!,
        at: now.toISOString(),
        currency: c.amount.currency,
        entries: [
          { account: account.bank(c.bankId), amount },
          { account: account.float(this.o.module.issuerId), amount: -amount },
        ],
      });
    } else if (status === "QUARANTINED") {
      const content = Buffer.from(LoadRecord.encode(c.l).finish());
      await this.o.store.quarantine(q, {
        kind: "load",
        psam_id: null,
        batch_number: null,
        psam_counter: null,
        transaction_id: c.id,
        terminal_id: null,
        reason: reasonName(reason!),
        content,
        digest: c.digest,
        quarantined_at: now.toISOString(),
      });
    }
    return this.loadAckOf(row, false);
  }

  /**
   * Whether a load the card took is proven: every byte string must belong
   * to this load (card, amount, currency, transaction), and the card's S3
   * must verify. A load treated as made because its negative result could
   * not be proven has no S3: it is posted on the load server's word, and the
   * audit lists it.
   */
  private loadProven(c: ReturnType<Clearing["checkLoad"]>, amount: number): boolean {
    const { authorised, init, command, answer } = c;
    // The bank that pays is the one in the command the card signed (S1), whatever the load server says.
    const asked =
      authorised.bankId === c.bankId &&
      authorised.amount === amount &&
      authorised.currency === c.amount.currency &&
      authorised.transactionRef === c.id &&
      init.purseId.equals(c.purse) &&
      this.o.module.verifyLoadS1(authorised, init);
    if (!asked) return false;
    if (c.l.proof === LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN) return true;
    if (!answer) return false;
    const same =
      command.amount === amount &&
      command.currency === c.amount.currency &&
      command.transactionRef === c.id &&
      answer.result === LoadResult.LOADED &&
      answer.counter === init.counter + 1 &&
      answer.balance === init.balance + amount;
    return same && this.o.module.verifyLoadS3(init, command, answer);
  }

  private loadAckOf(row: LoadRow, duplicate: boolean): LoadAcknowledgement {
    const status =
      row.status === "POSTED"
        ? LoadStatus.LOAD_STATUS_POSTED
        : row.status === "NOT_LOADED"
          ? LoadStatus.LOAD_STATUS_NOT_LOADED
          : LoadStatus.LOAD_STATUS_QUARANTINED;
    return {
      transactionId: txnId(row.transaction_id),
      status,
      quarantinedBecause: reasonOfName(row.reason),
      duplicate,
      settlementDay: row.settlement_day ?? "",
    };
  }

  /**
   * A day's positions and payouts, summed by the database from what was
   * posted to it, in one consistent view: the issuers', acquirers' and banks'
   * on the first page with the first merchants, the next merchants after.
   */
  async settlement(day: string, page: { size: number; afterMerchant?: string; closeAt?: Date } = { size: PAGE.fallback }) {
    const first = page.afterMerchant === undefined;
    const v = await this.o.store.db.transaction(async (q) => {
      // With closeAt: the day is closed first, in the same transaction, so what follows is its final settlement.
      if (page.closeAt) await this.o.store.closeDay(q, day, page.closeAt);
      return {
        counts: await this.o.store.dayCounts(q, day),
        closedAt: await this.o.store.dayClosedAt(day, q),
        loads: first ? await this.o.store.loadsByBank(q, day) : [],
        purchases: first ? await this.o.store.purchasesByAcquirer(q, day) : [],
        merchants: await this.o.store.merchantsOfDay(q, day, page.afterMerchant ?? "", page.size + 1),
        points: first ? await this.o.store.pointsRedeemedOfDay(q, day) : [],
      };
    });
    const more = new Set(v.merchants.map((m) => m.merchant_id)).size > page.size;
    const pageMerchants = new Set([...new Set(v.merchants.map((m) => m.merchant_id))].slice(0, page.size));
    const merchants = v.merchants.filter((m) => pageMerchants.has(m.merchant_id));

    type Acc = { kind: PartyKind; id: string; currency: number; exponent: number; receivable: number; payable: number; n: number };
    const positions = new Map<string, Acc>();
    const pos = (kind: PartyKind, id: string, r: { currency: number; exponent: number }) => {
      const key = `${kind}/${id}/${r.currency}`;
      let p = positions.get(key);
      if (!p) positions.set(key, (p = { kind, id, currency: r.currency, exponent: r.exponent, receivable: 0, payable: 0, n: 0 }));
      return p;
    };
    const payouts: Payout[] = [];
    const pay = (payer: [PartyKind, string], payee: [PartyKind, string], r: { currency: number; exponent: number; total: number }) =>
      payouts.push({ payerKind: payer[0], payerId: payer[1], payeeKind: payee[0], payeeId: payee[1], amount: money(r.total, r.currency, r.exponent) });
    for (const l of v.loads) {
      const issuer = pos(PartyKind.PARTY_KIND_ISSUER, l.issuer_id, l);
      issuer.receivable += l.total;
      issuer.n += l.n;
      const bank = pos(PartyKind.PARTY_KIND_BANK, l.bank_id, l);
      bank.payable += l.total;
      bank.n += l.n;
      pay([PartyKind.PARTY_KIND_BANK, l.bank_id], [PartyKind.PARTY_KIND_ISSUER, l.issuer_id], l);
    }
    for (const p of v.purchases) {
      const issuer = pos(PartyKind.PARTY_KIND_ISSUER, p.issuer_id, p);
      issuer.payable += p.total;
      issuer.n += p.n;
      const acquirer = pos(PartyKind.PARTY_KIND_ACQUIRER, p.acquirer_id, p);
      acquirer.receivable += p.total;
      acquirer.payable += p.total;
      acquirer.n += p.n;
      pay([PartyKind.PARTY_KIND_ISSUER, p.issuer_id], [PartyKind.PARTY_KIND_ACQUIRER, p.acquirer_id], p);
    }
    for (const m of merchants) {
      const merchant = pos(PartyKind.PARTY_KIND_MERCHANT, m.merchant_id, m);
      merchant.receivable += m.total;
      merchant.n += m.n;
      pay([PartyKind.PARTY_KIND_ACQUIRER, m.acquirer_id], [PartyKind.PARTY_KIND_MERCHANT, m.merchant_id], m);
    }
    const byParty = (a: { kind: PartyKind; id: string; currency: number }, b: { kind: PartyKind; id: string; currency: number }) =>
      a.kind - b.kind || a.id.localeCompare(b.id) || a.currency - b.currency;
    const m = (amount: number, a: { currency: number; exponent: number }): Money => money(amount, a.currency, a.exponent);
    const settlement: Settlement = {
      day,
      closed: v.closedAt !== undefined,
      closedAt: v.closedAt === undefined ? undefined : new Date(v.closedAt),
      positions: [...positions.values()].sort(byParty).map((p) => ({
        kind: p.kind,
        partyId: p.id,
        receivable: m(p.receivable, p),
        payable: m(p.payable, p),
        net: m(p.receivable - p.payable, p),
        transactions: p.n,
      })),
      payouts: payouts.sort(
        (a, b) =>
          a.payerKind - b.payerKind ||
          a.payerId.localeCompare(b.payerId) ||
          a.payeeKind - b.payeeKind ||
          a.payeeId.localeCompare(b.payeeId) ||
          a.amount!.currency - b.amount!.currency,
      ),
      purchases: v.counts.purchases,
      loads: v.counts.loads,
      // From the points ledger, apart: never a position, a payout or a money total.
      pointsRedeemed: v.points.map((p) => ({ programme: p.programme, merchantId: p.merchant_id, points: BigInt(p.points), redemptions: p.n })),
      redemptions: v.counts.redemptions,
    };
    const last = [...pageMerchants].pop();
    return { settlement, nextMerchant: more && last !== undefined ? last : undefined };
  }

  /**
   * The points ledger, apart from money: each redemption has exactly its two
   * entries, in its own programme, summing to zero (so each programme's
   * ledger does); no transaction is paid both in money and in points; no
   * points sit in a money account and no money in a points account.
   */
  private async auditPoints(db: Queryable, check: (name: string, ok: boolean, detail: string) => void): Promise<void> {
    const broken = await db.all<{ transaction_id: string }>(
      `SELECT r.transaction_id FROM redemptions r LEFT JOIN points_entries e ON e.redemption_seq = r.seq
         GROUP BY r.seq HAVING COUNT(e.id) <> 2 OR COALESCE(SUM(e.points), 0) <> 0 OR SUM(CASE WHEN e.programme <> r.programme THEN 1 ELSE 0 END) > 0
           OR SUM(CASE WHEN e.account NOT LIKE 'points:' || r.programme || ':%' THEN 1 ELSE 0 END) > 0
       UNION ALL SELECT transaction_id FROM redemptions r WHERE EXISTS (SELECT 1 FROM postings p WHERE p.kind = 'purchase' AND p.transaction_id = r.transaction_id)
       LIMIT 10`,
    );
    const programmes = await db.all<{ programme: number; n: number; points: number }>(
      "SELECT programme, COUNT(*) AS n, SUM(points) AS points FROM redemptions GROUP BY programme ORDER BY programme",
    );
    check(
      "every points redemption balances in its programme's own points ledger, once",
      broken.length === 0,
      broken.length > 0
        ? `not posted exactly once with two balancing entries of its programme: ${broken.map((b) => b.transaction_id).join(", ")}`
        : programmes.length === 0
          ? "no points redeemed"
          : programmes.map((p) => `programme ${p.programme}: ${p.n} redemptions, ${p.points} points`).join("; "),
    );
    const mixed = await db.all<{ account: string }>(
      `SELECT DISTINCT account FROM ledger_entries WHERE account LIKE 'points:%' OR currency NOT BETWEEN 1 AND 998
       UNION SELECT DISTINCT account FROM points_entries WHERE account NOT LIKE 'points:%' OR programme NOT BETWEEN 1000 AND 65535
       ORDER BY account LIMIT 10`,
    );
    check(
      "no points in a money account, no money in a points account",
      mixed.length === 0,
      mixed.length === 0 ? "money and points ledgers apart" : `mixed: ${mixed.map((m) => m.account).join(", ")}`,
    );
  }

  private checkCardBalance(c: CardBalance, field: string) {
    const purse = bytesOf(c.purseId?.value ?? new Uint8Array(), 8, `${field}.purse_id`).toString("hex");
    if (!c.balance || c.balance.amountMinor < 0n) throw invalidField(`${field}.balance`, "missing or negative");
    const opening = c.openingValue?.amountMinor ?? 0n;
    if (opening < 0n) throw invalidField(`${field}.opening_value`, "negative");
    return { purse, balance: c.balance.amountMinor, opening };
  }

  /** Checks the ledger's invariants, and each card at hand against it, on one consistent view (no batch lands halfway through). */
  audit(cards: { purse: string; balance: bigint; opening: bigint }[]) {
    return this.o.store.db.transaction((q) => this.auditOf(q, cards));
  }

  private async auditOf(db: Queryable, cards: { purse: string; balance: bigint; opening: bigint }[]) {
    const checks: AuditCheck[] = [];
    const check = (name: string, ok: boolean, detail: string) => checks.push({ name, ok, detail });
    const n = (v: unknown) => BigInt((v as number | bigint | null) ?? 0);

    const unbalanced = await db.all<{ transaction_id: string; s: number }>(
      `SELECT p.kind || ' ' || p.transaction_id AS transaction_id, SUM(e.amount_minor) AS s FROM ledger_entries e JOIN postings p ON p.seq = e.posting_seq
       GROUP BY p.seq, e.currency HAVING SUM(e.amount_minor) <> 0 LIMIT 10`,
    );
    const totals = await db.get<{ postings: number; entries: number; debits: number }>(
      "SELECT (SELECT COUNT(*) FROM postings) AS postings, COUNT(*) AS entries, COALESCE(SUM(CASE WHEN amount_minor > 0 THEN amount_minor END), 0) AS debits FROM ledger_entries",
    );
    check(
      "every transaction balances (debits = credits)",
      unbalanced.length === 0,
      unbalanced.length === 0
        ? `${totals?.postings ?? 0} transactions, ${totals?.entries ?? 0} entries, ${n(totals?.debits)} minor units debited and credited`
        : `unbalanced: ${unbalanced.map((u) => `${u.transaction_id} (${u.s})`).join(", ")}`,
    );

    const proven = n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM purchases"))?.s);
    const merchantCredits = -n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM ledger_entries WHERE account LIKE 'merchant:%'"))?.s);
    check("the card debits proven equal the merchant credits", proven === merchantCredits, `card debits proven ${proven}, merchant credits ${merchantCredits}`);

    const loaded = n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM loads WHERE status = 'POSTED'"))?.s);
    const float = -n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM ledger_entries WHERE account LIKE 'issuer:%:float'"))?.s);
    check(
      "the issuer's float equals the confirmed loads less the proven purchases",
      float === loaded - proven,
      `float ${float}; confirmed loads ${loaded} - proven purchases ${proven} = ${loaded - proven}`,
    );

    const twice = await db.all<{ transaction_id: string; n: number }>(
      // Postings are unique by kind and id; each has exactly its two entries; and each purchase and posted load has its one posting.
      `SELECT p.kind || ' ' || p.transaction_id AS transaction_id, COUNT(e.id) AS n FROM postings p LEFT JOIN ledger_entries e ON e.posting_seq = p.seq
         GROUP BY p.seq HAVING COUNT(e.id) <> 2
       UNION ALL SELECT 'purchase ' || transaction_id, 0 FROM purchases u WHERE NOT EXISTS (SELECT 1 FROM postings p WHERE p.kind = 'purchase' AND p.transaction_id = u.transaction_id)
       UNION ALL SELECT 'load ' || transaction_id, 0 FROM loads l WHERE l.status = 'POSTED' AND NOT EXISTS (SELECT 1 FROM postings p WHERE p.kind = 'load' AND p.transaction_id = l.transaction_id)
       LIMIT 10`,
    );
    check(
      "no transaction id is posted twice",
      twice.length === 0,
      twice.length === 0
        ? "each purchase and each load is posted once, with exactly its two entries"
        : `not posted exactly once: ${twice.map((t) => t.transaction_id).join(", ")}`,
    );

    await this.auditPoints(db, check);

    const unproven = await db.all<{ transaction_id: string }>("SELECT transaction_id FROM loads WHERE status = 'POSTED' AND proof = ? LIMIT 10", [
      loadProofToJSON(LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN),
    ]);
    if (unproven.length > 0) {
      check(
        "loads posted without the card's S3 (negative result unproven) are listed",
        true,
        `posted on the load server's word: ${unproven.map((u) => u.transaction_id).join(", ")}`,
      );
    }

    for (const c of cards) {
      const loads = n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM loads WHERE status = 'POSTED' AND purse_id = ?", [c.purse]))?.s);
      const spent = n((await db.get<{ s: number }>("SELECT SUM(amount_minor) AS s FROM purchases WHERE purse_id = ?", [c.purse]))?.s);
      const expected = c.opening + loads - spent;
      check(
        `card ${c.purse}: its balance equals its opening value plus its loads less its purchases`,
        expected === c.balance,
        `card says ${c.balance}; ledger: opening ${c.opening} + loads ${loads} - purchases ${spent} = ${expected}`,
      );
    }

    const quarantined = n((await db.get<{ n: number }>("SELECT COUNT(*) AS n FROM quarantine WHERE resolved_at IS NULL"))?.n);
    check(
      "every quarantined record, load and rejected batch is listed with its reason",
      true,
      quarantined === 0n ? "nothing quarantined" : `${quarantined} entries: ListQuarantined (netpurse-operator quarantined) lists them`,
    );
    return { ok: checks.every((c) => c.ok), checks, transactions: Number(totals?.postings ?? 0), quarantined: Number(quarantined) };
  }
}
