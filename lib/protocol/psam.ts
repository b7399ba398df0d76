// The PSAM application: command codes and byte layouts. The terminal host
// drives a PSAM with these commands, replaying the card's responses from the
// draw request one by one (step 688). docs/apdu.md describes the same bytes.

import { aesEncryptBlock } from "../crypto/aes.js";
import { mac8 } from "../crypto/cmac.js";
import { diversificationBlock } from "../crypto/keys.js";
import { ascii, bytes, layout, u16, u32, u64, u8, uuid, type Value } from "./layout.js";
import { DebitCommand } from "./purse.js";

/** Application identifier of the PSAM: proprietary RID F0, "NPSAM", version 01. */
export const PSAM_AID = Buffer.from("F04E5053414D01", "hex");
export const PSAM_ATR_HISTORICAL = Buffer.from("NPSAM", "ascii");

export const PSAM_CLA = 0x80;
export const PsamIns = {
  CARD_RESET: 0x20,
  INITIALIZE: 0x22,
  DRAW_AMOUNT: 0x24,
  VERIFY_DEBIT: 0x26,
  REVERSE_DEBIT: 0x28,
  READ_STATUS: 0x2a,
  READ_PENDING: 0x2c,
  READ_BATCH_RECORD: 0x2e,
  CLOSE_BATCH: 0x30,
  READ_KEY_VERSIONS: 0x32,
} as const;

/** P1 bit of DRAW AMOUNT asking for the expected card signature too (modes of FIG. 6-8). */
export const DRAW_P1_RETURN_EXPECTED_SIGNATURE = 0x01;

/** Data of DRAW AMOUNT: what the merchant's offer adds to the card's responses. */
export const DrawAmountCommand = layout("DRAW AMOUNT command", {
  amount: u32,
  currency: u16,
  transactionRef: uuid,
  merchantId: ascii(16),
});
export type DrawAmount = Value<typeof DrawAmountCommand.fields>;

/** Response of DRAW AMOUNT with P1 = 00: the card's DEBIT command and the PSAM's MAC over it (see IssuedMacInput). */
export const DrawAmountResponse = layout("DRAW AMOUNT response", {
  debitCommand: bytes(DebitCommand.size),
  issuedMac: bytes(8),
});

/** Response of DRAW AMOUNT with P1 = 01: the expected card signature too, inside the MAC. */
export const DrawAmountResponseWithSignature = layout("DRAW AMOUNT response with the expected signature", {
  debitCommand: bytes(DebitCommand.size),
  expectedCardSignature: bytes(8),
  issuedMac: bytes(8),
});

/** Data of VERIFY DEBIT: which pending debit, and the card's DEBIT response to it. */
export const VerifyDebitCommand = layout("VERIFY DEBIT command", {
  psamCounter: u32,
  debitResponse: bytes(17),
});

/** The PSAM's verdict on the card's DEBIT answer: recorded in the batch, declined by the card, or an authentication (currency 999) proven, which no batch records. */
export const Verdict = { RECORDED: 0x00, DECLINED_BY_CARD: 0x01, AUTHENTICATED: 0x02 } as const;

/** Response of VERIFY DEBIT: the verdict, and the PSAM's MAC over it (see VerdictMacInput). */
export const VerifyDebitResponse = layout("VERIFY DEBIT response", {
  verdict: u8,
  batchNumber: u32,
  recordMac: bytes(8),
  verdictMac: bytes(8),
});

/** Data of REVERSE DEBIT. */
export const ReverseDebitCommand = layout("REVERSE DEBIT command", { psamCounter: u32 });

/** Response of REVERSE DEBIT: the PSAM's MAC saying the debit is cancelled (see ReversalMacInput). */
export const ReverseDebitResponse = layout("REVERSE DEBIT response", { reversalMac: bytes(8) });

/** Response of READ STATUS. */
export const PsamStatusResponse = layout("READ STATUS response", {
  psamId: bytes(4),
  psamCounter: u32,
  batchNumber: u32,
  batchCount: u32,
  batchTotal: u64,
  pendingCount: u16,
  currency: u16,
});
export type PsamStatus = Value<typeof PsamStatusResponse.fields>;

/** One pending debit (READ PENDING, P1 = index from 0). */
export const PendingDebitRecord = layout("pending debit", {
  psamCounter: u32,
  amount: u32,
  currency: u16,
  transactionRef: uuid,
});

/**
 * One transaction of the current batch (READ BATCH RECORD, P1P2 = index from
 * 0): with the card's session (key version, counter, challenge) and its
 * answer (counter and balance after, signature), so that clearing can check
 * the card's signature itself.
 */
export const BatchRecord = layout("batch record", {
  psamCounter: u32,
  purseId: bytes(8),
  keyVersion: u8,
  sessionCounter: u32,
  challenge: bytes(8),
  cardCounter: u32,
  balanceAfter: u32,
  amount: u32,
  currency: u16,
  dateTime: u32,
  transactionRef: uuid,
  merchantId: ascii(16),
  cardSignature: bytes(8),
  recordMac: bytes(8),
});
export type PsamBatchRecord = Value<typeof BatchRecord.fields>;

