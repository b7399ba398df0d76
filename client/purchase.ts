// The client module's purchase (FIG. 11A-C): check the card against the
// offer (step 608), package the card's responses into one draw request,
// put the merchant's amount back into the PSAM's DEBIT command (step 618),
// have the card debit itself, complete the purchase and bring the
// confirmation to the merchant for the goods (step 636).

import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ConfirmationMode, ErrorReason, confirmationModeToJSON } from "../gen/netpurse/card/v1/card.js";
import type { MerchantServiceDefinition, PaymentOffer, Receipt } from "../gen/netpurse/merchant/v1/merchant.js";
import type { CompletePurchaseResponse, PaymentServiceDefinition, ProcessDrawRequestResponse } from "../gen/netpurse/payment/v1/payment.js";
import type { PurchaseStep } from "../gen/netpurse/cardholder/v1/cardholder.js";
import { swHex, SW } from "../lib/apdu/apdu.js";
import { invalidField, NetpurseError, passOn, reasonOf } from "../lib/grpc/errors.js";
import { hexOf, requireMerchantId, requireTransactionId } from "../lib/ids.js";
import { formatMoney, MAX_CARD_AMOUNT } from "../lib/money.js";
import { DebitResult, isExpired, PurseStatusByte } from "../lib/protocol/purse.js";
import { withOriginalAmount, type PurseReader } from "./card/purse-reader.js";

export type PaymentClient = Client<typeof PaymentServiceDefinition, DeadlineOptions>;
export type MerchantClient = Client<typeof MerchantServiceDefinition, DeadlineOptions>;

/** Where a purchase stands on the client's side, as its journal records it. */
export type ClientPurchaseState = "STARTED" | "DEBIT_SENT" | "CARD_ANSWERED" | "CONFIRMED" | "RECEIPT" | "FAILED";

/** What the client knows when it hands the DEBIT command to the card: enough to find the debit in the card's log later. */
export interface DebitSent {
  purseId: string;
  cardCounter: number;
  psamId: string;
  psamCounter: number;
  completionToken: Buffer;
}

/** The client's log of each purchase step (the patent's client logs), so a lost answer can be recovered. */
export interface PurchaseJournal {
  started(offer: PaymentOffer): Promise<void>;
  /** Written before the card sees DEBIT: from here on, the card may be debited. */
  debitSent(transactionId: string, d: DebitSent): Promise<void>;
  cardAnswered(transactionId: string, sw: number, debitResponse: Buffer): Promise<void>;
  confirmed(transactionId: string, confirmation: CompletePurchaseResponse): Promise<void>;
  receipt(transactionId: string, receipt: Receipt): Promise<void>;
  failed(transactionId: string, why: string): Promise<void>;
}

export interface PurchaseContext {
  reader: PurseReader;
  payment(address: string): PaymentClient;
  merchant(address: string): MerchantClient;
  journal?: PurchaseJournal;
  /** Per-call deadline towards the payment server and merchant, ms. */
  callDeadlineMs?: number;
  now?: () => Date;
}

export interface PurchaseOutcome {
  receipt: Receipt;
  steps: PurchaseStep[];
  newBalance: number;
}

const failedPrecondition = (reason: ErrorReason, text: string) => new NetpurseError(Status.FAILED_PRECONDITION, reason, text);

