// A cardholder's client without the daemon, for tests that must misbehave
// (lie about the card, alter the DEBIT command, replay, tamper with sealed
// messages): a software card through the real APDU transport, and helpers
// that build and seal the messages as the client module does.

import { ClientError } from "nice-grpc";
import { randomBytes } from "node:crypto";
import { readState } from "../../lib/apdu/state-log.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { reasonName, reasonOf } from "../../lib/grpc/errors.js";
import { open, seal } from "../../lib/protocol/encryption-layer.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import {
  ALGORITHM_AES128_CMAC,
  InitializeForPurchaseResponse,
  PURSE_FORMAT,
  PurseStatusByte,
  purchaseCryptogram,
  type InitializeForPurchase,
} from "../../lib/protocol/purse.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { Sealed } from "../../gen/netpurse/card/v1/card.js";
import {
  CardAnswer,
  DebitResultC,
  DrawRequest,
  IssuedDebitCommand,
  type CompletePurchaseRequest,
  type CompletePurchaseResponse,
  type ProcessDrawRequestRequest,
  type ProcessDrawRequestResponse,
} from "../../gen/netpurse/payment/v1/payment.js";

export async function openCard(path: string): Promise<PurseReader> {
  const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(path)));
  await reader.connect();
  return reader;
}

/** Initializes the card for a purchase and packages its answers with the offer, as the client module does (in clear). */
export async function plainDrawRequest(reader: PurseReader, offer: PaymentOffer, patchInit?: (raw: Buffer) => Buffer): Promise<DrawRequest> {
  const init = await reader.initializeForPurchase();
  return {
    transactionId: offer.transactionId,
    merchantId: offer.merchantId,
    amount: offer.amount,
    confirmationMode: offer.confirmationMode,
    cardAtr: reader.answerToReset,
    initializeResponse: patchInit ? patchInit(init.raw) : init.raw,
    cardLog: [],
  };
}

/** The purchase key a software card holds (from its file): only the card knows it, and a PSAM derives it from the issuer's master key. */
export async function cardPurchaseKey(cardPath: string): Promise<Buffer> {
  const file = await readState<CardFile>(cardPath);
  return Buffer.from(file.keys.purchase, "hex");
}

/**
 * A card's INITIALIZE FOR PURCHASE response with fields changed and its
 * cryptogram made again under the card's own purchase key: what only someone
 * holding the card's key could send. Tests use it to reach the checks that
 * come after the cryptogram (the PSAM's amount checks, the card's own).
 */
export function resignedInit(cardKey: Uint8Array, raw: Buffer, change: Partial<Omit<InitializeForPurchase, "cryptogram">>): Buffer {
  const fields = { ...InitializeForPurchaseResponse.decode(raw), ...change };
  return InitializeForPurchaseResponse.encode({ ...fields, cryptogram: purchaseCryptogram(cardKey, fields) });
}

/** A genuine INITIALIZE FOR PURCHASE response with fields changed and its cryptogram left as the card made it. */
export function alteredInit(raw: Buffer, change: Partial<Omit<InitializeForPurchase, "cryptogram">>): Buffer {
  return InitializeForPurchaseResponse.encode({ ...InitializeForPurchaseResponse.decode(raw), ...change });
}

/**
 * An INITIALIZE FOR PURCHASE response made up without any card: a random
 * purse id, a plausible state (EUR, a high balance, a far expiry, key
 * version 1) and a random cryptogram.
 */
export function madeUpInit(change: Partial<InitializeForPurchase> = {}): Buffer {
  return InitializeForPurchaseResponse.encode({
    format: PURSE_FORMAT,
    providerId: Buffer.from("4e500001", "hex"),
    purseId: randomBytes(8),
    currency: 978,
    exponent: 2,
    balance: 1_000_000,
    expiry: "2099-12-31",
    counter: 0,
    keyVersion: 1,
    algorithm: ALGORITHM_AES128_CMAC,
    status: PurseStatusByte.ACTIVE,
    challenge: randomBytes(8),
    cryptogram: randomBytes(8),
    ...change,
  });
}

