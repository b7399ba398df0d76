// Assertion helpers for the payment tests: what the merchant would read in a
// debit result M, and the PSAMs' totals as the concentrator reports them.

import { join } from "node:path";
import type { Sealed } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { DebitResultM } from "../../gen/netpurse/payment/v1/payment.js";
import { open, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import type { Network } from "./network.js";

/** Opens a debit result M as the merchant's validation service would, with the merchant's shared key. */
export async function openResultM(net: Network, o: PaymentOffer, sealed: Sealed | undefined): Promise<DebitResultM> {
  const key = (await new MerchantRegistry(join(net.paths.payment, "merchants.json")).get(o.merchantId!.value))!.key;
  const plain = open(transactionKey(key, o.merchantId!.value, o.transactionId!.value, o.keyNonce), "DEBIT_RESULT_M", o.transactionId!.value, sealed);
  if (!plain) throw new Error("debit result M does not open with the merchant's key");
  return DebitResultM.decode(plain);
}

export function psamTotals(net: Network) {
  return async () => {
    const r = await net.clients.concentrator.listTerminals({});
    let counter = 0,
      pending = 0,
      batch = 0;
    for (const t of r.terminals)
      for (const s of t.slots) {
        counter += s.psamCounter;
        pending += s.pendingDebits.length;
        batch += s.batchCount;
      }
    return { counter, pending, batch };
  };
}
