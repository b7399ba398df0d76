// The payment operator's registry of merchants: who may be paid, how each
// confirms purchases, and the key each shares with the operator. A private
// file (mode 0600) written by `netpurse-operator add-merchant`.

import { existsSync, statSync } from "node:fs";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { ConfirmationMode, confirmationModeFromJSON } from "../../gen/netpurse/card/v1/card.js";

export interface MerchantEntry {
  merchantId: string;
  name: string;
  /** A ConfirmationMode name, e.g. "CONFIRMATION_MODE_PSAM_VERIFIES". */
  confirmationMode: string;
  /** 32-byte key shared with the merchant, hex. */
  sharedKey: string;
}

export interface MerchantRegistryFile {
  merchants: MerchantEntry[];
}

export interface Merchant {
  merchantId: string;
  name: string;
  mode: ConfirmationMode;
  key: Buffer;
}

/** Reads the registry, and reads it again when the file changes. */
export class MerchantRegistry {
  private mtime = -1;
  private byId = new Map<string, Merchant>();
  private checkedAt = 0;
  /** The reload in progress: concurrent callers wait for it rather than read a half-loaded map. */
  private loading: Promise<void> | undefined;

  constructor(private readonly path: string) {}

  private refresh(): Promise<void> {
    if (Date.now() - this.checkedAt < 1_000) return this.loading ?? Promise.resolve();
    this.checkedAt = Date.now();
    this.loading = this.load().finally(() => (this.loading = undefined));
    return this.loading;
  }

  private async load(): Promise<void> {
    if (!existsSync(this.path)) {
      this.byId = new Map();
      this.mtime = -1;
      return;
    }
    const m = statSync(this.path).mtimeMs;
    if (m === this.mtime) return;
    const file = await readJson<MerchantRegistryFile>(this.path);
    this.byId = new Map(
      file.merchants.map((e) => [
        e.merchantId,
        { merchantId: e.merchantId, name: e.name, mode: confirmationModeFromJSON(e.confirmationMode), key: Buffer.from(e.sharedKey, "hex") },
      ]),
    );
    this.mtime = m;
  }

  async get(merchantId: string): Promise<Merchant | undefined> {
    await this.refresh();
    return this.byId.get(merchantId);
  }

  static async add(path: string, entry: MerchantEntry): Promise<void> {
    const file: MerchantRegistryFile = existsSync(path) ? await readJson(path) : { merchants: [] };
    file.merchants = [...file.merchants.filter((m) => m.merchantId !== entry.merchantId), entry];
    await writeJsonAtomic(path, file, { private: true });
  }
}
