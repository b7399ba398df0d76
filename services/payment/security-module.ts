// The payment operator's security module, as the payment server uses it: it
// checks the MACs each PSAM puts on the answers the payment server acts on —
// a DEBIT command issued, the verdict on the card's answer, a reversal — so
// that a terminal host or concentrator in between cannot make one up
// (docs/protocol.md, "PSAM verdicts"). It holds the issuer's verdict master
// key and derives each PSAM's verdict key from it by the PSAM id, as a
// hardware module would with CKM_AES_ECB_ENCRYPT_DATA, without the master
// key ever leaving it. This is the software one: the key in a private file
// of the payment server's folder, written by the issuer.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { BoundedMap } from "../../lib/bounded-map.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { readJson } from "../../lib/files.js";
import { AUTHENTICATION_CURRENCY } from "../../lib/money.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import {
  diversifyPsamKey,
  issuedMac,
  reversalMac,
  Verdict,
  verdictMac,
  type IssuedMacFields,
  type ReversalMacFields,
  type VerdictMacFields,
} from "../../lib/protocol/psam.js";

/** The file, in the payment server's folder, that holds the verdict master key (mode 0600). */
export const VERDICT_KEY_FILE = "psam-verdict-key.json";

/** What that file holds: the issuer's verdict master key, hex (`netpurse-issuer export-verdict-key`). */
export interface VerdictKeyFile {
  format: 1;
  verdictMaster: string;
}

/** What the payment server asks its security module about the PSAMs' answers: does the PSAM's MAC over them verify? */
export interface PsamVerdictChecker {
  /** The MAC over DRAW AMOUNT's answer: this DEBIT command, for this card session (and expected card signature). */
  issued(psamId: string, f: Omit<IssuedMacFields, "psamId">, mac: Uint8Array): boolean;
  /** The MAC over VERIFY DEBIT's answer: this verdict on this card answer, for this debit; and a verdict that fits the debit's currency (verdictFitsDebit). */
  verdict(psamId: string, f: Omit<VerdictMacFields, "psamId">, mac: Uint8Array): boolean;
  /** The MAC over REVERSE DEBIT's answer: this debit is cancelled. */
  reversed(psamId: string, f: Omit<ReversalMacFields, "psamId">, mac: Uint8Array): boolean;
}

/**
 * Whether a verdict can be the PSAM's word on a debit in `currency`: a PSAM
 * answers AUTHENTICATED for an authentication (currency 999) and only for
 * one, and never records one in its batch. A verdict of the other kind is a
 * forgery, refused like a MAC that does not verify, even with a good MAC:
 * "authenticated" must never stand for a payment nor "recorded" for an
 * authentication. A card may decline either.
 */
export function verdictFitsDebit(verdict: number, currency: number): boolean {
  const authentication = currency === AUTHENTICATION_CURRENCY;
  if (verdict === Verdict.AUTHENTICATED) return authentication;
  if (verdict === Verdict.RECORDED) return !authentication;
  return verdict === Verdict.DECLINED_BY_CARD;
}

/** PSAM keys kept derived at once; past that the cache starts again (a pool is far smaller). */
const MAX_CACHED_KEYS = 4096;

/** The software security module: the verdict master key from DIR/psam-verdict-key.json, each PSAM's key derived once and kept. */
export class SoftwareSecurityModule implements PsamVerdictChecker {
  private readonly keys = new BoundedMap<string, Buffer>(MAX_CACHED_KEYS);

  private constructor(private readonly master: Buffer) {}

  /** Reads the verdict master key from the payment server's folder; a missing or malformed file is an error that says how to make it. */
  static async open(dir: string): Promise<SoftwareSecurityModule> {
    const path = join(dir, VERDICT_KEY_FILE);
    if (!existsSync(path)) {
      throw new Error(
        `no PSAM verdict key at ${path}: the payment server cannot check the PSAMs' verdicts without it; ` +
          `have the issuer write it with 'netpurse-issuer export-verdict-key --out ${path}'`,
      );
    }
    const f = await readJson<Partial<VerdictKeyFile>>(path);
    if (f.format !== 1 || typeof f.verdictMaster !== "string" || !/^[0-9a-f]{32}$/.test(f.verdictMaster)) {
      throw new Error(`${path}: not a PSAM verdict key file (format 1, verdictMaster of 32 hex digits)`);
    }
    return new SoftwareSecurityModule(Buffer.from(f.verdictMaster, "hex"));
  }

  /** A PSAM's verdict key, or undefined for something that is not a PSAM id. */
  private keyOf(psamId: string): Buffer | undefined {
    if (!/^[0-9a-f]{8}$/.test(psamId)) return undefined;
    let k = this.keys.get(psamId);
    if (!k) {
      k = diversifyPsamKey(this.master, Buffer.from(psamId, "hex"));
      this.keys.set(psamId, k);
    }
    return k;
  }

  /** Recomputes a MAC and compares it in constant time; fields that do not fit the layout never verify. */
  private check(psamId: string, mac: Uint8Array, compute: (key: Buffer, id: Buffer) => Buffer): boolean {
    const key = this.keyOf(psamId);
    if (!key) return false;
    try {
      return macEqual(compute(key, Buffer.from(psamId, "hex")), mac);
    } catch (e) {
      if (e instanceof LayoutError) return false;
      throw e;
    }
  }

  issued(psamId: string, f: Omit<IssuedMacFields, "psamId">, mac: Uint8Array): boolean {
    return this.check(psamId, mac, (key, id) => issuedMac(key, { ...f, psamId: id }));
  }

  verdict(psamId: string, f: Omit<VerdictMacFields, "psamId">, mac: Uint8Array): boolean {
    if (!verdictFitsDebit(f.verdict, f.currency)) return false;
    return this.check(psamId, mac, (key, id) => verdictMac(key, { ...f, psamId: id }));
  }

  reversed(psamId: string, f: Omit<ReversalMacFields, "psamId">, mac: Uint8Array): boolean {
    return this.check(psamId, mac, (key, id) => reversalMac(key, { ...f, psamId: id }));
  }
}
