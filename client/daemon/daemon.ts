// The client daemon: the cardholder's side of netpurse on the cardholder's
// machine. It holds the card reader, serves CardholderService on localhost,
// pays offers and finishes any purchase whose answer was lost.

import { randomUUID } from "node:crypto";
import { ClientError, Status } from "nice-grpc";
import { CardTransactionKind, ErrorReason, type PointsGrant, type PointsPurse } from "../../gen/netpurse/card/v1/card.js";
import { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import type {
  CardholderServiceImplementation,
  EarnPointsResponse,
  ListCardTransactionsRequest,
  ListCardTransactionsResponse,
  LoadCardRequest,
  LoadCardResponse,
  PayOfferRequest,
  PayOfferResponse,
} from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { BankServiceDefinition, HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadOutcome, LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { defaultAddress } from "../../lib/config.js";
import { loadCard, type LoadContext } from "../load/load.js";
import type { LoadJournal } from "../load/record.js";
import { needsCardUnchanged, resumeLoads, type Resumed } from "../load/recovery.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import type { CardTransport } from "../../lib/apdu/transport.js";
import { ChannelCache } from "../../lib/grpc/client.js";
import type { Security } from "../../lib/pki/security.js";
import { fieldOf, invalidField, NetpurseError, reasonOf, retryAfterMsOf } from "../../lib/grpc/errors.js";
import { isPositiveInt, pagePosition, pageSize, pageToken, type PageSizeRule } from "../../lib/grpc/page-token.js";
import { psamId, requireHostPort, requireName, txnId } from "../../lib/ids.js";
import { ApduError, SW } from "../../lib/apdu/apdu.js";
import type { Logger } from "../../lib/log.js";
import { repeat, type Periodic } from "../../lib/periodic.js";
import { formatMoney, isProgrammeCode, money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { DebitResponse, DebitResult, LogKind } from "../../lib/protocol/purse.js";
import { PurseReader } from "../card/purse-reader.js";
import { CardUnreachable } from "../../lib/pcsc/transport.js";
import { finishPurchase, isFinal, payOffer, type MerchantClient, type PaymentClient, type PurchaseContext } from "../purchase.js";
import { toRecord, type JournalRow, type LoadByRequest, type SqliteJournal, type SqliteLoadJournal } from "./journal.js";
import { pointsPurse, purseState } from "../card/purse-state.js";
import { earnPoints, isGrantWellFormed, requireGrantForCard, type BenefitsClient } from "../points.js";

/** The card log's record kinds (docs/loyalty.md) as the contract names them. */
const LOG_KINDS: Record<number, CardTransactionKind> = {
  [LogKind.PURCHASE]: CardTransactionKind.CARD_TRANSACTION_KIND_PURCHASE,
  [LogKind.LOAD]: CardTransactionKind.CARD_TRANSACTION_KIND_LOAD,
  [LogKind.AUTHENTICATION]: CardTransactionKind.CARD_TRANSACTION_KIND_AUTHENTICATION,
  [LogKind.POINTS_REDEMPTION]: CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_REDEMPTION,
  [LogKind.POINTS_CREDIT]: CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_CREDIT,
};

/** page_size of ListCardTransactions, as cardholder.proto documents it: all a card keeps by default, and the most READ LOG can address. */
const CARD_LOG_PAGE: PageSizeRule = { fallback: 32, max: 255 };
const CARD_LOG_LIST = "transactions";

/** The longest bank access token a LoadCard may carry, as cardholder.proto documents it. */
const MAX_BANK_TOKEN_CHARS = 256;

/**
 * How long the daemon keeps a bank access token: a bank's token acts for 15
 * minutes by default. After that a load whose offer never arrived cannot be
 * asked for again, and ends FAILED (the bank releases a stale hold itself).
 */
export const BANK_TOKEN_KEEP_MS = 15 * 60_000;

/** A caller's request id of LoadCard and PayOffer, as cardholder.proto documents it. */
const REQUEST_ID = /^[A-Za-z0-9_-]{1,64}$/;

function requestIdOf(raw: string): string | undefined {
  if (raw === "") return undefined;
  if (!REQUEST_ID.test(raw)) throw invalidField("request_id", "must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'");
  return raw;
}

const sameMoney = (a: { amountMinor: bigint | number; currency: number; exponent: number }, b: typeof a) =>
  BigInt(a.amountMinor) === BigInt(b.amountMinor) && a.currency === b.currency && a.exponent === b.exponent;

/**
 * An error of a load or purchase the journal holds, as the cardholder's API
 * reports it: the original code and reason, and the transaction, its journal
 * state and whether it may still complete, in the message and in the
 * ErrorInfo metadata, so a caller tells "nothing happened" from "do not do
 * it again".
 */
function journaledError(
  e: unknown,
  kind: "load" | "purchase",
  transactionId: string,
  state: string,
  mayComplete: boolean,
  /** A purchase whose DEBIT command went to the card: even if it ended FAILED, the card may have paid. */
  debitSent = false,
): NetpurseError {
  const code = e instanceof NetpurseError || e instanceof ClientError ? e.code : Status.UNKNOWN;
  const details = e instanceof NetpurseError || e instanceof ClientError ? e.details : (e as Error).message;
  const field = fieldOf(e);
  const retryAfterMs = retryAfterMsOf(e);
  const what = mayComplete
    ? state === "DONE" || state === "RECEIPT"
      ? `it is finished (${state}): do not ${kind === "load" ? "load" : "pay"} again; 'netpurse card' shows the card`
      : `it may still complete: the daemon finishes it (or 'netpurse card sync'); do not ${kind === "load" ? "load" : "pay"} again, check with 'netpurse card'`
    : kind === "load"
      ? "it ended FAILED and nothing reached the card"
      : debitSent
        ? "it ended FAILED after the card was asked to pay, so the card may have been debited: check 'netpurse card' before paying again, and keep this transaction id for the merchant"
        : "it ended FAILED before the card was asked to pay: nothing was paid";
  return new NetpurseError(
    code,
    reasonOf(e) ?? ErrorReason.ERROR_REASON_UNSPECIFIED,
    `${details} [${kind} ${transactionId}: journal state ${state}; ${what}]`,
    {
      ...(field !== undefined ? { field } : {}),
      ...(retryAfterMs !== undefined ? { retryAfterMs } : {}),
      metadata: { transaction_id: transactionId, state, may_complete: String(mayComplete), ...(kind === "purchase" ? { debit_sent: String(debitSent) } : {}) },
    },
  );
}

/**
 * A retry's answer when the earlier load or purchase of its request id did
 * not finish well: FAILED_PRECONDITION if it failed, UNAVAILABLE (IN_DOUBT)
 * while it is still open; either way, nothing was done again.
 */
function earlierUnfinished(kind: "load" | "purchase", id: string, state: string, details: { failed: string; open: string }, debitSent = false): NetpurseError {
  const failed = state === "FAILED";
  const e = failed
    ? new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_WRONG_STATE, details.failed)
    : new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_IN_DOUBT, details.open);
  return journaledError(e, kind, id, state, !failed, debitSent);
}

/** Whether a journaled purchase's DEBIT command went to the card (written before the card is asked), and its log does not prove it unpaid. */
const debitSentFor = (row: JournalRow) => row.completion_token !== null && row.card_log_proves_no_debit === 0;

/** The hold a finished load left at the bank: its confirmation posts a load and releases one not made. */
const holdAfter = (outcome: LoadOutcome) => (outcome === LoadOutcome.LOAD_OUTCOME_LOADED ? HoldState.HOLD_STATE_POSTED : HoldState.HOLD_STATE_RELEASED);

/** A ListCardTransactions token's position: entries below card counter `c` come next; `n` were listed before them. */
const isCardLogPosition = (p: unknown): p is { c: number; n: number } =>
  typeof p === "object" && p !== null && isPositiveInt((p as { c?: unknown }).c) && isPositiveInt((p as { n?: unknown }).n);

/** Errors of the card itself, as the cardholder's API reports them; errors from services pass unchanged. */
/** The card out of reach behind PC/SC: what it was doing is finished from its log once it is back. */
function noCard(e: Error): NetpurseError {
  return new NetpurseError(
    Status.UNAVAILABLE,
    ErrorReason.ERROR_REASON_NO_CARD,
    `${e.message}; anything the card took part in is finished from its log once it is back`,
  );
}

function cardError(e: unknown): unknown {
  if (e instanceof NetpurseError || e instanceof ClientError) return e;
  if (e instanceof ApduError) return new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_CARD_REFUSED, `the card refused: ${e.message}`);
  if (e instanceof CardUnreachable) return noCard(e);
  return new NetpurseError(
    Status.UNAVAILABLE,
    ErrorReason.ERROR_REASON_UNSPECIFIED,
    `cannot use the card: ${(e as Error).message}; check the reader and try again`,
  );
}

