// The merchant's validate routine (step 638): checks the payment operator's
// confirmation with the key the merchant shares with the operator, and that
// it confirms exactly the order's terms.

import { existsSync } from "node:fs";
import { Status } from "nice-grpc";
import { ErrorReason, type Money } from "../../gen/netpurse/card/v1/card.js";
import type { MerchantValidationServiceImplementation, ValidateConfirmationRequest, ValidateConfirmationResponse } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { invalidField, NetpurseError } from "../../lib/grpc/errors.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { requireMerchantId, requireTransactionId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney } from "../../lib/money.js";
import { confirmationMacValid } from "../../lib/protocol/confirmation.js";

/** The validation service's private key file (mode 0600): the keys it shares with the payment operator. */
export interface ValidationKeysFile {
  merchants: { merchantId: string; sharedKey: string }[];
}

export async function addValidationKey(path: string, merchantId: string, sharedKeyHex: string): Promise<void> {
  const file: ValidationKeysFile = existsSync(path) ? await readJson(path) : { merchants: [] };
  file.merchants = [...file.merchants.filter((m) => m.merchantId !== merchantId), { merchantId, sharedKey: sharedKeyHex }];
  await writeJsonAtomic(path, file, { private: true });
}

const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);

function checkMoney(m: Money, field: string): void {
  if (m.amountMinor < 0n || m.amountMinor > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidField(`${field}.amount_minor`, "out of range");
  if (m.currency < 1 || m.currency > 999) throw invalidField(`${field}.currency`, "must be an ISO 4217 numeric code 1..999");
  if (m.exponent > 4) throw invalidField(`${field}.exponent`, "must be 0..4");
}

export class MerchantValidation {
  constructor(
    private readonly keys: Map<string, Buffer>,
    private readonly log: Logger,
  ) {}

  static async load(path: string, log: Logger): Promise<MerchantValidation> {
    if (!existsSync(path)) throw new Error(`no merchant keys at ${path}: register the merchant with 'netpurse-operator add-merchant' first`);
    const file = await readJson<ValidationKeysFile>(path);
    return new MerchantValidation(new Map(file.merchants.map((m) => [m.merchantId, Buffer.from(m.sharedKey, "hex")])), log);
  }

  readonly service: MerchantValidationServiceImplementation = {
    validateConfirmation: async (req) => this.validate(req as ValidateConfirmationRequest),
  };

  validate(req: ValidateConfirmationRequest): ValidateConfirmationResponse {
    const c = req.confirmation;
    if (!c) throw invalidField("confirmation", "missing");
    const o = req.order;
    if (!o) throw invalidField("order", "missing");
    const transactionId = requireTransactionId(c.transactionId, "confirmation.transaction_id");
    const merchantId = requireMerchantId(c.merchantId, "confirmation.merchant_id");
    if (!c.amount) throw invalidField("confirmation.amount", "missing");
    const purse = c.purseId?.value ?? Buffer.alloc(0);
    if (purse.length !== 8) throw invalidField("confirmation.purse_id", "must be 8 bytes");
    const psam = c.psamId?.value ?? Buffer.alloc(0);
    if (psam.length !== 4) throw invalidField("confirmation.psam_id", "must be 4 bytes");
    if (!c.confirmedAt) throw invalidField("confirmation.confirmed_at", "missing");
    if (c.mac.length !== 32) throw invalidField("confirmation.mac", `must be 32 bytes, got ${c.mac.length}`);
    const orderTxn = requireTransactionId(o.transactionId, "order.transaction_id");
    const orderMerchant = requireMerchantId(o.merchantId, "order.merchant_id");
    if (!o.amount) throw invalidField("order.amount", "missing");
    checkMoney(c.amount, "confirmation.amount");
    checkMoney(o.amount, "order.amount");
    const at = c.confirmedAt.getTime();
    if (!Number.isFinite(at) || at < 0) throw invalidField("confirmation.confirmed_at", "not a time after 1970");

    const key = this.keys.get(merchantId);
    if (!key) throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `this validation service holds no key for merchant "${merchantId}"`);
    const ok = confirmationMacValid(
      key,
      {
        transactionId,
        merchantId,
        amount: Number(c.amount.amountMinor),
        currency: c.amount.currency,
        exponent: c.amount.exponent,
        purseId: Buffer.from(purse),
        psamId: Buffer.from(psam),
        psamCounter: c.psamCounter,
        confirmedAtMs: c.confirmedAt.getTime(),
      },
      c.mac,
    );
    if (!ok) {
      this.log.warn("confirmation MAC does not verify", { transaction: transactionId, merchant: merchantId });
      throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, "the confirmation's MAC does not verify: it was forged or altered");
    }
    const mismatch = (field: string, got: string, want: string) =>
      denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, `the confirmation's ${field} is ${got}, the order's is ${want}`);
    if (transactionId !== orderTxn) throw mismatch("transaction_id", transactionId, orderTxn);
    if (merchantId !== orderMerchant) throw mismatch("merchant_id", merchantId, orderMerchant);
    const a = c.amount;
    const b = o.amount;
    if (a.amountMinor !== b.amountMinor || a.currency !== b.currency || a.exponent !== b.exponent) throw mismatch("amount", formatMoney(a), formatMoney(b));
    return { transactionId: c.transactionId, purseId: c.purseId, psamId: c.psamId, psamCounter: c.psamCounter, validatedAt: new Date() };
  }
}
