// Loading the purse (FIG. 17, 18A-D): the byte layouts of INITIALIZE FOR
// LOAD and LOAD, and the three load signatures. S1 is the card's, under its
// diversified load key; S2 (the host security module's) and S3 (the card's
// answer) are under the load session key. The software card, the host
// security module and the client build and read these messages from here;
// docs/apdu.md describes the same bytes for people.

import { macEqual } from "../crypto/aes.js";
import { mac8 } from "../crypto/cmac.js";
import { deriveSessionKey, diversifyCardKey } from "../crypto/keys.js";
import { ascii, bcdDate, bytes, layout, u16, u32, u8, uuid, type Value } from "./layout.js";

/** Data of INITIALIZE FOR LOAD: what the bank authorised, as the client hands it to the card. */
export const InitializeForLoadCommand = layout("INITIALIZE FOR LOAD command", {
  amount: u32,
  currency: u16,
  bankId: ascii(16),
  /** The bank's time stamp of the load offer, seconds since the epoch. */
  dateTime: u32,
  transactionRef: uuid,
});
export type LoadInitCommand = Value<typeof InitializeForLoadCommand.fields>;

/** Response data of INITIALIZE FOR LOAD: the purse state, a fresh challenge, and S1 over both the command and all of this. */
export const InitializeForLoadResponse = layout("INITIALIZE FOR LOAD response", {
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
  algorithm: u8,
  status: u8,
  challenge: bytes(8),
  s1: bytes(8),
});
export type LoadInit = Value<typeof InitializeForLoadResponse.fields>;

/** Data of the LOAD command, as the host security module builds it. */
export const LoadCommand = layout("LOAD command", {
  amount: u32,
  currency: u16,
  hsmId: bytes(4),
  hsmCounter: u32,
  dateTime: u32,
  transactionRef: uuid,
  s2: bytes(8),
});
export type Load = Value<typeof LoadCommand.fields>;

/** Response data of LOAD: the card's result code, its state after, and S3. */
export const LoadResponse = layout("LOAD response", {
  result: u8,
  counter: u32,
  balance: u32,
  s3: bytes(8),
});
export type LoadAnswer = Value<typeof LoadResponse.fields>;

/** The card's result code in its LOAD response. Anything but LOADED is a "negative result": the purse says it is unchanged. */
export const LoadResult = {
  LOADED: 0x00,
  MAX_BALANCE_EXCEEDED: 0x01,
  CURRENCY_MISMATCH: 0x02,
  EXPIRED: 0x03,
  BLOCKED: 0x04,
} as const;

/** What S1 covers: the tag, the command as the card received it, and the response before S1. */
const S1Input = layout("S1 input", {
  tag: ascii(1),
  command: bytes(InitializeForLoadCommand.size),
  response: bytes(InitializeForLoadResponse.size - 8),
});

/**
 * S1: the card's signature over the load it was asked for and its own state
 * and challenge, under its diversified load key (no security module has
 * spoken yet, so there is no session key).
 */
export function loadS1(cardLoadKey: Uint8Array, command: LoadInitCommand, response: Omit<LoadInit, "s1">): Buffer {
  return mac8(cardLoadKey, s1Message(command, response));
}

/** The bytes S1 is the MAC of (a PKCS#11 token MACs them with CKM_AES_CMAC). */
export function s1Message(command: LoadInitCommand, response: Omit<LoadInit, "s1">): Buffer {
  const r = InitializeForLoadResponse.encode({ ...response, s1: Buffer.alloc(8) });
  return S1Input.encode({ tag: "1", command: InitializeForLoadCommand.encode(command), response: r.subarray(0, r.length - 8) });
}

const S2Input = layout("S2 input", {
  tag: ascii(1),
  purseId: bytes(8),
  cardCounter: u32,
  challenge: bytes(8),
  s1: bytes(8),
  amount: u32,
  currency: u16,
  hsmId: bytes(4),
  hsmCounter: u32,
  dateTime: u32,
  transactionRef: uuid,
});

/** S2: the security module's signature of the LOAD command, binding S1 and the authorised amount, under the load session key. */
export function loadS2(sessionKey: Uint8Array, init: LoadInit, l: Omit<Load, "s2">): Buffer {
  return mac8(sessionKey, s2Message(init, l));
}

/** The bytes S2 is the MAC of. */
export function s2Message(init: LoadInit, l: Omit<Load, "s2">): Buffer {
  return S2Input.encode({
    tag: "2",
    purseId: init.purseId,
    cardCounter: init.counter,
    challenge: init.challenge,
    s1: init.s1,
    amount: l.amount,
    currency: l.currency,
    hsmId: l.hsmId,
    hsmCounter: l.hsmCounter,
    dateTime: l.dateTime,
    transactionRef: l.transactionRef,
  });
}

const S3Input = layout("S3 input", {
  tag: ascii(1),
  purseId: bytes(8),
  challenge: bytes(8),
  result: u8,
  counter: u32,
  balance: u32,
  amount: u32,
  currency: u16,
  hsmId: bytes(4),
  hsmCounter: u32,
  transactionRef: uuid,
});

/** S3: the card's signature of its LOAD result and new state, bound to the command and the session. */
export function loadS3(sessionKey: Uint8Array, session: { purseId: Buffer; challenge: Buffer }, l: Omit<Load, "s2">, r: Omit<LoadAnswer, "s3">): Buffer {
  return mac8(sessionKey, s3Message(session, l, r));
}

/** The bytes S3 is the MAC of. */
export function s3Message(session: { purseId: Buffer; challenge: Buffer }, l: Omit<Load, "s2">, r: Omit<LoadAnswer, "s3">): Buffer {
  return S3Input.encode({
    tag: "3",
    purseId: session.purseId,
    challenge: session.challenge,
    result: r.result,
    counter: r.counter,
    balance: r.balance,
    amount: l.amount,
    currency: l.currency,
    hsmId: l.hsmId,
    hsmCounter: l.hsmCounter,
    transactionRef: l.transactionRef,
  });
}

/**
 * Whether an S3 is the card's own answer to this LOAD command: the session
 * key derived from the card's load key (one AES block under the load master
 * key of its key version) and the session both sides know, then S3 compared
 * in constant time. The load server's security module and clearing's check
 * it alike.
 */
export function s3Verifies(loadMasterKey: Uint8Array, init: LoadInit, command: Omit<Load, "s2">, answer: LoadAnswer): boolean {
  const sessionKey = deriveSessionKey(diversifyCardKey(loadMasterKey, init.purseId), {
    cardCounter: init.counter,
    securityModuleId: command.hsmId,
    securityModuleCounter: command.hsmCounter,
    challenge: init.challenge,
  });
  return macEqual(loadS3(sessionKey, init, command, answer), answer.s3);
}
