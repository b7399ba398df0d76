// The client module's purchase (FIG. 11A-C, 12-15): check the card against
// the offer (step 608), package the card's responses into one draw request
// sealed under the transaction session key, put the merchant's amount back
// into the PSAM's DEBIT command (step 618), have the card debit itself, then
// finish by the offer's confirmation mode:
//   PSAM_VERIFIES, SERVER_COMPARES: the card's answer goes to the payment
//     server, which returns debit result C (for us) and M (for the merchant);
//   CLIENT_COMPARES: this client's trusted agent compares the card's signature
//     with the one the PSAM expected, passes the merchant the debit result M
//     it got with the DEBIT command, and reports the card's proof afterwards;
//   MERCHANT_COMPARES: the merchant gets debit result M and the card's raw
//     answer, and compares.

import { Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ConfirmationMode, ErrorReason, type Sealed } from "../gen/netpurse/card/v1/card.js";
import type { MerchantServiceDefinition, PaymentOffer, Receipt } from "../gen/netpurse/merchant/v1/merchant.js";
import { CardAnswer, DebitResultC, DrawRequest, IssuedDebitCommand, type PaymentServiceDefinition } from "../gen/netpurse/payment/v1/payment.js";
import type { PurchaseStep } from "../gen/netpurse/cardholder/v1/cardholder.js";
import { ApduError, swHex, SW } from "../lib/apdu/apdu.js";
import { macEqual } from "../lib/crypto/aes.js";
import { invalidField, NetpurseError, passOn } from "../lib/grpc/errors.js";
import { requireOfferAmount } from "../lib/offer-amount.js";
import { hexOf, requireConfirmationMode, requireMerchantId, requireTransactionId, txnId } from "../lib/ids.js";
import { AUTHENTICATION_CURRENCY, formatMoney, isMoneyCurrency } from "../lib/money.js";
import { DEFAULT_DEADLINE_MS, InvalidTarget, parseTarget } from "../lib/grpc/client.js";
import { open, seal } from "../lib/protocol/encryption-layer.js";
import { cardProofDigest, DebitResponse, DebitResult, isExpired, PurseStatusByte } from "../lib/protocol/purse.js";
import { withOriginalAmount, type PurseReader } from "./card/purse-reader.js";
import { isFinal, retrying } from "./calls.js";

export { isFinal };

export type PaymentClient = Client<typeof PaymentServiceDefinition, DeadlineOptions>;
export type MerchantClient = Client<typeof MerchantServiceDefinition, DeadlineOptions>;

/** Where a purchase stands on the client's side, as its journal records it. */
export type ClientPurchaseState = "STARTED" | "DEBIT_SENT" | "CARD_ANSWERED" | "CONFIRMED" | "RECEIPT" | "FAILED";

/** What the client knows when it hands the DEBIT command to the card: enough to finish the purchase, or find the debit in the card's log. */
export interface DebitSent {
  purseId: string;
  cardCounter: number;
  psamId: string;
  psamCounter: number;
  completionToken: Buffer;
  /** CLIENT_COMPARES: the card signature the PSAM expects. */
  expectedSignatureDigest: Buffer;
  /** The one-round-trip modes: the debit result M that came with the DEBIT command. */
  issuedResultM: Sealed | undefined;
}

/** A purchase as the journal holds it, from its first step to its receipt. */
export interface PurchaseRecord extends Partial<DebitSent> {
  transactionId: string;
  offer: PaymentOffer;
  state: ClientPurchaseState;
  cardStatusWord?: number;
  debitResponse?: Buffer;
  /** The card's answer was lost, and its log proves it never made this debit. */
  cardLogProvesNoDebit?: boolean;
  /** The debit result M to give the merchant. */
  resultM?: Sealed;
  receipt?: Receipt;
  proofReported: boolean;
}

