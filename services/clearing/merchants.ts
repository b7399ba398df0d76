// The merchants clearing pays, each with its acquirer: DATA/clearing/merchants.json,
// written by 'netpurse-operator add-merchant' beside the merchant's keys.
// Clearing pays only a merchant it finds here; a record naming any other is
// quarantined.

import { existsSync } from "node:fs";
import { readJson, writeJsonAtomic } from "../../lib/files.js";

export interface ClearingMerchant {
  merchantId: string;
  name: string;
  /** The acquirer that collects for the merchant and pays it. */
  acquirerId: string;
  /** ISO 4217 numeric currency and exponent the merchant sells in. */
  currency: number;
  exponent: number;
}

export interface ClearingMerchantsFile {
  format: 1;
  merchants: ClearingMerchant[];
}

/** The acquirer a merchant gets when none is named. */
export const DEFAULT_ACQUIRER = "demo-acquirer";

const ID_RE = /^[A-Za-z0-9._-]{1,64}$/;

export async function readClearingMerchants(path: string): Promise<Map<string, ClearingMerchant>> {
  const file = existsSync(path) ? await readJson<ClearingMerchantsFile>(path) : { format: 1, merchants: [] };
  const map = new Map<string, ClearingMerchant>();
  for (const m of file.merchants) {
    if (!ID_RE.test(m.merchantId) || !ID_RE.test(m.acquirerId) || !Number.isInteger(m.currency) || !Number.isInteger(m.exponent)) {
      throw new Error(`${path}: not a merchant entry: ${JSON.stringify(m)}`);
    }
    map.set(m.merchantId, m);
  }
  return map;
}

/** Adds a merchant, or replaces its entry. */
export async function addClearingMerchant(path: string, m: ClearingMerchant): Promise<void> {
  const map = await readClearingMerchants(path);
  map.set(m.merchantId, m);
  await writeJsonAtomic(path, { format: 1, merchants: [...map.values()] } satisfies ClearingMerchantsFile, { private: true });
}
