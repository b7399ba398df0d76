// SoftHSM2 set up inside the netpurse data folder: its own configuration
// file (SOFTHSM2_CONF) whose token folder is DATA/hsm/tokens, so nothing
// touches the system's /var/lib/softhsm; and the PIN files, private.

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, readFile } from "node:fs/promises";
import { basename, join, resolve } from "node:path";
import { writeFileAtomic } from "../files.js";
import { loadPkcs11Binding } from "./pkcs11.js";

/** Where distributions install SoftHSM2's PKCS#11 module. */
const SOFTHSM2_MODULES = [
  "/usr/lib/softhsm/libsofthsm2.so",
  "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
  "/usr/lib64/pkcs11/libsofthsm2.so",
  "/usr/local/lib/softhsm/libsofthsm2.so",
  "/opt/homebrew/lib/softhsm/libsofthsm2.so",
];

/** SoftHSM2's module on this machine, if it is installed. */
export function findSoftHsmModule(): string | undefined {
  return SOFTHSM2_MODULES.find((p) => existsSync(p));
}

/** Whether a PKCS#11 module is SoftHSM2's (it is configured by SOFTHSM2_CONF). */
export const isSoftHsm = (module: string) => /softhsm/i.test(basename(module));

/** Why SoftHSM2 through pkcs11js cannot be used here (tests and benchmarks skip, saying so), or undefined when it can. */
export async function softHsmMissing(): Promise<string | undefined> {
  if (!findSoftHsmModule()) return "SoftHSM2 is not installed (Debian: apt-get install softhsm2)";
  try {
    await loadPkcs11Binding();
  } catch (e) {
    return (e as Error).message;
  }
  return undefined;
}

/** The folder netpurse keeps its token material in: DATA/hsm. */
export const hsmDir = (data: string) => join(data, "hsm");

/**
 * Writes a SoftHSM2 configuration whose tokens live in `tokenDir` (made
 * 0700), unless `path` exists already. Returns the absolute path.
 */
export async function ensureSoftHsmConf(path: string, tokenDir: string): Promise<string> {
  const conf = resolve(path);
  await mkdir(resolve(tokenDir), { recursive: true, mode: 0o700 });
  if (!existsSync(conf)) {
    const text = [
      "# SoftHSM2 for netpurse: the tokens stay in this data folder, never in /var/lib/softhsm.",
      `directories.tokendir = ${resolve(tokenDir)}`,
      "objectstore.backend = file",
      "log.level = ERROR",
      "slots.removable = false",
      "",
    ].join("\n");
    await writeFileAtomic(conf, text, { private: true });
  }
  return conf;
}

/** A PIN file (mode 0600): a random PIN is written if there is none. Returns the absolute path; the PIN is never shown. */
export async function ensurePinFile(path: string): Promise<string> {
  const file = resolve(path);
  if (!existsSync(file)) await writeFileAtomic(file, `${randomBytes(16).toString("hex")}\n`, { private: true });
  return file;
}

export async function readPinFile(path: string): Promise<string> {
  return (await readFile(path, "utf8")).trim();
}
