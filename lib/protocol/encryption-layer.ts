// The encryption layer (docs/protocol.md, FIG. 9 and 15A-B). The merchant and the
// payment operator share a key per merchant; for each transaction a key is
// derived from it, a random transaction session key (TSK) is made and sealed,
// with the terms of the offer it is for, under the derived key (ETSK).
// Client and payment server seal their messages under the TSK; the payment
// server seals "debit result M" under the derived key, which only the
// merchant's validation service can open.
// Every seal is AES-256-GCM with the transaction id and the message type as
// associated data.

import { BoundedMap } from "../bounded-map.js";
import { freshBytes } from "../crypto/random.js";
import { SessionKeyGrant, type Money, type Sealed } from "../../gen/netpurse/card/v1/card.js";
import { hkdf32, openAesGcm, sealAesGcm } from "../crypto/aead.js";
import { ascii, layout, uuid } from "./layout.js";

/** The kinds of sealed message; each opens only as its own kind. */
export type MessageType =
  | "SESSION_KEY"
  | "DRAW_REQUEST"
  | "DEBIT_COMMAND"
  | "CARD_ANSWER"
  | "DEBIT_RESULT_C"
  | "DEBIT_RESULT_M"
  // Loads: the bank's authorisation for the load server, and the load server's confirmation for the bank.
  | "LOAD_AUTHORIZATION"
  | "LOAD_CONFIRMATION";

/** HKDF labels: a merchant's purchase keys and a bank's load keys never coincide, even under one shared key. */
const KeyLabel = { PURCHASE: "netpurse/1 K_txn", LOAD: "netpurse/1 Kload" } as const;

const DerivationInfo = layout("transaction key derivation info", {
  label: ascii(16),
  partyId: ascii(16),
  transactionId: uuid,
});

/**
 * The key derived for one transaction: HKDF-SHA-256(shared key, salt = nonce,
 * info = label ‖ party id ‖ transaction id), the party being the merchant
 * (purchases) or the bank (loads).
 */
/** The HKDF info of a transaction key: its label, the party and the transaction. */
export const transactionKeyInfo = (partyId: string, transactionId: string, label: string = KeyLabel.PURCHASE) =>
  DerivationInfo.encode({ label, partyId, transactionId });

/** Transaction keys derived lately: a purchase asks for its key at each of its steps, in two services. */
const derivedKeys = new BoundedMap<string, Buffer>(4_096);

export function transactionKey(sharedKey: Uint8Array, partyId: string, transactionId: string, nonce: Uint8Array, label: string = KeyLabel.PURCHASE): Buffer {
  if (nonce.length !== 16) throw new RangeError("the key nonce must be 16 bytes");
  // Everything the derivation reads is in the entry's name, so a hit is the same derivation; the oldest entry makes room.
  const name = `${label}\0${partyId}\0${transactionId}\0${Buffer.from(nonce).toString("hex")}\0${Buffer.from(sharedKey).toString("hex")}`;
  const kept = derivedKeys.get(name);
  if (kept) return Buffer.from(kept);
  const key = hkdf32(sharedKey, nonce, transactionKeyInfo(partyId, transactionId, label));
  derivedKeys.set(name, Buffer.from(key));
  return key;
}

function associatedData(type: MessageType, transactionId: string): Buffer {
  return Buffer.concat([Buffer.from("netpurse/1\0", "ascii"), Buffer.from(`${type}\0`, "ascii"), encodeUuid(transactionId)]);
}

function encodeUuid(id: string): Buffer {
  const b = Buffer.alloc(16);
  uuid.write(id, b, 0);
  return b;
}

export function seal(key: Uint8Array, type: MessageType, transactionId: string, plaintext: Uint8Array): Sealed {
  return sealAesGcm(key, plaintext, associatedData(type, transactionId));
}

/** The plaintext, or undefined when the seal is broken (wrong key, transaction or type, or altered). */
export function open(key: Uint8Array, type: MessageType, transactionId: string, sealed: Sealed | undefined): Buffer | undefined {
  if (!sealed) return undefined;
  return openAesGcm(key, sealed.iv, sealed.ciphertext, associatedData(type, transactionId));
}

/** The terms of the offer a transaction session key is granted for, sealed with it into the ETSK. */
export interface OfferTerms {
  amount: Money;
  expiresAt: Date;
}

/**
 * What the merchant puts into an offer: the nonce, the TSK for the client,
 * and the ETSK for the payment server: the TSK with the offer's merchant,
 * amount and expiry (a SessionKeyGrant), sealed under the derived key, so the
 * payment server can refuse a draw request of other terms.
 */
export function issueTransactionKeys(sharedKey: Uint8Array, merchantId: string, transactionId: string, terms: OfferTerms) {
  const keyNonce = freshBytes(16);
  const tsk = freshBytes(32);
  const derived = transactionKey(sharedKey, merchantId, transactionId, keyNonce);
  const grant: SessionKeyGrant = { transactionSessionKey: tsk, merchantId: { value: merchantId }, amount: terms.amount, expiresAt: terms.expiresAt };
  return { keyNonce, tsk, etsk: seal(derived, "SESSION_KEY", transactionId, SessionKeyGrant.encode(grant).finish()) };
}

/** A load's transaction key, from the key the bank shares with the load server: seals the bank's authorisation and the load server's confirmation. */
export function loadTransactionKey(sharedKey: Uint8Array, bankId: string, transactionId: string, nonce: Uint8Array): Buffer {
  return transactionKey(sharedKey, bankId, transactionId, nonce, KeyLabel.LOAD);
}
