// The banks the load server works for: per bank, the key it shares with the
// load server (DATA/load/banks.json, private, written by
// `netpurse-operator add-bank`). Load authorisations and confirmations are
// sealed under keys derived from it.

import { existsSync } from "node:fs";
import { readJson, writeJsonAtomic } from "../../lib/files.js";

export interface BankKeysFile {
  banks: { bankId: string; sharedKey: string }[];
}

export async function addBankKey(path: string, bankId: string, sharedKeyHex: string): Promise<void> {
  const file: BankKeysFile = existsSync(path) ? await readJson(path) : { banks: [] };
  file.banks = [...file.banks.filter((b) => b.bankId !== bankId), { bankId, sharedKey: sharedKeyHex }];
  await writeJsonAtomic(path, file, { private: true });
}

/** The keys by bank id; read at start (a new bank needs a restart, and add-bank says so). */
export async function loadBankKeys(path: string): Promise<Map<string, Buffer>> {
  if (!existsSync(path)) return new Map();
  const file = await readJson<BankKeysFile>(path);
  return new Map(file.banks.map((b) => [b.bankId, Buffer.from(b.sharedKey, "hex")]));
}