export class CardholderDaemon {
  private readonly reader: PurseReader;
  private readonly card = new Mutex();
  private readonly channels: ChannelCache;
  private resumeTimer: Periodic | undefined;
  /**
   * The newest bank access token given with a load, by bank address and
   * account: kept in memory only (never journaled), to ask a bank again for
   * an offer whose answer was lost. A token expires within minutes anyway.
   */
  private readonly bankTokens = new Map<string, { token: string; keptAt: number }>();

  constructor(
    private readonly o: {
      transport: CardTransport;
      journal: SqliteJournal;
      loads: SqliteLoadJournal;
      log: Logger;
      /** The CA the servers it reaches must prove themselves with (or --insecure). */
      security: Security;
      callDeadlineMs?: number;
      resumeEveryMs?: number;
    },
  ) {
    this.reader = new PurseReader(o.transport);
    this.channels = new ChannelCache(o.security);
  }

  private benefits = (address: string, siteId: string): BenefitsClient =>
    this.channels.client(BenefitsServiceDefinition, address, { kind: "merchant", id: siteId });
  private payment = (address: string): PaymentClient => this.channels.client(PaymentServiceDefinition, address, { kind: "payment" });
  // The merchant's server must prove the offer's merchant id: an offer naming another address cannot take its confirmation.
  private merchant = (address: string, merchantId: string): MerchantClient =>
    this.channels.client(MerchantServiceDefinition, address, { kind: "merchant", id: merchantId });

