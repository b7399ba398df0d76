// Offers a test makes itself, with keys from the real merchant validation
// service: for terms the demo shops would not offer (another currency, an
// expiry a second away), so the payment server sees a genuine session key
// grant for them.

import { randomUUID } from "node:crypto";
import type { Money } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { Network } from "./network.js";

/** A copy of `template` (an offer of a demo shop) for a fresh transaction, with its own granted amount and expiry. */
export async function grantedOffer(
  net: Network,
  template: PaymentOffer,
  terms: { amount?: Money; expiresInMs?: number } = {},
  /** The validation service as the offer's merchant (default: as the demo shop). */
  validation: Pick<Network["clients"]["validation"], "issueTransactionKeys"> = net.clients.validation,
): Promise<PaymentOffer> {
  const transactionId = { value: randomUUID() };
  const amount = terms.amount ?? template.amount;
  const expiresAt = new Date(Date.now() + (terms.expiresInMs ?? 15 * 60_000));
  const keys = await validation.issueTransactionKeys({ transactionId, merchantId: template.merchantId, amount, expiresAt });
  return {
    ...template,
    transactionId,
    amount,
    expiresAt,
    keyNonce: keys.keyNonce,
    transactionSessionKey: keys.transactionSessionKey,
    encryptedSessionKey: keys.encryptedSessionKey,
  };
}

/** `v`, or a test failure naming what was missing (instead of a non-null assertion). */
export function defined<T>(v: T | null | undefined, what: string): T {
  if (v === undefined || v === null) throw new Error(`expected ${what}, got ${String(v)}`);
  return v;
}

/** An offer's transaction id and amount, which every offer has. */
export function termsOf(o: PaymentOffer): { id: string; amountMinor: number; expiresAt: Date } {
  return {
    id: defined(o.transactionId, "the offer's transaction id").value,
    amountMinor: Number(defined(o.amount, "the offer's amount").amountMinor),
    expiresAt: defined(o.expiresAt, "the offer's expiry"),
  };
}
