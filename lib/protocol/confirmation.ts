// The payment operator's confirmation of a purchase for the merchant: an
// HMAC-SHA-256 under the key the merchant shares with the operator, over a
// fixed byte layout of the confirmation's fields (docs/protocol.md).

import { createHmac } from "node:crypto";
import { macEqual } from "../crypto/aes.js";
import { ascii, bytes, layout, u16, u32, u64, u8, uuid } from "./layout.js";

const ConfirmationMacInput = layout("purchase confirmation MAC input", {
  tag: ascii(8),
  transactionId: uuid,
  merchantId: ascii(16),
  amount: u64,
  currency: u16,
  exponent: u8,
  purseId: bytes(8),
  psamId: bytes(4),
  psamCounter: u32,
  confirmedAtMs: u64,
});

export interface ConfirmationFields {
  transactionId: string;
  merchantId: string;
  amount: number;
  currency: number;
  exponent: number;
  purseId: Buffer;
  psamId: Buffer;
  psamCounter: number;
  confirmedAtMs: number;
}

export function confirmationMac(key: Uint8Array, f: ConfirmationFields): Buffer {
  return createHmac("sha256", key)
    .update(ConfirmationMacInput.encode({ tag: "NPCONF01", ...f }))
    .digest();
}

export function confirmationMacValid(key: Uint8Array, f: ConfirmationFields, mac: Uint8Array): boolean {
  return macEqual(confirmationMac(key, f), mac);
}
