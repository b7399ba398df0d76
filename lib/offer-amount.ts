// The amount an offer (and so a draw request) may carry: money to pay, a
// programme's points to redeem, or the zero of an authentication
// (docs/loyalty.md, "Currency codes"). The merchant's validation service
// grants keys only for these, and the payment server draws only these.

import type { Money } from "../gen/netpurse/card/v1/card.js";
import { invalidField } from "./grpc/errors.js";
import { AUTHENTICATION_CURRENCY, isMoneyCurrency, isProgrammeCode, MAX_CARD_AMOUNT } from "./money.js";

/**
 * An offer's amount, checked (INVALID_ARGUMENT, INVALID_FIELD naming the
 * part at fault otherwise): money, 1..MAX_CARD_AMOUNT minor units in a
 * currency 1..998 with an exponent 0..4; points, 1..MAX_CARD_AMOUNT of a
 * programme code 1000..65535 with exponent 0; or an authentication, 0 in
 * currency 999 with exponent 0. Amount 0 is an authentication and nothing
 * else, so no purchase of nothing is ever signed in money or points.
 */
export function requireOfferAmount(m: Money | undefined, field: string): Money {
  if (!m) throw invalidField(field, "missing");
  const { amountMinor, currency, exponent } = m;
  if (currency === AUTHENTICATION_CURRENCY) {
    if (amountMinor !== 0n)
      throw invalidField(`${field}.amount_minor`, `an authentication (currency ${AUTHENTICATION_CURRENCY}) is of amount 0, got ${amountMinor}`);
    if (exponent !== 0) throw invalidField(`${field}.exponent`, `an authentication (currency ${AUTHENTICATION_CURRENCY}) has exponent 0, got ${exponent}`);
    return m;
  }
  const points = isProgrammeCode(currency);
  if (!points && !isMoneyCurrency(currency)) {
    throw invalidField(
      `${field}.currency`,
      `${currency} is neither money (ISO 4217 numeric 1..998), an authentication (${AUTHENTICATION_CURRENCY}) nor a loyalty programme (1000..65535)`,
    );
  }
  if (amountMinor === 0n) {
    throw invalidField(
      `${field}.amount_minor`,
      `0 is only an authentication, in currency ${AUTHENTICATION_CURRENCY}; ${points ? "points" : "money"} are paid 1..${MAX_CARD_AMOUNT}`,
    );
  }
  if (amountMinor < 0n || amountMinor > BigInt(MAX_CARD_AMOUNT)) throw invalidField(`${field}.amount_minor`, `must be 1..${MAX_CARD_AMOUNT}`);
  if (points && exponent !== 0) throw invalidField(`${field}.exponent`, `a programme's points (code ${currency}) have exponent 0, got ${exponent}`);
  if (exponent > 4) throw invalidField(`${field}.exponent`, "must be 0..4");
  return m;
}
