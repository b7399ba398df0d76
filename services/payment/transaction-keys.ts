// The payment server's side of the encryption layer: from the merchant's
// shared key, the nonce and the ETSK of the offer, the transaction's derived
// key, its TSK and the offer's terms the TSK was granted for. Neither key is
// ever stored; they are derived again when needed. A new draw request must
// carry the granted terms, and come before the grant expires.

import { Status } from "nice-grpc";
import { ErrorReason, Sealed, SessionKeyGrant, type Money } from "../../gen/netpurse/card/v1/card.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { formatMoney } from "../../lib/money.js";
import { open, transactionKey } from "../../lib/protocol/encryption-layer.js";
import type { Merchant } from "./merchants.js";
import { sealBroken } from "./refusals.js";

/** The terms of the merchant's offer that the merchant's validation service sealed with the TSK into the ETSK. */
export interface OfferGrant {
  merchantId: string;
  amount: Money;
  expiresAt: Date;
}

export interface TransactionKeys {
  /** The derived key: seals debit result M, opens the ETSK. */
  derived: Buffer;
  /** The transaction session key: client ↔ payment server. */
  tsk: Buffer;
  /**
   * The offer's terms the TSK was granted for; undefined for an ETSK that
   * holds a bare 32-byte TSK, as validation services made them before
   * grants (such a transaction is served only if it was already recorded).
   */
  grant: OfferGrant | undefined;
}

/** The plaintext of an ETSK from before session key grants: the TSK alone. */
const BARE_TSK_SIZE = 32;

export function keysFor(merchant: Merchant, transactionId: string, keyNonce: Uint8Array, etsk: Sealed | undefined): TransactionKeys {
  const derived = transactionKey(merchant.key, merchant.merchantId, transactionId, keyNonce);
  const plain = open(derived, "SESSION_KEY", transactionId, etsk);
  if (!plain) throw sealBroken("the ETSK");
  // A grant is longer than 32 bytes (the TSK alone takes 34 encoded), so the two never coincide.
  if (plain.length === BARE_TSK_SIZE) return { derived, tsk: plain, grant: undefined };
  let g: SessionKeyGrant;
  try {
    g = SessionKeyGrant.decode(plain);
  } catch {
    throw sealBroken("the ETSK's session key grant");
  }
  if (g.transactionSessionKey.length !== 32 || !g.merchantId || !g.amount || !g.expiresAt || Number.isNaN(g.expiresAt.getTime())) {
    throw sealBroken("the ETSK's session key grant (incomplete)");
  }
  return {
    derived,
    tsk: Buffer.from(g.transactionSessionKey),
    grant: { merchantId: g.merchantId.value, amount: g.amount, expiresAt: g.expiresAt },
  };
}

const offerMismatch = (text: string) =>
  new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_OFFER_MISMATCH, `${text}; nothing was recorded or debited`);

/**
 * Refuses a draw request whose merchant or amount (minor units, currency,
 * exponent) is not the offer's the TSK was granted for: PERMISSION_DENIED,
 * reason OFFER_MISMATCH. Without it a client could have its card debited
 * less than the offer (and the merchant refuse the goods after the money
 * moved), or pay another merchant's price.
 */
export function requireGrantedTerms(grant: OfferGrant, dr: { merchantId: string; amount: number; currency: number; exponent: number }): void {
  if (dr.merchantId !== grant.merchantId) {
    throw offerMismatch(`the draw request pays merchant "${dr.merchantId}", the offer is from "${grant.merchantId}"`);
  }
  const a = grant.amount;
  if (BigInt(dr.amount) !== a.amountMinor || dr.currency !== a.currency || dr.exponent !== a.exponent) {
    const drawn = formatMoney({ amountMinor: dr.amount, currency: dr.currency, exponent: dr.exponent });
    throw offerMismatch(
      `the draw request's amount is ${drawn} (${dr.amount} minor units, currency ${dr.currency}, exponent ${dr.exponent}), ` +
        `the offer's is ${formatMoney(a)} (${a.amountMinor} minor units, currency ${a.currency}, exponent ${a.exponent})`,
    );
  }
}

/** A new draw request whose ETSK holds a bare TSK: nothing says what the merchant offered, so it is not served. */
export function ungrantedRefusal(): NetpurseError {
  return offerMismatch("the ETSK holds a bare session key without the offer's terms (made by an older merchant validation service); ask for a new offer");
}

/** FAILED_PRECONDITION, reason OFFER_EXPIRED, when the grant's expiry has passed; undefined while it holds. */
export function grantExpired(grant: OfferGrant, now: Date): NetpurseError | undefined {
  if (now.getTime() <= grant.expiresAt.getTime()) return undefined;
  return new NetpurseError(
    Status.FAILED_PRECONDITION,
    ErrorReason.ERROR_REASON_OFFER_EXPIRED,
    `the offer expired at ${grant.expiresAt.toISOString()}; nothing was debited: ask the merchant for a new one`,
  );
}

export const encodeSealed = (s: Sealed) => Buffer.from(Sealed.encode(s).finish());
export const decodeSealed = (b: Uint8Array) => Sealed.decode(b);
