// Step 680: the payment server edits the draw request for syntactic
// correctness before anything else happens. Every refusal names the field.

import { ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import type { DrawRequest } from "../../gen/netpurse/payment/v1/payment.js";
import { invalidField } from "../../lib/grpc/errors.js";
import { requireConfirmationMode, requireMerchantId, requireTransactionId } from "../../lib/ids.js";
import { requireOfferAmount } from "../../lib/offer-amount.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { ALGORITHM_AES128_CMAC, InitializeForPurchaseResponse, PURSE_FORMAT, type InitializeForPurchase } from "../../lib/protocol/purse.js";

export interface EditedDrawRequest {
  transactionId: string;
  merchantId: string;
  amount: number;
  currency: number;
  exponent: number;
  mode: ConfirmationMode;
  cardAtr: Buffer;
  initializeResponse: Buffer;
  card: InitializeForPurchase;
}

export function editDrawRequest(dr: DrawRequest | undefined): EditedDrawRequest {
  if (!dr) throw invalidField("draw_request", "missing");
  const transactionId = requireTransactionId(dr.transactionId, "draw_request.transaction_id");
  const merchantId = requireMerchantId(dr.merchantId, "draw_request.merchant_id");
  // Money, a programme's points, or 0 in 999 (an authentication): nothing else is drawn.
  const a = requireOfferAmount(dr.amount, "draw_request.amount");
  const mode = requireConfirmationMode(dr.confirmationMode, "draw_request.confirmation_mode");
  const atr = Buffer.from(dr.cardAtr);
  if (atr.length < 2 || atr.length > 33) throw invalidField("draw_request.card_atr", `must be 2..33 bytes, got ${atr.length}`);
  if (atr[0] !== 0x3b && atr[0] !== 0x3f) throw invalidField("draw_request.card_atr", "must start with TS byte 3B or 3F");
  const raw = Buffer.from(dr.initializeResponse);
  if (raw.length !== InitializeForPurchaseResponse.size) {
    throw invalidField("draw_request.initialize_response", `must be ${InitializeForPurchaseResponse.size} bytes, got ${raw.length}`);
  }
  let card: InitializeForPurchase;
  try {
    card = InitializeForPurchaseResponse.decode(raw);
  } catch (e) {
    if (e instanceof LayoutError) throw invalidField("draw_request.initialize_response", e.message);
    throw e;
  }
  if (card.format !== PURSE_FORMAT) throw invalidField("draw_request.initialize_response", `unknown format ${card.format}`);
  if (card.algorithm !== ALGORITHM_AES128_CMAC) throw invalidField("draw_request.initialize_response", `unknown algorithm ${card.algorithm}`);
  // In another currency the card is refused for that (CURRENCY_MISMATCH, recorded), whatever its exponent:
  // a money card's answer to an authentication's offer, say.
  if (card.currency === a.currency && card.exponent !== a.exponent) {
    throw invalidField("draw_request.amount.exponent", `the offer's exponent ${a.exponent} is not the card's ${card.exponent}`);
  }
  return {
    transactionId,
    merchantId,
    amount: Number(a.amountMinor),
    currency: a.currency,
    exponent: a.exponent,
    mode,
    cardAtr: atr,
    initializeResponse: raw,
    card,
  };
}