/** A draw request for the offer built around a given INITIALIZE FOR PURCHASE response (made up, altered or replayed), in clear. */
export function drawRequestWith(offer: PaymentOffer, initializeResponse: Buffer, cardAtr: Buffer = SoftwareCard.ATR): DrawRequest {
  return {
    transactionId: offer.transactionId,
    merchantId: offer.merchantId,
    amount: offer.amount,
    confirmationMode: offer.confirmationMode,
    cardAtr,
    initializeResponse,
    cardLog: [],
  };
}

const tskOf = (offer: PaymentOffer) => Buffer.from(offer.transactionSessionKey);
const idOf = (offer: PaymentOffer) => offer.transactionId!.value;

/** Seals a draw request under the offer's TSK, with the offer's nonce and ETSK. */
export function sealDrawRequest(offer: PaymentOffer, dr: DrawRequest): ProcessDrawRequestRequest {
  return {
    transactionId: offer.transactionId,
    merchantId: offer.merchantId,
    keyNonce: offer.keyNonce,
    encryptedSessionKey: offer.encryptedSessionKey,
    drawRequest: seal(tskOf(offer), "DRAW_REQUEST", idOf(offer), DrawRequest.encode(dr).finish()),
  };
}

/** The sealed ProcessDrawRequest request for this card and offer. */
export async function drawRequestFor(reader: PurseReader, offer: PaymentOffer, patchInit?: (raw: Buffer) => Buffer): Promise<ProcessDrawRequestRequest> {
  return sealDrawRequest(offer, await plainDrawRequest(reader, offer, patchInit));
}

/** Opens the DEBIT command the payment server sealed for this offer's client. */
export function openIssued(offer: PaymentOffer, r: ProcessDrawRequestResponse): IssuedDebitCommand {
  const plain = open(tskOf(offer), "DEBIT_COMMAND", idOf(offer), r.debitCommand);
  if (!plain) throw new Error("the DEBIT command does not open with the offer's TSK");
  return IssuedDebitCommand.decode(plain);
}

/** The sealed CompletePurchase request carrying the card's answer. */
export function completeRequest(offer: PaymentOffer, a: { sw: number; raw: Buffer; token: Uint8Array; logProvesNoDebit?: boolean }): CompletePurchaseRequest {
  const answer: CardAnswer = {
    cardStatusWord: a.sw,
    debitResponse: a.raw,
    completionToken: Buffer.from(a.token),
    cardLogProvesNoDebit: a.logProvesNoDebit ?? false,
  };
  return { transactionId: offer.transactionId, cardAnswer: seal(tskOf(offer), "CARD_ANSWER", idOf(offer), CardAnswer.encode(answer).finish()) };
}

export function openResultC(offer: PaymentOffer, r: CompletePurchaseResponse): DebitResultC {
  const plain = open(tskOf(offer), "DEBIT_RESULT_C", idOf(offer), r.debitResultC);
  if (!plain) throw new Error("debit result C does not open with the offer's TSK");
  return DebitResultC.decode(plain);
}

/** A copy of a sealed message with one bit flipped (in the nonce, the ciphertext or the tag). */
export function flipBit(s: Sealed, where: "iv" | "ciphertext" | "tag"): Sealed {
  const iv = Buffer.from(s.iv);
  const ct = Buffer.from(s.ciphertext);
  if (where === "iv") iv[0]! ^= 0x01;
  else if (where === "ciphertext") ct[0]! ^= 0x01;
  else ct[ct.length - 1]! ^= 0x80;
  return { iv, ciphertext: ct };
}

/** The gRPC code name, reason and message of a failed call (for assertions). */
export async function failure(p: Promise<unknown>): Promise<{ code: string; reason: string; details: string }> {
  try {
    await p;
  } catch (e) {
    if (e instanceof ClientError) {
      const r = reasonOf(e);
      const { Status } = await import("nice-grpc");
      return { code: Status[e.code], reason: r === undefined ? "" : reasonName(r).replace("ERROR_REASON_", ""), details: e.details };
    }
    throw e;
  }
  throw new Error("the call succeeded; a failure was expected");
}