/** Checks an offer's fields before anything touches the card. */
export function checkOffer(offer: PaymentOffer | undefined, now: Date): asserts offer is PaymentOffer & { amount: NonNullable<PaymentOffer["amount"]> } {
  if (!offer) throw invalidField("offer", "missing");
  requireTransactionId(offer.transactionId, "offer.transaction_id");
  requireMerchantId(offer.merchantId, "offer.merchant_id");
  const a = offer.amount;
  if (!a) throw invalidField("offer.amount", "missing");
  if (a.amountMinor <= 0n || a.amountMinor > BigInt(MAX_CARD_AMOUNT)) throw invalidField("offer.amount.amount_minor", `must be 1..${MAX_CARD_AMOUNT}`);
  if (!offer.paymentServerAddress) throw invalidField("offer.payment_server_address", "missing");
  if (!offer.merchantAddress) throw invalidField("offer.merchant_address", "missing");
  if (offer.expiresAt && offer.expiresAt.getTime() < now.getTime()) {
    throw failedPrecondition(ErrorReason.ERROR_REASON_OFFER_EXPIRED, `the offer expired at ${offer.expiresAt.toISOString()}; ask the merchant for a new one`);
  }
  if (offer.confirmationMode !== ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES) {
    throw new NetpurseError(Status.UNIMPLEMENTED, ErrorReason.ERROR_REASON_UNSPECIFIED, `this client does not implement ${confirmationModeToJSON(offer.confirmationMode)} yet`);
  }
}

/**
 * Whether a payment server's answer ends the purchase for good. Anything
 * else (timeouts, unavailability, internal errors) leaves it to be finished
 * later: once the card has answered, only the payment server's ruling may
 * close the client's record.
 */
export function isFinal(e: unknown): boolean {
  if (!(e instanceof ClientError || e instanceof NetpurseError)) return false;
  return [Status.FAILED_PRECONDITION, Status.PERMISSION_DENIED, Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS].includes(e.code);
}

/** Retries an idempotent call while the failure is transient. */
async function retrying<T>(call: () => Promise<T>, attempts = 4): Promise<T> {
  let wait = 200;
  for (let i = 1; ; i++) {
    try {
      return await call();
    } catch (e) {
      const transient =
        e instanceof ClientError &&
        (e.code === Status.UNAVAILABLE || e.code === Status.DEADLINE_EXCEEDED || e.code === Status.ABORTED) &&
        reasonOf(e) !== ErrorReason.ERROR_REASON_IN_DOUBT;
      if (!transient || i >= attempts) throw e;
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(wait * 2, 2_000);
    }
  }
}