  readonly service: CardholderServiceImplementation = {
    getCard: async () =>
      this.card.run(async () => {
        const atr = await this.connect();
        const points = (await this.reader.readPointsPurses()).map(pointsPurse);
        return { purse: purseState(await this.reader.readPurse()), atrHex: atr.toString("hex"), points };
      }),
    listCardTransactions: async (req) => this.listCardTransactions(req),
    payOffer: async (req) => this.pay(req),
    loadCard: async (req) => this.load(req),
    earnPoints: async (req) =>
      this.card.run(async () => {
        // Only a well-formed grant for the card in the reader is kept: a kept grant waits for its own card.
        await requireGrantForCard(req.grant, this.reader).catch((e: unknown) => {
          throw cardError(e);
        });
        const grant = req.grant!;
        await this.settleLoadsBeforeUsingCard();
        await this.o.loads.grantKept(grant);
        return this.collect(grant).catch((e: unknown) => {
          throw cardError(e);
        });
      }),
    syncCard: async () =>
      this.card.run(async () => {
        const loads = await this.resumeOpenLoads();
        // A daemon's first call may be this one: the card must be selected before it is read.
        await this.connect();
        return {
          loads: loads.map((l) => ({ transactionId: txnId(l.transactionId), outcome: l.outcome, holdState: l.holdState, detail: l.detail })),
          purse: purseState(await this.reader.readPurse()),
        };
      }),
  };

