// The operator's tools: registering a merchant gives it a fresh key shared
// between the payment server's registry and the merchant's validation
// service (both private files), and fixes its confirmation mode; registering
// a bank gives it a fresh key shared with the load server.

import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { ConfirmationMode, confirmationModeToJSON } from "../../gen/netpurse/card/v1/card.js";
import { isName } from "../../lib/ids.js";
import { MerchantRegistry } from "../payment/merchants.js";
import { addValidationKey } from "../merchant-validation/validation.js";
import { writeBankFile } from "../bank/identity.js";
import { addBankKey } from "../load/banks.js";

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
}): Promise<void> {
  if (!isName(p.merchantId, 16)) throw new Error("merchant id must be 1..16 characters of [A-Za-z0-9._-]");
  if (!MODES.includes(p.mode)) throw new Error(`unknown confirmation mode ${confirmationModeToJSON(p.mode)}`);
  const key = randomBytes(32).toString("hex");
  await MerchantRegistry.add(join(p.paymentDir, "merchants.json"), {
    merchantId: p.merchantId,
    name: p.name,
    confirmationMode: confirmationModeToJSON(p.mode),
    sharedKey: key,
  });
  await addValidationKey(join(p.validationDir, "keys.json"), p.merchantId, key, p.mode);
}

/** Registers a bank at the load server: a fresh key shared between the load server's banks.json and the bank's bank.json. */
export async function registerBank(p: { loadDir: string; bankDir: string; bankId: string }): Promise<void> {
  if (!isName(p.bankId, 16)) throw new Error("bank id must be 1..16 characters of [A-Za-z0-9._-]");
  const key = randomBytes(32).toString("hex");
  await addBankKey(join(p.loadDir, "banks.json"), p.bankId, key);
  await writeBankFile(join(p.bankDir, "bank.json"), p.bankId, key);
}
