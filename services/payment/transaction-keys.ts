// The payment server's side of the encryption layer: from the merchant's
// shared key, the nonce and the ETSK of the offer, the transaction's derived
// key and its TSK. Neither is ever stored; they are derived again when needed.

import { Sealed } from "../../gen/netpurse/card/v1/card.js";
import { open, transactionKey } from "../../lib/protocol/encryption-layer.js";
import type { Merchant } from "./merchants.js";
import { sealBroken } from "./refusals.js";

export interface TransactionKeys {
  /** The derived key: seals debit result M, opens the ETSK. */
  derived: Buffer;
  /** The transaction session key: client ↔ payment server. */
  tsk: Buffer;
}

export function keysFor(merchant: Merchant, transactionId: string, keyNonce: Uint8Array, etsk: Sealed | undefined): TransactionKeys {
  const derived = transactionKey(merchant.key, merchant.merchantId, transactionId, keyNonce);
  const tsk = open(derived, "SESSION_KEY", transactionId, etsk);
  if (!tsk || tsk.length !== 32) throw sealBroken("the ETSK");
  return { derived, tsk };
}

export const encodeSealed = (s: Sealed) => Buffer.from(Sealed.encode(s).finish());
export const decodeSealed = (b: Uint8Array) => Sealed.decode(b);
