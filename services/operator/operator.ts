// The operator's tools: registering a merchant gives it a fresh key shared
// between the payment server's registry and the merchant's validation
// service (both private files), and fixes its confirmation mode; registering
// a bank gives it a fresh key shared with the load server. A merchant is also
// entered in clearing's merchant registry with its acquirer, so that clearing
// pays it.

import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { ConfirmationMode, confirmationModeToJSON } from "../../gen/netpurse/card/v1/card.js";
import { isName } from "../../lib/ids.js";
import { MerchantRegistry } from "../payment/merchants.js";
import { addValidationKey } from "../merchant-validation/validation.js";
import { writeBankFile } from "../bank/identity.js";
import { addBankKey } from "../load/banks.js";
import { addClearingMerchant, DEFAULT_ACQUIRER } from "../clearing/merchants.js";

const MODES = [
  ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
  ConfirmationMode.CONFIRMATION_MODE_SERVER_COMPARES,
  ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES,
  ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES,
];

export async function registerMerchant(p: {
  paymentDir: string;
  validationDir: string;
  merchantId: string;
  name: string;
  mode: ConfirmationMode;
  /**
   * Clearing's folder (DATA/clearing) and what it pays the merchant in:
   * the merchant goes into its merchants.json. Omitted only where no
   * clearing runs (a test of the validation service alone).
   */
  clearing?: { dir: string; acquirerId?: string; currency: number; exponent: number };
}): Promise<void> {
  if (!isName(p.merchantId, 16)) throw new Error("merchant id must be 1..16 characters of [A-Za-z0-9._-]");
  if (!MODES.includes(p.mode)) throw new Error(`unknown confirmation mode ${confirmationModeToJSON(p.mode)}`);
  const acquirerId = p.clearing?.acquirerId ?? DEFAULT_ACQUIRER;
  if (!isName(acquirerId, 64)) throw new Error("acquirer id must be 1..64 characters of [A-Za-z0-9._-]");
  if (p.clearing && !(Number.isInteger(p.clearing.currency) && p.clearing.currency >= 1 && p.clearing.currency <= 999)) {
    throw new Error("currency must be an ISO 4217 numeric code, 1..999");
  }
  if (p.clearing && !(Number.isInteger(p.clearing.exponent) && p.clearing.exponent >= 0 && p.clearing.exponent <= 4)) {
    throw new Error("exponent must be 0..4");
  }
  const key = randomBytes(32).toString("hex");
  await MerchantRegistry.add(join(p.paymentDir, "merchants.json"), {
    merchantId: p.merchantId,
    name: p.name,
    confirmationMode: confirmationModeToJSON(p.mode),
    sharedKey: key,
  });
  await addValidationKey(join(p.validationDir, "keys.json"), p.merchantId, key, p.mode);
  if (p.clearing)
    await addMerchantToClearing(p.clearing.dir, {
      merchantId: p.merchantId,
      name: p.name,
      acquirerId,
      currency: p.clearing.currency,
      exponent: p.clearing.exponent,
    });
}

/** Where clearing keeps its merchant registry (DATA/clearing/merchants.json). */
export const clearingMerchantsPath = (clearingDir: string) => join(clearingDir, "merchants.json");

/** Enters a merchant in clearing's registry (or replaces its entry): clearing pays only merchants it finds there. */
export async function addMerchantToClearing(
  clearingDir: string,
  m: { merchantId: string; name: string; acquirerId?: string; currency: number; exponent: number },
): Promise<void> {
  await addClearingMerchant(clearingMerchantsPath(clearingDir), { ...m, acquirerId: m.acquirerId ?? DEFAULT_ACQUIRER });
}

/** Registers a bank at the load server: a fresh key shared between the load server's banks.json and the bank's bank.json. */
export async function registerBank(p: { loadDir: string; bankDir: string; bankId: string }): Promise<void> {
  if (!isName(p.bankId, 16)) throw new Error("bank id must be 1..16 characters of [A-Za-z0-9._-]");
  const key = randomBytes(32).toString("hex");
  await addBankKey(join(p.loadDir, "banks.json"), p.bankId, key);
  await writeBankFile(join(p.bankDir, "bank.json"), p.bankId, key);
}
