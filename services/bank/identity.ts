// The bank's own key file (DATA/bank/bank.json, private): its id at the load
// server and the key it shares with it, written by `netpurse-operator add-bank`.

import { existsSync } from "node:fs";
import { readJson, writeJsonAtomic } from "../../lib/files.js";

export interface BankFile {
  format: 1;
  bankId: string;
  /** 32-byte key shared with the load server, hex. */
  loadServerKey: string;
}

export async function writeBankFile(path: string, bankId: string, keyHex: string): Promise<void> {
  await writeJsonAtomic(path, { format: 1, bankId, loadServerKey: keyHex } satisfies BankFile, { private: true });
}

export async function readBankFile(path: string): Promise<BankFile> {
  if (!existsSync(path)) throw new Error(`no bank key file at ${path}: run 'netpurse-operator add-bank' first`);
  const f = await readJson<BankFile>(path);
  if (f.format !== 1) throw new Error(`${path}: unknown bank file format ${String(f.format)}`);
  return f;
}