/** Response of CLOSE BATCH: the closed batch's summary and its MAC. */
export const CloseBatchResponse = layout("CLOSE BATCH response", {
  psamId: bytes(4),
  batchNumber: u32,
  count: u32,
  total: u64,
  currency: u16,
  batchMac: bytes(8),
});

const BatchRecordMacInput = layout("batch record MAC input", {
  tag: ascii(1),
  psamId: bytes(4),
  batchNumber: u32,
  psamCounter: u32,
  purseId: bytes(8),
  keyVersion: u8,
  sessionCounter: u32,
  challenge: bytes(8),
  cardCounter: u32,
  balanceAfter: u32,
  amount: u32,
  currency: u16,
  dateTime: u32,
  transactionRef: uuid,
  merchantId: ascii(16),
  cardSignature: bytes(8),
});

/** The PSAM's MAC over one batch record, under its batch key: what clearing checks. */
export function batchRecordMac(batchKey: Uint8Array, psamId: Buffer, batchNumber: number, r: Omit<PsamBatchRecord, "recordMac">): Buffer {
  return mac8(batchKey, BatchRecordMacInput.encode({ tag: "R", psamId, batchNumber, ...r }));
}

const BatchMacInput = layout("batch MAC input", {
  tag: ascii(1),
  psamId: bytes(4),
  batchNumber: u32,
  count: u32,
  total: u64,
  currency: u16,
});

/** The PSAM's MAC over a closed batch's count and total. */
export function batchMac(batchKey: Uint8Array, b: { psamId: Buffer; batchNumber: number; count: number; total: number; currency: number }): Buffer {
  return mac8(batchKey, BatchMacInput.encode({ tag: "B", ...b }));
}

/**
 * A PSAM's own key diversified from a master key by its id, as one AES block:
 * AES-ECB(master, D(PSAM id || "PSAM")). The batch key (under the acquirer's
 * batch master key) and the verdict key (under the issuer's verdict master
 * key, which the payment operator's security module holds) are made so.
 */
export function diversifyPsamKey(masterKey: Uint8Array, psamId: Uint8Array): Buffer {
  if (psamId.length !== 4) throw new RangeError(`a PSAM id is 4 bytes, got ${psamId.length}`);
  return aesEncryptBlock(masterKey, diversificationBlock(Buffer.concat([psamId, Buffer.from("PSAM", "ascii")])));
}

// The PSAM's verdicts: what the payment server acts on, each MACed under the
// PSAM's verdict key, so that a terminal host or concentrator in between
// cannot make one up (docs/protocol.md, "PSAM verdicts"). Each input starts
// with its own tag: no MAC stands for another.

/** Tags of the verdict MAC inputs. */
export const VerdictTag = { ISSUED: "I", VERDICT: "V", REVERSED: "X" } as const;

/** What the PSAM's MAC over DRAW AMOUNT's answer binds: the DEBIT command, the card session it was made for, and the expected card signature. */
export const IssuedMacInput = layout("DEBIT command issued MAC input", {
  tag: ascii(1),
  psamId: bytes(4),
  psamCounter: u32,
  transactionRef: uuid,
  amount: u32,
  currency: u16,
  exponent: u8,
  purseId: bytes(8),
  cardCounter: u32,
  dateTime: u32,
  psamSignature: bytes(8),
  expectedCardSignature: bytes(8),
});
export type IssuedMacFields = Omit<Value<typeof IssuedMacInput.fields>, "tag">;

/** What the PSAM's MAC over VERIFY DEBIT's answer binds: which debit, the verdict, the card's answer it rules on, the batch. */
export const VerdictMacInput = layout("VERIFY DEBIT verdict MAC input", {
  tag: ascii(1),
  psamId: bytes(4),
  psamCounter: u32,
  transactionRef: uuid,
  amount: u32,
  currency: u16,
  verdict: u8,
  cardResult: u8,
  batchNumber: u32,
  cardSignature: bytes(8),
});
export type VerdictMacFields = Omit<Value<typeof VerdictMacInput.fields>, "tag">;

/** What the PSAM's MAC over REVERSE DEBIT's answer binds: which debit is cancelled. */
export const ReversalMacInput = layout("REVERSE DEBIT reversal MAC input", {
  tag: ascii(1),
  psamId: bytes(4),
  psamCounter: u32,
  transactionRef: uuid,
  amount: u32,
  currency: u16,
});
export type ReversalMacFields = Omit<Value<typeof ReversalMacInput.fields>, "tag">;

/** The PSAM's MAC over a DEBIT command it issued, under its verdict key. */
export function issuedMac(verdictKey: Uint8Array, f: IssuedMacFields): Buffer {
  return mac8(verdictKey, IssuedMacInput.encode({ tag: VerdictTag.ISSUED, ...f }));
}

/** The PSAM's MAC over its verdict on the card's answer, under its verdict key. */
export function verdictMac(verdictKey: Uint8Array, f: VerdictMacFields): Buffer {
  return mac8(verdictKey, VerdictMacInput.encode({ tag: VerdictTag.VERDICT, ...f }));
}

/** The PSAM's MAC over a cancelled debit, under its verdict key. */
export function reversalMac(verdictKey: Uint8Array, f: ReversalMacFields): Buffer {
  return mac8(verdictKey, ReversalMacInput.encode({ tag: VerdictTag.REVERSED, ...f }));
}
