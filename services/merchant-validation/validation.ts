// The merchant's validation service: the keeper of the key the merchant
// shares with the payment operator. It makes each transaction's keys for the
// merchant's offers (the session key sealed with the offer's terms), opens
// the payment server's debit result M (step 638), compares the card's
// signature in MERCHANT_COMPARES (FIG. 8, step 754), and reports the card's
// proof to the payment server until it is acknowledged.

import { existsSync } from "node:fs";
import { Status } from "nice-grpc";
import { ConfirmationMode, confirmationModeFromJSON, confirmationModeToJSON, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import type {
  IssueTransactionKeysRequest,
  IssueTransactionKeysResponse,
  MerchantValidationServiceImplementation,
  ValidateConfirmationRequest,
  ValidateConfirmationResponse,
} from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { DebitResultM, DebitResultStatus } from "../../gen/netpurse/payment/v1/payment.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { invalidField, NetpurseError } from "../../lib/grpc/errors.js";
import { peerOf, type Peer } from "../../lib/grpc/server.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { requireMerchantId, requireTransactionId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { AUTHENTICATION_CURRENCY, formatMoney } from "../../lib/money.js";
import { requireOfferAmount } from "../../lib/offer-amount.js";
import { issueTransactionKeys, open, transactionKey, type OfferTerms } from "../../lib/protocol/encryption-layer.js";
import { cardProofDigest, DebitResponse, DebitResult } from "../../lib/protocol/purse.js";
import type { ProofReporter } from "./proof-reporter.js";

/** The validation service's private key file (mode 0600): per merchant, the key shared with the payment operator and its mode. */
export interface ValidationKeysFile {
  merchants: { merchantId: string; sharedKey: string; confirmationMode: string }[];
}

export async function addValidationKey(path: string, merchantId: string, sharedKeyHex: string, mode: ConfirmationMode): Promise<void> {
  const file: ValidationKeysFile = existsSync(path) ? await readJson(path) : { merchants: [] };
  file.merchants = [
    ...file.merchants.filter((m) => m.merchantId !== merchantId),
    { merchantId, sharedKey: sharedKeyHex, confirmationMode: confirmationModeToJSON(mode) },
  ];
  await writeJsonAtomic(path, file, { private: true });
}

interface MerchantKey {
  key: Buffer;
  mode: ConfirmationMode;
}

const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);

/**
 * The longest an offer may stay payable: this service grants a transaction
 * session key for at most 1 hour ahead, so a leaked offer cannot be paid
 * days later and the merchant's unpaid orders expire soon.
 */
export const MAX_OFFER_TTL_MS = 60 * 60_000;

/** Clock skew between merchant server and this service tolerated above MAX_OFFER_TTL_MS. */
const CLOCK_SKEW_MS = 60_000;

/**
 * The offer's terms of an IssueTransactionKeys request, checked: an amount a
 * card can pay (money or a programme's points) or an authentication (0 in
 * 999), and an expiry in the future and at most MAX_OFFER_TTL_MS ahead.
 */
export function offerTerms(req: IssueTransactionKeysRequest, now: Date = new Date()): OfferTerms {
  const amount = requireOfferAmount(req.amount, "amount");
  const e = req.expiresAt;
  if (!e) throw invalidField("expires_at", "missing");
  if (Number.isNaN(e.getTime())) throw invalidField("expires_at", "is not a valid time");
  if (e.getTime() <= now.getTime()) throw invalidField("expires_at", `${e.toISOString()} is not in the future`);
  if (e.getTime() > now.getTime() + MAX_OFFER_TTL_MS + CLOCK_SKEW_MS) {
    throw invalidField("expires_at", `${e.toISOString()} is more than ${MAX_OFFER_TTL_MS / 60_000} minutes ahead`);
  }
  return { amount, expiresAt: e };
}

export class MerchantValidation {
  constructor(
    private readonly keys: Map<string, MerchantKey>,
    private readonly reporter: ProofReporter | undefined,
    private readonly log: Logger,
  ) {}

  static async loadKeys(path: string): Promise<Map<string, MerchantKey>> {
    if (!existsSync(path)) throw new Error(`no merchant keys at ${path}: register the merchant with 'netpurse-operator add-merchant' first`);
    const file = await readJson<ValidationKeysFile>(path);
    return new Map(file.merchants.map((m) => [m.merchantId, { key: Buffer.from(m.sharedKey, "hex"), mode: confirmationModeFromJSON(m.confirmationMode) }]));
  }

  readonly service: MerchantValidationServiceImplementation = {
    issueTransactionKeys: async (req, ctx) => {
      const merchantId = requireMerchantId(req.merchantId);
      onlyItself(peerOf(ctx), merchantId);
      return this.issueKeys(requireTransactionId(req.transactionId), merchantId, offerTerms(req));
    },
    validateConfirmation: async (req, ctx) => {
      onlyItself(peerOf(ctx), requireMerchantId(req.order?.merchantId, "order.merchant_id"));
      return this.validate(req);
    },
  };

  private keyOf(merchantId: string): MerchantKey {
    const k = this.keys.get(merchantId);
    if (!k) throw denied(ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT, `this validation service holds no key for merchant "${merchantId}"`);
    return k;
  }

