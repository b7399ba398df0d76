// The bank's load offer as the load uses it: checked where it comes in (the
// bank's answer, the client's journal), and the INITIALIZE FOR LOAD command
// it stands for, the load's own or the zero-value one of the negative result
// handling.

import type { LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import type { Money, TransactionId } from "../../gen/netpurse/card/v1/card.js";
import { invalidField } from "../../lib/grpc/errors.js";
import type { LoadInitCommand } from "../../lib/protocol/load.js";

/** A load offer with the fields the contract requires of it, and the load cannot do without, present. */
export type BankOffer = LoadOffer & { transactionId: TransactionId; amount: Money; offeredAt: Date };

/** `offer` with its required fields checked; `fault` makes the error for the first one missing (its name in the contract). */
export function checkedOffer(offer: LoadOffer | undefined, fault: (missing: string) => Error): BankOffer {
  if (!offer) throw fault("offer");
  const { transactionId, amount, offeredAt } = offer;
  if (!transactionId) throw fault("offer.transaction_id");
  if (!amount) throw fault("offer.amount");
  if (!offeredAt) throw fault("offer.offered_at");
  return { ...offer, transactionId, amount, offeredAt };
}

/** The INITIALIZE FOR LOAD command an offer stands for; `amount` 0 makes the zero-value request of the negative result handling. */
export function loadInitCommand(offer: LoadOffer, amount?: number): LoadInitCommand {
  const o = checkedOffer(offer, (missing) => invalidField(missing, "missing"));
  return {
    amount: amount ?? Number(o.amount.amountMinor),
    currency: o.amount.currency,
    bankId: o.bankId,
    dateTime: Math.floor(o.offeredAt.getTime() / 1000),
    transactionRef: o.transactionId.value,
  };
}