/** The client's log of each purchase step (the patent's client logs), so a lost answer can be recovered. */
export interface PurchaseJournal {
  /** The first step, with the caller's request id if it gave one (a retry under it finds this purchase). */
  started(offer: PaymentOffer, requestId?: string): Promise<void>;
  /** Written before the card sees DEBIT: from here on, the card may be debited. */
  debitSent(transactionId: string, d: DebitSent): Promise<void>;
  cardAnswered(transactionId: string, sw: number, debitResponse: Buffer): Promise<void>;
  /** The card's answer was lost, and the card's log proves it never made the debit. */
  cardLogProvesNoDebit(transactionId: string): Promise<void>;
  confirmed(transactionId: string, resultM: Sealed): Promise<void>;
  /** The receipt, with the order's access secret: the buyer's only way to have GetOrder show the goods again. */
  receipt(transactionId: string, receipt: Receipt, orderAccessSecret: Uint8Array): Promise<void>;
  proofReported(transactionId: string): Promise<void>;
  failed(transactionId: string, why: string): Promise<void>;
}

export interface PurchaseContext {
  reader: PurseReader;
  payment(address: string): PaymentClient;
  /** A client of the merchant at `address`, whose server must prove `merchantId`. */
  merchant(address: string, merchantId: string): MerchantClient;
  journal?: PurchaseJournal;
  /** Per-call deadline towards the payment server and merchant, ms. */
  callDeadlineMs?: number;
  now?: () => Date;
}

export interface PurchaseOutcome {
  receipt: Receipt;
  steps: PurchaseStep[];
}

/** How many of the card's newest log records go with each draw request, so purchases in doubt settle from them. */
const CARD_LOG_SENT = 4;

const failedPrecondition = (reason: ErrorReason, text: string) => new NetpurseError(Status.FAILED_PRECONDITION, reason, text);

/** The most payment server replicas an offer may list. */
const MAX_OFFER_REPLICAS = 8;

/** Checks an offer's fields before anything touches the card. */
function checkOffer(offer: PaymentOffer | undefined, now: Date): asserts offer is PaymentOffer & { amount: NonNullable<PaymentOffer["amount"]> } {
  if (!offer) throw invalidField("offer", "missing");
  requireTransactionId(offer.transactionId, "offer.transaction_id");
  requireMerchantId(offer.merchantId, "offer.merchant_id");
  requireOfferAmount(offer.amount, "offer.amount");
  if (!offer.paymentServerAddress) throw invalidField("offer.payment_server_address", "missing");
  let target;
  try {
    target = parseTarget(offer.paymentServerAddress);
  } catch (e) {
    if (e instanceof InvalidTarget) throw invalidField("offer.payment_server_address", e.message);
    throw e;
  }
  // The merchant names where the daemon connects: a socket on the cardholder's machine, or a list of thousands of
  // addresses to connect to again and again, is no payment server's address.
  if (target.kind === "unix") throw invalidField("offer.payment_server_address", "a Unix socket is no payment server's address on the Internet");
  if (target.kind === "list" && target.backends.length > MAX_OFFER_REPLICAS)
    throw invalidField("offer.payment_server_address", `lists ${target.backends.length} addresses; at most ${MAX_OFFER_REPLICAS} payment server replicas`);
  if (!offer.merchantAddress) throw invalidField("offer.merchant_address", "missing");
  requireConfirmationMode(offer.confirmationMode, "offer.confirmation_mode");
  if (offer.keyNonce.length !== 16) throw invalidField("offer.key_nonce", "must be 16 bytes");
  if (offer.transactionSessionKey.length !== 32) throw invalidField("offer.transaction_session_key", "must be 32 bytes");
  if (!offer.encryptedSessionKey) throw invalidField("offer.encrypted_session_key", "missing");
  if (offer.expiresAt && offer.expiresAt.getTime() < now.getTime()) {
    throw failedPrecondition(ErrorReason.ERROR_REASON_OFFER_EXPIRED, `the offer expired at ${offer.expiresAt.toISOString()}; ask the merchant for a new one`);
  }
}

const modeName = (m: ConfirmationMode) => ConfirmationMode[m].replace("CONFIRMATION_MODE_", "");