export async function payOffer(offer: PaymentOffer, ctx: PurchaseContext): Promise<PurchaseOutcome> {
  const now = ctx.now?.() ?? new Date();
  checkOffer(offer, now);
  const steps: PurchaseStep[] = [];
  const step = (name: string, detail: string) => steps.push({ name, detail });
  const id = offer.transactionId!.value;
  const amount = Number(offer.amount.amountMinor);
  const shown = formatMoney(offer.amount);
  const deadline = ctx.callDeadlineMs ?? 15_000;
  step("offer", `${offer.merchantName || offer.merchantId!.value} asks ${shown} for "${offer.description}" (transaction ${id})`);

  // Step 608: the card against the offer, before anything leaves this machine.
  await ctx.reader.connect();
  const init = await ctx.reader.initializeForPurchase();
  const card = init.parsed;
  const cardMoney = (v: number) => formatMoney({ amountMinor: v, currency: card.currency, exponent: card.exponent });
  step("card", `purse ${card.purseId.toString("hex")}: balance ${cardMoney(card.balance)}, counter ${card.counter}, expires ${card.expiry}`);
  if (card.currency !== offer.amount.currency || card.exponent !== offer.amount.exponent) {
    throw failedPrecondition(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, `the card holds ${cardMoney(0).split(" ")[0]}, the offer is in ${shown.split(" ")[0]}; nothing was sent`);
  }
  if (card.status !== PurseStatusByte.ACTIVE) throw failedPrecondition(ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked; nothing was sent");
  if (isExpired(card.expiry, now)) throw failedPrecondition(ErrorReason.ERROR_REASON_CARD_EXPIRED, `the card expired on ${card.expiry}; nothing was sent`);
  if (card.balance < amount) {
    throw failedPrecondition(ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE, `the card holds ${cardMoney(card.balance)}, the offer asks ${shown}; nothing was sent`);
  }
  step("checks", "currency, expiry and balance are good for this offer (step 608)");
  await ctx.journal?.started(offer);

  const payment = ctx.payment(offer.paymentServerAddress);
  let issued: ProcessDrawRequestResponse;
  try {
    issued = await retrying(() =>
      payment.processDrawRequest(
        {
          drawRequest: {
            transactionId: offer.transactionId,
            merchantId: offer.merchantId,
            amount: offer.amount,
            confirmationMode: offer.confirmationMode,
            cardAtr: ctx.reader.answerToReset,
            initializeResponse: init.raw,
          },
        },
        { deadline },
      ),
    );
  } catch (e) {
    await ctx.journal?.failed(id, (e as Error).message);
    passOn(e, "payment server refused the draw request");
  }
  step("draw request", `sent to ${offer.paymentServerAddress}: ATR ${ctx.reader.answerToReset.length} bytes, INITIALIZE response ${init.raw.length} bytes, ${shown}`);
  step("PSAM", `terminal ${issued.terminalId}, PSAM ${hexOf(issued.psamId?.value)} signed the DEBIT command (PSAM counter ${issued.psamCounter})`);

  // Step 618: the merchant's amount, whatever came back.
  const debitCommand = withOriginalAmount(Buffer.from(issued.debitCommand), amount);
  step("debit command", `amount set back to the merchant's ${shown} (step 618) and sent to the card`);
  await ctx.journal?.debitSent(id, {
    purseId: card.purseId.toString("hex"),
    cardCounter: card.counter,
    psamId: hexOf(issued.psamId?.value),
    psamCounter: issued.psamCounter,
    completionToken: Buffer.from(issued.completionToken),
  });
  const answer = await ctx.reader.debit(debitCommand);
  await ctx.journal?.cardAnswered(id, answer.sw, answer.raw);
  if (answer.sw === SW.OK && answer.parsed!.result === DebitResult.DEBITED) {
    step("card debit", `card debited ${shown}: balance ${cardMoney(answer.parsed!.balance)}, counter ${answer.parsed!.counter}, card signature ${answer.parsed!.cardSignature.toString("hex")}`);
  } else {
    step("card debit", answer.sw === SW.OK ? `card declined the debit (result ${answer.parsed!.result})` : `card refused the DEBIT command (SW ${swHex(answer.sw)})`);
  }

  let completed: CompletePurchaseResponse;
  try {
    completed = await retrying(
      () => payment.completePurchase({ transactionId: offer.transactionId, cardStatusWord: answer.sw, debitResponse: answer.raw, completionToken: issued.completionToken }, { deadline }),
      6,
    );
  } catch (e) {
    if (isFinal(e)) await ctx.journal?.failed(id, (e as Error).message);
    passOn(e, isFinal(e) ? "payment server did not confirm the purchase" : "the card's answer is recorded and the purchase will be finished later; the payment server said");
  }
  await ctx.journal?.confirmed(id, completed);
  step("confirmation", `the PSAM verified the card signature and the payment server confirmed the purchase (MAC ${Buffer.from(completed.confirmation!.mac).toString("hex").slice(0, 16)}…)`);

  const receipt = await deliverConfirmation(ctx.merchant(offer.merchantAddress), id, completed, deadline);
  await ctx.journal?.receipt(id, receipt);
  step("goods released", `${receipt.merchantName} released "${receipt.productName}": ${receipt.goods}`);
  return { receipt, steps, newBalance: Number(completed.newBalance?.amountMinor ?? 0n) };
}

/** Step 636: the confirmation to the merchant, for the goods. */
export async function deliverConfirmation(merchant: MerchantClient, transactionId: string, completed: CompletePurchaseResponse, deadline: number): Promise<Receipt> {
  try {
    const r = await retrying(() => merchant.completeOrder({ transactionId: { value: transactionId }, confirmation: completed.confirmation }, { deadline }));
    return r.receipt!;
  } catch (e) {
    passOn(e, "the merchant did not release the goods");
  }
}