  issueKeys(transactionId: string, merchantId: string, terms: OfferTerms): IssueTransactionKeysResponse {
    const k = this.keyOf(merchantId);
    const { keyNonce, tsk, etsk } = issueTransactionKeys(k.key, merchantId, transactionId, terms);
    return { keyNonce, transactionSessionKey: tsk, encryptedSessionKey: etsk };
  }

  async validate(req: ValidateConfirmationRequest): Promise<ValidateConfirmationResponse> {
    const o = req.order;
    if (!o) throw invalidField("order", "missing");
    const transactionId = requireTransactionId(o.transactionId, "order.transaction_id");
    const merchantId = requireMerchantId(o.merchantId, "order.merchant_id");
    const amount = requireOfferAmount(o.amount, "order.amount");
    if (o.keyNonce.length !== 16) throw invalidField("order.key_nonce", `must be 16 bytes, got ${o.keyNonce.length}`);
    if (!req.debitResultM) throw invalidField("debit_result_m", "missing");
    if (req.debitResponse.length !== 0 && req.debitResponse.length !== DebitResponse.size) {
      throw invalidField("debit_response", `must be the card's ${DebitResponse.size}-byte answer, got ${req.debitResponse.length} bytes`);
    }

    const k = this.keyOf(merchantId);
    const plain = open(transactionKey(k.key, merchantId, transactionId, o.keyNonce), "DEBIT_RESULT_M", transactionId, req.debitResultM);
    if (!plain) {
      this.log.warn("debit result M does not open", { transaction: transactionId, merchant: merchantId });
      throw denied(
        ErrorReason.ERROR_REASON_SEAL_BROKEN,
        "the debit result M does not open with this order's key: it was forged, altered, or made for another transaction",
      );
    }
    const m = DebitResultM.decode(plain); // sealed by the payment server: well formed
    const mismatch = (field: string, got: string, want: string) =>
      denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, `the debit result's ${field} is ${got}, the order's is ${want}`);
    if (m.transactionId?.value !== transactionId) throw mismatch("transaction_id", String(m.transactionId?.value), transactionId);
    if (m.merchantId?.value !== merchantId) throw mismatch("merchant_id", String(m.merchantId?.value), merchantId);
    const a = m.amount!;
    if (a.amountMinor !== amount.amountMinor || a.currency !== amount.currency || a.exponent !== amount.exponent)
      throw mismatch("amount", formatMoney(a), formatMoney(amount));
    if (m.confirmationMode !== k.mode) throw mismatch("confirmation mode", confirmationModeToJSON(m.confirmationMode), confirmationModeToJSON(k.mode));

    // An authentication is confirmed as one and only as one: a payment's confirmation never stands for a card's presence, nor the reverse.
    const authentication = amount.currency === AUTHENTICATION_CURRENCY;
    if (m.status === DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED || m.status === DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED) {
      const authenticated = m.status === DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED;
      if (authenticated !== authentication) {
        throw mismatch(
          "status",
          authenticated ? "AUTHENTICATED" : "CONFIRMED",
          authentication ? "an authentication (0 in 999)" : `${formatMoney(amount)}, not an authentication`,
        );
      }
    } else await this.ruleOnUnconfirmed(m, req.debitResponse, transactionId);
    return {
      transactionId: m.transactionId,
      purseId: m.purseId,
      psamId: m.psamId,
      psamCounter: m.psamCounter,
      validatedAt: new Date(),
      confirmationMode: m.confirmationMode,
    };
  }

  /**
   * A debit result issued with the DEBIT command, before anyone saw the
   * card's signature. CLIENT_COMPARES: the merchant accepts the client's
   * trusted agent's word (docs/modes.md says what that trust means).
   * MERCHANT_COMPARES: the card's raw answer must carry the signature the
   * PSAM expected; then its proof goes to the payment server.
   */
  private async ruleOnUnconfirmed(m: DebitResultM, debitResponse: Buffer, transactionId: string): Promise<void> {
    if (m.confirmationMode === ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES) return;
    if (m.confirmationMode !== ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES) {
      throw denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, `a ${confirmationModeToJSON(m.confirmationMode)} purchase needs a confirmed debit result`);
    }
    if (debitResponse.length !== DebitResponse.size)
      throw invalidField("debit_response", "the card's answer is needed to compare its signature (MERCHANT_COMPARES)");
    const answer = DebitResponse.decode(debitResponse);
    if (answer.result !== DebitResult.DEBITED || !macEqual(cardProofDigest(transactionId, answer.cardSignature), m.expectedCardSignatureDigest)) {
      this.log.warn("card signature is not the expected one", { transaction: transactionId });
      throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, "the card's signature is not the one the PSAM expected: the card did not debit as agreed");
    }
    await this.reporter?.enqueue(transactionId, debitResponse); // durable before the goods go out
  }
}

/** A merchant's certificate lets it use its own key only: keys for a transaction of another merchant, or checks of its confirmations, are not its to ask for. */
function onlyItself(peer: Peer, merchantId: string): void {
  if (peer.proven && peer.id !== merchantId) {
    throw new NetpurseError(
      Status.PERMISSION_DENIED,
      ErrorReason.ERROR_REASON_NOT_ALLOWED,
      `merchant ${peer.id} may not use the key of merchant ${merchantId}`,
    );
  }
}