export async function payOffer(offer: PaymentOffer, ctx: PurchaseContext, o: { requestId?: string } = {}): Promise<PurchaseOutcome> {
  const now = ctx.now?.() ?? new Date();
  checkOffer(offer, now);
  const steps: PurchaseStep[] = [];
  const step = (name: string, detail: string) => steps.push({ name, detail });
  const id = offer.transactionId!.value;
  const amount = Number(offer.amount.amountMinor);
  const shown = formatMoney(offer.amount);
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  step(
    "offer",
    `${offer.merchantName || offer.merchantId!.value} asks ${shown} for "${offer.description}" (transaction ${id}, mode ${modeName(offer.confirmationMode)})`,
  );

  // Step 608: the card against the offer, before anything leaves this machine.
  await ctx.reader.connect();
  const cardLog = await ctx.reader.readLogRaw(CARD_LOG_SENT);
  // An authentication or a redemption opens the card's session on the purse of the offer's currency (docs/loyalty.md).
  const selector = isMoneyCurrency(offer.amount.currency) ? undefined : offer.amount.currency;
  const init = await ctx.reader.initializeForPurchase(selector).catch((e: unknown) => {
    if (selector !== undefined && e instanceof ApduError && e.sw === SW.REFERENCED_DATA_NOT_FOUND) {
      throw failedPrecondition(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, `the card holds no purse for ${shown}; nothing was sent`);
    }
    throw e;
  });
  const card = init.parsed;
  const cardMoney = (v: number) => formatMoney({ amountMinor: v, currency: card.currency, exponent: card.exponent });
  const authentication = offer.amount.currency === AUTHENTICATION_CURRENCY;
  step(
    "card",
    `purse ${card.purseId.toString("hex")}: ${authentication ? "authentication application" : `balance ${cardMoney(card.balance)}`}, counter ${card.counter}, expires ${card.expiry}`,
  );
  if (card.currency !== offer.amount.currency || card.exponent !== offer.amount.exponent) {
    throw failedPrecondition(
      ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
      `the card's purse is in currency ${card.currency} (exponent ${card.exponent}), the offer is ${shown}; nothing was sent`,
    );
  }
  if (card.status !== PurseStatusByte.ACTIVE) throw failedPrecondition(ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked; nothing was sent");
  if (isExpired(card.expiry, now)) throw failedPrecondition(ErrorReason.ERROR_REASON_CARD_EXPIRED, `the card expired on ${card.expiry}; nothing was sent`);
  if (card.balance < amount) {
    throw failedPrecondition(
      ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE,
      `the card holds ${cardMoney(card.balance)}, the offer asks ${shown}; nothing was sent`,
    );
  }
  step("checks", "currency, expiry and balance are good for this offer (step 608)");
  await ctx.journal?.started(offer, o.requestId);

  const tsk = Buffer.from(offer.transactionSessionKey);
  const drawRequest: DrawRequest = {
    transactionId: offer.transactionId,
    merchantId: offer.merchantId,
    amount: offer.amount,
    confirmationMode: offer.confirmationMode,
    cardAtr: ctx.reader.answerToReset,
    initializeResponse: init.raw,
    cardLog,
  };
  const sealedDraw = seal(tsk, "DRAW_REQUEST", id, DrawRequest.encode(drawRequest).finish());
  const payment = ctx.payment(offer.paymentServerAddress);
  let issued: IssuedDebitCommand;
  let issuedResultM: Sealed | undefined;
  try {
    const r = await retrying(() =>
      payment.processDrawRequest(
        {
          transactionId: offer.transactionId,
          merchantId: offer.merchantId,
          keyNonce: offer.keyNonce,
          encryptedSessionKey: offer.encryptedSessionKey,
          drawRequest: sealedDraw,
        },
        { deadline },
      ),
    );
    const plain = open(tsk, "DEBIT_COMMAND", id, r.debitCommand);
    if (!plain)
      throw new NetpurseError(
        Status.PERMISSION_DENIED,
        ErrorReason.ERROR_REASON_SEAL_BROKEN,
        "the DEBIT command from the payment server does not open with this offer's session key",
      );
    issued = IssuedDebitCommand.decode(plain);
    issuedResultM = r.debitResultM;
  } catch (e) {
    await ctx.journal?.failed(id, (e as Error).message);
    passOn(e, "payment server refused the draw request");
  }
  step(
    "draw request",
    `sealed under the offer's session key and sent to ${offer.paymentServerAddress}: ATR ${ctx.reader.answerToReset.length} bytes, INITIALIZE response ${init.raw.length} bytes, ${shown}`,
  );
  step("PSAM", `terminal ${issued.terminalId}, PSAM ${hexOf(issued.psamId?.value)} signed the DEBIT command (PSAM counter ${issued.psamCounter})`);

  // Step 618: the merchant's amount, whatever came back.
  const debitCommand = withOriginalAmount(Buffer.from(issued.debitCommand), amount);
  step(
    "debit command",
    authentication ? "amount kept at zero (step 618) and sent to the card" : `amount set back to the merchant's ${shown} (step 618) and sent to the card`,
  );
  const sent: DebitSent = {
    purseId: card.purseId.toString("hex"),
    cardCounter: card.counter,
    psamId: hexOf(issued.psamId?.value),
    psamCounter: issued.psamCounter,
    completionToken: Buffer.from(issued.completionToken),
    expectedSignatureDigest: Buffer.from(issued.expectedCardSignatureDigest),
    issuedResultM,
  };
  await ctx.journal?.debitSent(id, sent);
  const answer = await ctx.reader.debit(debitCommand);
  await ctx.journal?.cardAnswered(id, answer.sw, answer.raw);
  if (answer.sw === SW.OK && answer.parsed!.result === DebitResult.DEBITED) {
    step(
      "card debit",
      authentication
        ? `card signed the zero-value authentication without moving value: counter ${answer.parsed!.counter}, card signature ${answer.parsed!.cardSignature.toString("hex")}`
        : `card debited ${shown}: balance ${cardMoney(answer.parsed!.balance)}, counter ${answer.parsed!.counter}, card signature ${answer.parsed!.cardSignature.toString("hex")}`,
    );
  } else {
    step(
      "card debit",
      answer.sw === SW.OK ? `card declined the debit (result ${answer.parsed!.result})` : `card refused the DEBIT command (SW ${swHex(answer.sw)})`,
    );
  }
  const receipt = await finishPurchase(
    { transactionId: id, offer, state: "CARD_ANSWERED", ...sent, cardStatusWord: answer.sw, debitResponse: answer.raw, proofReported: false },
    ctx,
    step,
  );
  return { receipt, steps };
}

/**
 * Finishes a purchase from where its record stands, once the card has
 * answered: gets the merchant's debit result M (from the payment server, or
 * the one that came with the DEBIT command when this client or the merchant
 * compares), has the merchant release the goods, and in CLIENT_COMPARES
 * reports the card's proof. Used by payOffer and by the daemon's recovery.
 */
export async function finishPurchase(
  rec: PurchaseRecord,
  ctx: PurchaseContext,
  step: (name: string, detail: string) => void = () => {},
  opts: { awaitProof?: boolean } = {},
): Promise<Receipt> {
  const id = rec.transactionId;
  const offer = rec.offer;
  const mode = offer.confirmationMode;
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  const answer = rec.cardStatusWord === SW.OK && rec.debitResponse?.length === DebitResponse.size ? DebitResponse.decode(rec.debitResponse) : undefined;
  const debited = answer?.result === DebitResult.DEBITED;

  if (rec.state === "CARD_ANSWERED") {
    let resultM: Sealed | undefined;
    if (
      mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES &&
      debited &&
      rec.expectedSignatureDigest &&
      macEqual(cardProofDigest(id, answer.cardSignature), rec.expectedSignatureDigest)
    ) {
      resultM = rec.issuedResultM;
      step("comparison", "this client's trusted agent found the card's signature is the one the PSAM expected (FIG. 7)");
    } else if (mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES && debited) {
      resultM = rec.issuedResultM;
      step("comparison", "left to the merchant: it gets the card's raw answer and the digest of the PSAM's expected signature, sealed for it (FIG. 8)");
    }
    if (!resultM) resultM = await completeAtPaymentServer(rec, ctx, deadline, step);
    await ctx.journal?.confirmed(id, resultM);
    rec = { ...rec, state: "CONFIRMED", resultM };
  }

  let receipt = rec.receipt;
  if (rec.state === "CONFIRMED") {
    const sendRaw = mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES && rec.debitResponse ? rec.debitResponse : Buffer.alloc(0);
    const delivered = await deliverToMerchant(ctx.merchant(offer.merchantAddress, offer.merchantId!.value), id, rec.resultM!, sendRaw, deadline);
    receipt = delivered.receipt;
    await ctx.journal?.receipt(id, receipt, delivered.accessSecret);
    step("goods released", `${receipt.merchantName} released "${receipt.productName}": ${receipt.goods}`);
  }

  // FIG. 7: the card's proof must still reach the PSAM's batch. It is not on the purchase's path (the goods are
  // ours): during a purchase it goes in the background, and the journal has it sent again until acknowledged.
  if (mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES && debited && !rec.proofReported) {
    const report = reportProof(ctx, rec, deadline);
    if (opts.awaitProof) await report;
    else step("proof", "the card's signature goes to the payment server for the PSAM's batch, after the purchase");
  }
  return receipt!;
}

async function reportProof(ctx: PurchaseContext, rec: PurchaseRecord, deadline: number): Promise<void> {
  try {
    await ctx
      .payment(rec.offer.paymentServerAddress)
      .reportCardSignature({ transactionId: txnId(rec.transactionId), debitResponse: rec.debitResponse! }, { deadline });
    await ctx.journal?.proofReported(rec.transactionId);
  } catch {
    // Left in the journal: the daemon reports it again later.
  }
}

async function completeAtPaymentServer(
  rec: PurchaseRecord,
  ctx: PurchaseContext,
  deadline: number,
  step: (name: string, detail: string) => void,
): Promise<Sealed> {
  const id = rec.transactionId;
  const tsk = Buffer.from(rec.offer.transactionSessionKey);
  const cardAnswer: CardAnswer = {
    cardStatusWord: rec.cardLogProvesNoDebit ? 0 : (rec.cardStatusWord ?? 0),
    debitResponse: rec.cardLogProvesNoDebit ? Buffer.alloc(0) : (rec.debitResponse ?? Buffer.alloc(0)),
    completionToken: rec.completionToken ?? Buffer.alloc(0),
    cardLogProvesNoDebit: rec.cardLogProvesNoDebit === true,
  };
  const sealed = seal(tsk, "CARD_ANSWER", id, CardAnswer.encode(cardAnswer).finish());
  try {
    const r = await retrying(
      () => ctx.payment(rec.offer.paymentServerAddress).completePurchase({ transactionId: txnId(id), cardAnswer: sealed }, { deadline }),
      6,
    );
    const c = open(tsk, "DEBIT_RESULT_C", id, r.debitResultC);
    if (!c || !r.debitResultM)
      throw new NetpurseError(
        Status.PERMISSION_DENIED,
        ErrorReason.ERROR_REASON_SEAL_BROKEN,
        "the debit results from the payment server do not open with this offer's session key",
      );
    const resultC = DebitResultC.decode(c);
    step(
      "confirmation",
      resultC.newBalance?.currency === AUTHENTICATION_CURRENCY
        ? "the PSAM verified the card's signature and answered authentication OK; debit result M, sealed for the site, goes on unopened"
        : `the payment server confirmed the purchase (debit result C: card balance ${formatMoney(resultC.newBalance!)}); debit result M, sealed for the merchant, goes on unopened`,
    );
    return r.debitResultM;
  } catch (e) {
    if (isFinal(e)) await ctx.journal?.failed(id, (e as Error).message);
    passOn(
      e,
      isFinal(e)
        ? "payment server did not confirm the purchase"
        : "the card's answer is recorded and the purchase will be finished later; the payment server said",
    );
  }
}

/** Step 636: the debit result M (and, for MERCHANT_COMPARES, the card's raw answer) to the merchant, for the goods. */
async function deliverToMerchant(
  merchant: MerchantClient,
  transactionId: string,
  resultM: Sealed,
  debitResponse: Buffer,
  deadline: number,
): Promise<{ receipt: Receipt; accessSecret: Uint8Array }> {
  try {
    const r = await retrying(() => merchant.completeOrder({ transactionId: { value: transactionId }, debitResultM: resultM, debitResponse }, { deadline }));
    return { receipt: r.receipt!, accessSecret: r.accessSecret };
  } catch (e) {
    passOn(e, "the merchant did not release the goods");
  }
}
