// What the payment server says about a purchase, built from its record: the
// sealed DEBIT command for the client, debit results C and M, and the
// operator's view of the record with its steps.

import { ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import {
  DebitResultC,
  DebitResultM,
  DebitResultStatus,
  IssuedDebitCommand,
  PurchaseState,
  type CompletePurchaseResponse,
  type ProcessDrawRequestResponse,
  type Purchase as PurchaseMessage,
} from "../../gen/netpurse/payment/v1/payment.js";
import { merchantId, psamId, purseId, txnId } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, money } from "../../lib/money.js";
import { seal } from "../../lib/protocol/encryption-layer.js";
import { cardProofDigest } from "../../lib/protocol/purse.js";
import type { EventRow, PaidPurchase, Purchase, SignedPurchase, State } from "./store.js";
import type { TransactionKeys } from "./transaction-keys.js";

export const stateEnum: Record<State, PurchaseState> = {
  RECEIVED: PurchaseState.PURCHASE_STATE_RECEIVED,
  DEBIT_COMMAND_ISSUED: PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED,
  DEBIT_RESPONSE_RECEIVED: PurchaseState.PURCHASE_STATE_DEBIT_RESPONSE_RECEIVED,
  PROVEN: PurchaseState.PURCHASE_STATE_PROVEN,
  COMPLETED: PurchaseState.PURCHASE_STATE_COMPLETED,
  REVERSED: PurchaseState.PURCHASE_STATE_REVERSED,
  REFUSED: PurchaseState.PURCHASE_STATE_REFUSED,
  IN_DOUBT: PurchaseState.PURCHASE_STATE_IN_DOUBT,
};

const oneRoundTrip = (mode: ConfirmationMode) =>
  mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES || mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES;

/** The digest of the card signature the PSAM expects: all a comparator outside the operator learns of it. */
const digestOf = (p: SignedPurchase) => (p.expected_card_signature ? cardProofDigest(p.transaction_id, p.expected_card_signature) : Buffer.alloc(0));

/** The DEBIT command for the client under the TSK and, in the one-round-trip modes, the debit result M for the merchant. */
export function debitCommandResponse(p: SignedPurchase, keys: TransactionKeys): ProcessDrawRequestResponse {
  const forClient = p.confirmation_mode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES;
  const command: IssuedDebitCommand = {
    debitCommand: p.debit_command,
    terminalId: p.terminal_id,
    psamId: psamId(p.psam_id),
    psamCounter: p.psam_counter,
    completionToken: p.completion_token,
    expectedCardSignature: Buffer.alloc(0),
    expectedCardSignatureDigest: forClient ? digestOf(p) : Buffer.alloc(0),
  };
  return {
    transactionId: txnId(p.transaction_id),
    debitCommand: seal(keys.tsk, "DEBIT_COMMAND", p.transaction_id, IssuedDebitCommand.encode(command).finish()),
    debitResultM: oneRoundTrip(p.confirmation_mode) ? sealResultM(p, keys, DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED) : undefined,
  };
}

function sealResultM(p: SignedPurchase, keys: TransactionKeys, status: DebitResultStatus) {
  const forMerchant = p.confirmation_mode === ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES;
  const m: DebitResultM = {
    transactionId: txnId(p.transaction_id),
    merchantId: merchantId(p.merchant_id),
    amount: money(p.amount_minor, p.currency, p.exponent),
    purseId: purseId(p.purse_id),
    psamId: psamId(p.psam_id),
    psamCounter: p.psam_counter,
    confirmationMode: p.confirmation_mode,
    status,
    expectedCardSignature: Buffer.alloc(0),
    expectedCardSignatureDigest: forMerchant ? digestOf(p) : Buffer.alloc(0),
    issuedAt: new Date(),
  };
  return seal(keys.derived, "DEBIT_RESULT_M", p.transaction_id, DebitResultM.encode(m).finish());
}

/** Debit result C for the client and the confirmation (debit result M) for the merchant of a paid purchase or a proven authentication. */
export function results(p: PaidPurchase, keys: TransactionKeys): CompletePurchaseResponse {
  const c: DebitResultC = { transactionId: txnId(p.transaction_id), state: stateEnum[p.state], newBalance: money(p.new_balance, p.currency, p.exponent) };
  return {
    transactionId: txnId(p.transaction_id),
    debitResultC: seal(keys.tsk, "DEBIT_RESULT_C", p.transaction_id, DebitResultC.encode(c).finish()),
    // An authentication's M says so: the card was present, nothing was paid (the merchant refuses it as a payment).
    debitResultM: sealResultM(
      p,
      keys,
      p.currency === AUTHENTICATION_CURRENCY ? DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED : DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED,
    ),
  };
}

/** The operator's view of a purchase and its logged steps. */
export function purchaseView(p: Purchase, events: EventRow[]): PurchaseMessage {
  const signed = "psam_id" in p ? p : undefined;
  return {
    transactionId: txnId(p.transaction_id),
    merchantId: merchantId(p.merchant_id),
    amount: money(p.amount_minor, p.currency, p.exponent),
    purseId: purseId(p.purse_id),
    state: stateEnum[p.state],
    terminalId: signed?.terminal_id ?? "",
    psamId: signed ? psamId(signed.psam_id) : undefined,
    psamCounter: signed?.psam_counter ?? 0,
    confirmationMode: p.confirmation_mode,
    events: events.map((e) => ({ time: new Date(e.at), step: e.step, detail: e.detail })),
    createdAt: new Date(p.created_at),
    updatedAt: new Date(p.updated_at),
    cardCounter: p.card_counter,
  };
}