  /**
   * One page of the card's log, newest first. The page token holds the card
   * counter to continue below, so a transaction the card makes between pages
   * shifts nothing; `limit` bounds the whole listing, and the count already
   * listed travels in the token.
   */
  private async listCardTransactions(req: ListCardTransactionsRequest): Promise<ListCardTransactionsResponse> {
    const size = pageSize(req.pageSize, CARD_LOG_PAGE);
    return this.card.run(async () => {
      try {
        await this.connect();
        const purse = await this.reader.readPurse();
        const scope = `card ${purse.purseId.toString("hex")} ${req.limit ? `(limit ${req.limit})` : "(no limit)"}`;
        const at = pagePosition(req.pageToken, CARD_LOG_LIST, scope, isCardLogPosition);
        const listed = at?.n ?? 0;
        const room = req.limit ? req.limit - listed : Infinity;
        if (room <= 0) throw invalidField("page_token", `says ${listed} entries were listed, as many as the limit or more: that listing had ended`);
        const want = Math.min(size, room);
        // Counters only grow, one per transaction at least: at most this many entries are newer than the position.
        const newer = at ? Math.max(0, purse.counter - at.c + 1) : 0;
        const records = (await this.reader.readLog(Math.min(newer + want + 1, 255))).filter((r) => !at || r.counter < at.c);
        const page = records.slice(0, want);
        const last = page[page.length - 1];
        const more = last !== undefined && records.length > page.length && page.length < room;
        return {
          transactions: page.map((r) => ({
            kind: LOG_KINDS[r.kind] ?? CardTransactionKind.CARD_TRANSACTION_KIND_UNSPECIFIED,
            transactionCounter: r.counter,
            // Points and authentications have exponent 0; only the money purse's records carry its exponent.
            amount: money(r.amount, r.currency, r.currency === purse.currency ? purse.exponent : 0),
            balanceAfter: money(r.balance, r.currency, r.currency === purse.currency ? purse.exponent : 0),
            psamId: psamId(r.moduleId.toString("hex")),
            psamCounter: r.moduleCounter,
            transactionId: txnId(r.transactionRef),
            time: new Date(r.dateTime * 1000),
            cardSignature: r.cardSignature,
          })),
          nextPageToken: more ? pageToken(CARD_LOG_LIST, scope, { c: last.counter, n: listed + page.length }) : "",
        };
      } catch (e) {
        throw cardError(e);
      }
    });
  }

  private async connect(): Promise<Buffer> {
    try {
      return await this.reader.connect();
    } catch (e) {
      if (e instanceof CardUnreachable) throw noCard(e);
      throw new NetpurseError(
        Status.UNAVAILABLE,
        ErrorReason.ERROR_REASON_NO_CARD,
        `cannot reach the card: ${(e as Error).message}; insert the card and try again`,
      );
    }
  }

