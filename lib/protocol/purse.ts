// The stored-value card's purse application: command codes, byte layouts of
// its commands and responses, and the two purchase signatures. The same
// commands reach the card's points purses and its authentication application
// by currency code (INITIALIZE FOR PURCHASE's optional selector, READ PURSE's
// P1, INITIALIZE FOR LOAD's currency; docs/loyalty.md). The software
// card, the PSAM and the client all build and read these messages from here.
// docs/apdu.md describes the same bytes for people.

import { createHash } from "node:crypto";
import { mac8 } from "../crypto/cmac.js";
import { ascii, bcdDate, bytes, layout, u16, u32, u8, uuid, type Value } from "./layout.js";

/** Application identifier of the purse: proprietary RID F0, "NETPURSE", version 01. */
export const PURSE_AID = Buffer.from("F04E4554505552534501", "hex");
/** Historical bytes of the software card's ATR. */
export const PURSE_ATR_HISTORICAL = Buffer.from("NETPURSE", "ascii");

export const PURSE_CLA = 0x80;
export const PurseIns = {
  INITIALIZE_FOR_LOAD: 0x40,
  LOAD: 0x42,
  INITIALIZE_FOR_PURCHASE: 0x50,
  DEBIT: 0x54,
  READ_PURSE: 0x5c,
  READ_LOG: 0x5e,
} as const;

/** Algorithm byte of a card using AES-128 keys and 8-byte AES-CMAC signatures. */
export const ALGORITHM_AES128_CMAC = 0x01;
/** Format byte of the layouts below. */
export const PURSE_FORMAT = 0x01;

export const PurseStatusByte = { ACTIVE: 0x00, BLOCKED: 0x01 } as const;

/** The card's result code in its DEBIT response. Anything but DEBITED means the purse is unchanged. */
export const DebitResult = {
  DEBITED: 0x00,
  INSUFFICIENT_BALANCE: 0x01,
  CURRENCY_MISMATCH: 0x02,
  EXPIRED: 0x03,
  BLOCKED: 0x04,
} as const;

/** Kind of a card log record: a money purchase or load, an authentication (currency 999, amount 0), a points redemption or credit (currency = programme code). */
export const LogKind = { PURCHASE: 0x01, LOAD: 0x02, AUTHENTICATION: 0x03, POINTS_REDEMPTION: 0x04, POINTS_CREDIT: 0x05 } as const;

/**
 * Data of INITIALIZE FOR PURCHASE: empty (Lc 0, the money purse) or a 2-byte
 * currency selector (Lc 2): the money currency, 999 for the authentication
 * application, or a programme code for that points purse.
 */
export const PurchaseSelector = layout("INITIALIZE FOR PURCHASE selector", { currency: u16 });

/** The card's identity and state, and a fresh challenge: what its INITIALIZE FOR PURCHASE answers, and what the cryptogram covers. */
const cardStateFields = {
  format: u8,
  providerId: bytes(4),
  purseId: bytes(8),
  currency: u16,
  exponent: u8,
  balance: u32,
  expiry: bcdDate,
  counter: u32,
  keyVersion: u8,
  algorithm: u8,
  status: u8,
  challenge: bytes(8),
};

/**
 * Response data of INITIALIZE FOR PURCHASE: the card's identity and state, a
 * fresh challenge, and the card's cryptogram over all of it (see
 * purchaseCryptogram): what proves to the PSAM that a genuine card answered.
 */
export const InitializeForPurchaseResponse = layout("INITIALIZE FOR PURCHASE response", {
  ...cardStateFields,
  cryptogram: bytes(8),
});
export type InitializeForPurchase = Value<typeof InitializeForPurchaseResponse.fields>;

/** Response data of READ PURSE: the purse state, without a session. */
export const ReadPurseResponse = layout("READ PURSE response", {
  format: u8,
  providerId: bytes(4),
  purseId: bytes(8),
  currency: u16,
  exponent: u8,
  balance: u32,
  maxBalance: u32,
  expiry: bcdDate,
  counter: u32,
  keyVersion: u8,
  status: u8,
});
export type PurseData = Value<typeof ReadPurseResponse.fields>;

/** Data of the DEBIT command, as the PSAM builds it. */
export const DebitCommand = layout("DEBIT command", {
  amount: u32,
  currency: u16,
  psamId: bytes(4),
  psamCounter: u32,
  dateTime: u32,
  transactionRef: uuid,
  psamSignature: bytes(8),
});
export type Debit = Value<typeof DebitCommand.fields>;

/** Response data of DEBIT. */
export const DebitResponse = layout("DEBIT response", {
  result: u8,
  counter: u32,
  balance: u32,
  cardSignature: bytes(8),
});
export type DebitAnswer = Value<typeof DebitResponse.fields>;

