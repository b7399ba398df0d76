// The purses as the contract shows them, from the card's READ PURSE answers.

import { PurseStatus, type PointsPurse, type PurseState } from "../../gen/netpurse/card/v1/card.js";
import { purseId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { PurseStatusByte, type PurseData } from "../../lib/protocol/purse.js";

export function purseState(p: PurseData): PurseState {
  return {
    providerId: p.providerId,
    purseId: purseId(p.purseId.toString("hex")),
    balance: money(p.balance, p.currency, p.exponent),
    maxBalance: money(p.maxBalance, p.currency, p.exponent),
    expiryDate: p.expiry,
    transactionCounter: p.counter,
    keyVersion: p.keyVersion,
    status: p.status === PurseStatusByte.ACTIVE ? PurseStatus.PURSE_STATUS_ACTIVE : PurseStatus.PURSE_STATUS_BLOCKED,
  };
}

/** A points purse as the contract shows it, from the card's READ PURSE answer for it (its currency is the programme code). */
export function pointsPurse(p: PurseData): PointsPurse {
  return {
    programme: p.currency,
    balance: money(p.balance, p.currency, 0),
    maxBalance: money(p.maxBalance, p.currency, 0),
  };
}