  private async load(req: LoadCardRequest): Promise<LoadCardResponse> {
    const requestId = requestIdOf(req.requestId);
    const amount = req.amount;
    const approved = req.approvedAmount;
    if (!amount || !approved || !sameMoney(approved, amount)) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_NOT_APPROVED,
        `the cardholder approved ${approved ? formatMoney(approved) : "nothing"}, the load asks ${amount ? formatMoney(amount) : "nothing"}; nothing was asked of the bank`,
      );
    }
    const accountId = requireName(req.accountId, "account_id", 32);
    const accessToken = req.bankAccessToken;
    if (!accessToken) {
      throw new NetpurseError(
        Status.UNAUTHENTICATED,
        ErrorReason.ERROR_REASON_UNAUTHENTICATED,
        "no bank_access_token: the bank acts only for the account holder; log in to the bank (Login) and pass its access token. Nothing was asked of the bank",
      );
    }
    if (accessToken.length > MAX_BANK_TOKEN_CHARS) throw invalidField("bank_access_token", `longer than ${MAX_BANK_TOKEN_CHARS} characters`);
    const bankAddress = req.bankAddress ? requireHostPort(req.bankAddress, "bank_address") : defaultAddress("bank");
    return this.card.run(async () => {
      this.keepBankToken(bankAddress, accountId, accessToken);
      const earlier = requestId ? await this.o.loads.byRequestId(requestId) : undefined;
      if (earlier && requestId) {
        // A retry that fails on its own way (the reader, say) still names the load it is about.
        return this.loadAgain(earlier, requestId, { bankAddress, accountId, amount }).catch(async (e: unknown) => {
          throw e instanceof NetpurseError ? e : await this.loadError(earlier.transactionId, cardError(e));
        });
      }
      await this.settleLoadsBeforeUsingCard();
      this.o.log.info("loading the card", { account: accountId, amount: formatMoney(amount), request: requestId });
      const transactionId = randomUUID();
      try {
        const r = await loadCard({ bankAddress, accountId, amount, accessToken, transactionId, ...(requestId ? { requestId } : {}) }, this.loadContext());
        return {
          transactionId: txnId(r.transactionId),
          outcome: r.outcome,
          holdState: r.holdState,
          purse: purseState(await this.reader.readPurse()),
          steps: r.steps,
        };
      } catch (e) {
        throw await this.loadError(transactionId, cardError(e));
      }
    });
  }

  /** A load's error, naming the load once the journal holds it (untouched before: nothing happened). */
  private async loadError(transactionId: string, e: unknown): Promise<unknown> {
    const row = await this.o.loads.get(transactionId).catch(() => undefined);
    return row ? journaledError(e, "load", transactionId, row.state, row.state !== "FAILED") : e;
  }

  /**
   * A retry of a load under its request id: never a second load. It gets the
   * earlier load's result once finished (after a try to finish it now), its
   * failure, or an error naming it while it is still open.
   */
  private async loadAgain(
    earlier: LoadByRequest,
    requestId: string,
    asked: { bankAddress: string; accountId: string; amount: NonNullable<LoadCardRequest["amount"]> },
  ): Promise<LoadCardResponse> {
    const id = earlier.transactionId;
    if (earlier.bankAddress !== asked.bankAddress || earlier.accountId !== asked.accountId || !sameMoney(earlier.amount, asked.amount)) {
      throw new NetpurseError(
        Status.ALREADY_EXISTS,
        ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
        `request id ${requestId} was used for load ${id} of ${formatMoney(earlier.amount)} from account ${earlier.accountId} at ${earlier.bankAddress}, not for ${formatMoney(asked.amount)} from account ${asked.accountId} at ${asked.bankAddress}; nothing was done: use a new request id for a new load`,
      );
    }
    if (earlier.state !== "DONE" && earlier.state !== "FAILED") {
      await this.resumeOpenLoads();
      earlier = (await this.o.loads.get(id)) ?? earlier;
    }
    this.o.log.info("load asked again under its request id", { transaction: id, request: requestId, state: earlier.state });
    if (earlier.state === "DONE" && earlier.settled) {
      return {
        transactionId: txnId(id),
        outcome: earlier.settled.outcome,
        holdState: holdAfter(earlier.settled.outcome),
        purse: purseState(await this.reader.readPurse()),
        steps: [{ name: "request id", detail: `request ${requestId} already made load ${id}, now finished; nothing was loaded again` }],
      };
    }
    throw earlierUnfinished("load", id, earlier.state, {
      failed: `request ${requestId} already made load ${id}, which failed: ${earlier.error ?? "no reason kept"}; load again with a new request id`,
      open: `request ${requestId} already made load ${id}, which is not finished yet; nothing was loaded again: retry later with the same request id`,
    });
  }

  /** Pending loads first: the card's history goes to their load servers before the card's next transaction (the pending deposit). */
  private async resumeOpenLoads(): Promise<Resumed[]> {
    try {
      const done = await resumeLoads(this.loadContext());
      for (const d of done) this.o.log.info("open load", { transaction: d.transactionId, detail: d.detail });
      return done;
    } catch (e) {
      this.o.log.warn("could not finish the open loads; they stay journaled", { detail: (e as Error).message });
      return [];
    }
  }

  /** Before the card's next purchase or load: open loads are finished, and none may still need the card as it is. */
  private async settleLoadsBeforeUsingCard(): Promise<void> {
    await this.resumeOpenLoads();
    // A points credit cut short is finished while the card's counter still shows whether it was made.
    await this.collectOpenGrants();
    const doubt = await this.o.loads.grantInDoubt();
    if (doubt) {
      throw new NetpurseError(
        Status.UNAVAILABLE,
        ErrorReason.ERROR_REASON_IN_DOUBT,
        `the points credit of grant ${doubt} went to the card and its answer is not known; the card must show whether it took it before it is used again (the programme's benefits site must be reachable if it did not); nothing was done. Try again later`,
      );
    }
    const waiting = (await this.o.loads.openLoads()).find(needsCardUnchanged);
    if (waiting) {
      throw new NetpurseError(
        Status.UNAVAILABLE,
        ErrorReason.ERROR_REASON_IN_DOUBT,
        `load ${waiting.transactionId} is not settled yet, and the card must prove it was not loaded before it is used again; nothing was done. Check the connection to the load server and run 'netpurse card sync'`,
      );
    }
  }

  private keepBankToken(bankAddress: string, accountId: string, token: string): void {
    const key = `${bankAddress} ${accountId}`;
    this.bankTokens.delete(key);
    this.bankTokens.set(key, { token, keptAt: Date.now() });
    // A cardholder uses a bank account or two: the oldest goes beyond a few.
    const oldest = this.bankTokens.keys().next();
    if (this.bankTokens.size > 16 && !oldest.done) this.bankTokens.delete(oldest.value);
  }

  private loadContext(): LoadContext & { journal: LoadJournal } {
    return {
      reader: this.reader,
      bank: (address) => this.channels.client(BankServiceDefinition, address, { kind: "bank" }),
      bankToken: (address, accountId) => {
        const kept = this.bankTokens.get(`${address} ${accountId}`);
        return kept && Date.now() - kept.keptAt < BANK_TOKEN_KEEP_MS ? kept.token : undefined;
      },
      load: (address) => this.channels.client(LoadServiceDefinition, address, { kind: "load" }),
      journal: this.o.loads,
      ...(this.o.callDeadlineMs ? { callDeadlineMs: this.o.callDeadlineMs } : {}),
    };
  }

  private async pay(req: PayOfferRequest): Promise<PayOfferResponse> {
    const requestId = requestIdOf(req.requestId);
    const offer = req.offer;
    const approved = req.approvedAmount;
    const a = offer?.amount;
    if (!approved || !a || !sameMoney(approved, a)) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_NOT_APPROVED,
        `the cardholder approved ${approved ? formatMoney(approved) : "nothing"}, the offer asks ${a ? formatMoney(a) : "nothing"}; the card was not touched`,
      );
    }
    return this.card.run(async () => {
      const earlier = requestId ? await this.o.journal.byRequestId(requestId) : undefined;
      if (earlier && requestId && offer) {
        return this.payAgain(earlier, requestId, offer).catch(async (e: unknown) => {
          throw e instanceof NetpurseError ? e : await this.payError(earlier.transaction_id, cardError(e));
        });
      }
      const done = offer?.transactionId ? await this.o.journal.get(offer.transactionId.value) : undefined;
      if (done) {
        throw new NetpurseError(
          Status.ALREADY_EXISTS,
          ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
          `this offer (transaction ${offer.transactionId!.value}) was already paid or tried (${done.state}); ask the merchant for a new one`,
        );
      }
      await this.settleLoadsBeforeUsingCard();
      this.o.log.info("paying offer", { transaction: offer?.transactionId?.value, amount: a ? formatMoney(a) : undefined, request: requestId });
      try {
        const out = await payOffer(offer, this.context(), requestId ? { requestId } : {});
        const grant = out.receipt.pointsGrant;
        // The journal kept the grant with the receipt; its points go onto the card now if they can, else later.
        if (grant && isGrantWellFormed(grant)) {
          const earned = await this.collect(grant).catch((e: unknown) => {
            out.steps.push({ name: "points", detail: `not collected yet (${(e as Error).message}); the daemon tries again` });
          });
          if (earned) out.steps.push(...earned.steps);
        }
        const redeemed = offer && isProgrammeCode(offer.amount!.currency) ? await this.pointsOf(offer.amount!.currency) : undefined;
        return { receipt: out.receipt, purse: purseState(await this.reader.readPurse()), steps: out.steps, points: redeemed };
      } catch (e) {
        throw await this.payError(offer?.transactionId?.value, cardError(e));
      }
    });
  }

  /** A purchase's error, naming the purchase once the journal holds it (untouched before: nothing happened). */
  private async payError(transactionId: string | undefined, e: unknown): Promise<unknown> {
    const row = transactionId ? await this.o.journal.get(transactionId).catch(() => undefined) : undefined;
    return row ? journaledError(e, "purchase", row.transaction_id, row.state, row.state !== "FAILED", debitSentFor(row)) : e;
  }

  /**
   * A retry of a purchase under its request id: never a second debit. It
   * gets the receipt once the purchase is finished (after a try to finish
   * it now), its failure, or an error naming it while it is still open.
   */
  private async payAgain(earlier: JournalRow, requestId: string, offer: NonNullable<PayOfferRequest["offer"]>): Promise<PayOfferResponse> {
    const id = earlier.transaction_id;
    const paid = toRecord(earlier).offer;
    if (offer.transactionId?.value !== id || !offer.amount || !paid.amount || !sameMoney(offer.amount, paid.amount)) {
      throw new NetpurseError(
        Status.ALREADY_EXISTS,
        ErrorReason.ERROR_REASON_REQUEST_ID_REUSED,
        `request id ${requestId} was used for purchase ${id} (${paid.amount ? formatMoney(paid.amount) : "?"}), not for offer ${offer.transactionId?.value ?? "?"}; nothing was done: use a new request id for a new purchase`,
      );
    }
    if (earlier.state === "STARTED") await this.endStartedPurchases();
    else if (earlier.state !== "FAILED" && earlier.state !== "RECEIPT") await this.finish(earlier);
    const now = (await this.o.journal.get(id)) ?? earlier;
    this.o.log.info("purchase asked again under its request id", { transaction: id, request: requestId, state: now.state });
    if (now.state === "RECEIPT" && now.receipt) {
      return {
        receipt: toRecord(now).receipt,
        purse: purseState(await this.reader.readPurse()),
        steps: [{ name: "request id", detail: `request ${requestId} already paid purchase ${id}; the card was not debited again` }],
        points: undefined,
      };
    }
    throw earlierUnfinished(
      "purchase",
      id,
      now.state,
      {
        failed: `request ${requestId} already tried purchase ${id}, which failed: ${now.error ?? "no reason kept"}`,
        open: `request ${requestId} already started purchase ${id}, which is not finished yet; the card was not debited again: retry later with the same request id`,
      },
      debitSentFor(now),
    );
  }

  /**
   * Ends purchases left STARTED by a daemon that stopped half-way: no DEBIT
   * command was journaled for them, so none reached the card. Called with
   * the card held, so no purchase is in progress.
   */
  private async endStartedPurchases(): Promise<void> {
    for (const row of await this.o.journal.startedOnly()) {
      const why =
        "the daemon stopped before any DEBIT command reached the card, so the card was not debited; the payment server reverses its security module's open debit. Ask the merchant for a new offer";
      await this.o.journal.failed(row.transaction_id, why);
      this.o.log.warn("purchase left half-way ended", { transaction: row.transaction_id, detail: why });
    }
  }

  /**
   * Finishes purchases the card may have paid whose confirmation or goods
   * did not arrive; called at start and then periodically. Holds the card
   * meanwhile, so no payment runs beside it.
   */
  resume(): Promise<number> {
    return this.card.run(async () => {
      let finished = 0;
      await this.endStartedPurchases();
      for (const row of await this.o.journal.unfinished()) {
        if (await this.finish(row)) finished++;
      }
      await this.resumeOpenLoads();
      await this.collectOpenGrants();
      return finished;
    });
  }

  /** The card's points purse of a programme, as the contract shows it. */
  private async pointsOf(programme: number): Promise<PointsPurse | undefined> {
    const p = (await this.reader.readPointsPurses()).find((x) => x.currency === programme);
    return p ? pointsPurse(p) : undefined;
  }

  /** Collects one kept grant onto the card; the journal keeps it open if that fails, to be tried again. */
  private async collect(grant: PointsGrant): Promise<EarnPointsResponse> {
    const id = grant.grantId!.value;
    try {
      const r = await earnPoints(grant, {
        reader: this.reader,
        benefits: this.benefits,
        journal: this.o.loads,
        ...(this.o.callDeadlineMs ? { callDeadlineMs: this.o.callDeadlineMs } : {}),
      });
      await this.o.loads.grantCredited(id);
      this.o.log.info("points collected", { grant: id, points: formatMoney(grant.points!) });
      return r;
    } catch (e) {
      // A final refusal (points altered, one the programme credited already) is not tried forever; a grant that waits
      // for its card, or for room on it, is.
      const waits =
        (e instanceof NetpurseError || e instanceof ClientError) &&
        e.code === Status.FAILED_PRECONDITION &&
        [ErrorReason.ERROR_REASON_INVALID_FIELD, ErrorReason.ERROR_REASON_MAX_BALANCE_EXCEEDED].includes(reasonOf(e) ?? ErrorReason.ERROR_REASON_UNSPECIFIED);
      await this.o.loads.grantFailed(id, (e as Error).message, isFinal(e) && !waits);
      throw e;
    }
  }

  /** Grants whose collection was cut short (or never started, after a purchase's recovery), tried again. */
  private async collectOpenGrants(): Promise<void> {
    // A points credit moves the card's counter, which a money load in doubt needs unchanged to be proven not made.
    if ((await this.o.loads.openLoads()).some(needsCardUnchanged)) return;
    for (const g of await this.o.loads.openGrants()) {
      await this.collect(g).catch((e: unknown) =>
        this.o.log.warn("points not collected yet; the grant stays kept", { grant: g.grantId?.value, detail: (e as Error).message }),
      );
    }
  }

  private async finish(row: JournalRow): Promise<boolean> {
    const id = row.transaction_id;
    const alreadyHadGoods = row.state === "RECEIPT";
    try {
      if (row.state === "DEBIT_SENT") {
        // The card may have debited, but its answer was never journaled: its own log tells.
        const answer = await this.answerFromCardLog(row);
        if (!answer) {
          this.o.log.warn("cannot tell from the card whether it paid; keeping the purchase open", { transaction: id });
          return false;
        }
        if (answer === "not debited") {
          await this.o.journal.cardLogProvesNoDebit(id);
          row = { ...row, state: "CARD_ANSWERED", card_status_word: null, debit_response: null, card_log_proves_no_debit: 1 };
        } else {
          await this.o.journal.cardAnswered(id, answer.sw, answer.raw);
          row = { ...row, state: "CARD_ANSWERED", card_status_word: answer.sw, debit_response: answer.raw };
        }
      }
      const receipt = await finishPurchase(toRecord(row), this.context(), undefined, { awaitProof: true });
      this.o.log.info(alreadyHadGoods ? "card proof reported" : "unfinished purchase completed", { transaction: id, goods: receipt.goods });
      return !alreadyHadGoods;
    } catch (e) {
      if (isFinal(e)) {
        await this.o.journal.failed(id, (e as Error).message);
        this.o.log.warn("unfinished purchase ended without goods", { transaction: id, detail: (e as Error).message });
      } else {
        this.o.log.info("purchase still waiting", { transaction: id, detail: (e as Error).message });
      }
      return false;
    }
  }

  private context(): PurchaseContext {
    return {
      reader: this.reader,
      payment: this.payment,
      merchant: this.merchant,
      journal: this.o.journal,
      ...(this.o.callDeadlineMs ? { callDeadlineMs: this.o.callDeadlineMs } : {}),
    };
  }

  /**
   * The card's answer to a DEBIT whose answer was lost, rebuilt from the
   * card's log: the log entry of the next counter either is this debit (with
   * the card's signature) or proves the card did not make it. Undefined when
   * the log no longer reaches back that far, or another card is in the reader.
   */
  private async answerFromCardLog(row: JournalRow): Promise<{ sw: number; raw: Buffer } | "not debited" | undefined> {
    await this.reader.connect();
    const purse = await this.reader.readPurse();
    if (purse.purseId.toString("hex") !== row.purse_id) return undefined;
    if (row.card_counter === null) return undefined; // DEBIT_SENT always records it
    const counter = row.card_counter;
    const next = (await this.reader.readLog()).find((e) => e.counter === counter + 1);
    const notDebited = "not debited";
    if (next) {
      const ours = next.transactionRef === row.transaction_id && next.moduleCounter === row.psam_counter && next.moduleId.toString("hex") === row.psam_id;
      if (!ours) return notDebited;
      return {
        sw: SW.OK,
        raw: DebitResponse.encode({ result: DebitResult.DEBITED, counter: next.counter, balance: next.balance, cardSignature: next.cardSignature }),
      };
    }
    return purse.counter === row.card_counter ? notDebited : undefined;
  }

  startResuming(): void {
    this.resumeTimer = repeat({
      what: "resumption of open purchases and loads",
      everyMs: this.o.resumeEveryMs ?? 30_000,
      log: this.o.log,
      task: () => this.resume(),
    });
  }

  async close(): Promise<void> {
    this.resumeTimer?.stop();
    this.channels.close();
    await this.o.transport.close();
  }
}