/** One record of the card's log (READ LOG). */
export const LogRecord = layout("log record", {
  kind: u8,
  counter: u32,
  amount: u32,
  currency: u16,
  balance: u32,
  moduleId: bytes(4),
  moduleCounter: u32,
  dateTime: u32,
  transactionRef: uuid,
  cardSignature: bytes(8),
});
export type CardLogRecord = Value<typeof LogRecord.fields>;

/** What the PSAM signature covers: the command and the card session it was made for. */
const PsamSignatureInput = layout("PSAM signature input", {
  tag: ascii(1),
  purseId: bytes(8),
  cardCounter: u32,
  challenge: bytes(8),
  amount: u32,
  currency: u16,
  psamId: bytes(4),
  psamCounter: u32,
  dateTime: u32,
  transactionRef: uuid,
});

/** What the card signature covers: its result and new state, bound to the command and the session. */
const CardSignatureInput = layout("card signature input", {
  tag: ascii(1),
  purseId: bytes(8),
  challenge: bytes(8),
  result: u8,
  counter: u32,
  balance: u32,
  amount: u32,
  currency: u16,
  psamId: bytes(4),
  psamCounter: u32,
  transactionRef: uuid,
});

/** What the card's cryptogram in its INITIALIZE FOR PURCHASE response covers: the tag, then every field of the response before it. */
export const PurchaseCryptogramInput = layout("INITIALIZE FOR PURCHASE cryptogram input", {
  tag: ascii(1),
  ...cardStateFields,
});

/** Tag of the card's INITIALIZE FOR PURCHASE cryptogram, distinct from every other MAC's (docs/protocol.md, "Keys"). */
export const PURCHASE_CRYPTOGRAM_TAG = "P";

/**
 * The card's cryptogram in its INITIALIZE FOR PURCHASE response (8 bytes):
 * AES-CMAC under its purchase key K_card (diversified from the issuer's
 * purchase master key of its key version by its purse id) over the tag "P"
 * and every field before it, the fresh challenge included. Only the card and
 * a PSAM holding the issuer's master key can make it: a response made up
 * without a card, or a genuine one with any field changed, does not verify.
 */
export function purchaseCryptogram(cardPurchaseKey: Uint8Array, r: Omit<InitializeForPurchase, "cryptogram">): Buffer {
  return mac8(
    cardPurchaseKey,
    PurchaseCryptogramInput.encode({
      tag: PURCHASE_CRYPTOGRAM_TAG,
      format: r.format,
      providerId: r.providerId,
      purseId: r.purseId,
      currency: r.currency,
      exponent: r.exponent,
      balance: r.balance,
      expiry: r.expiry,
      counter: r.counter,
      keyVersion: r.keyVersion,
      algorithm: r.algorithm,
      status: r.status,
      challenge: r.challenge,
    }),
  );
}

export interface CardSession {
  purseId: Buffer;
  cardCounter: number;
  challenge: Buffer;
}

/** The PSAM signature of a DEBIT command (8 bytes). */
export function psamSignature(sessionKey: Uint8Array, session: CardSession, d: Omit<Debit, "psamSignature">): Buffer {
  return mac8(
    sessionKey,
    PsamSignatureInput.encode({
      tag: "D",
      purseId: session.purseId,
      cardCounter: session.cardCounter,
      challenge: session.challenge,
      amount: d.amount,
      currency: d.currency,
      psamId: d.psamId,
      psamCounter: d.psamCounter,
      dateTime: d.dateTime,
      transactionRef: d.transactionRef,
    }),
  );
}

/** The card signature of a DEBIT response (8 bytes). */
export function cardSignature(sessionKey: Uint8Array, session: CardSession, d: Omit<Debit, "psamSignature">, r: Omit<DebitAnswer, "cardSignature">): Buffer {
  return mac8(
    sessionKey,
    CardSignatureInput.encode({
      tag: "C",
      purseId: session.purseId,
      challenge: session.challenge,
      result: r.result,
      counter: r.counter,
      balance: r.balance,
      amount: d.amount,
      currency: d.currency,
      psamId: d.psamId,
      psamCounter: d.psamCounter,
      transactionRef: d.transactionRef,
    }),
  );
}

/** Whether a card date "YYYY-MM-DD" is past on the given day (a card is valid through its expiry day). */
export function isExpired(expiry: string, now: Date): boolean {
  return now.toISOString().slice(0, 10) > expiry;
}

/**
 * What a comparator outside the payment operator (the client's trusted agent,
 * the merchant) is given instead of the card signature the PSAM expects: a
 * digest it can check the card's signature against, but from which the
 * signature cannot be read back. Knowing the signature would let anyone
 * report it as the card's proof without a card.
 */
export function cardProofDigest(transactionId: string, cardSignature: Uint8Array): Buffer {
  return createHash("sha256").update("netpurse/1 card proof\0").update(transactionId).update("\0").update(cardSignature).digest().subarray(0, 16);
}
