// The host security module of the load server (FIG. 17, 864): it holds the
// issuer's load master keys and is the only part that computes a card's load
// keys. The load server asks it to verify S1 and sign the LOAD command (S2),
// to verify S3, and to recompute an S1 for the negative result handling; it
// never hands out a key. SoftwareHsm keeps its keys and counter in a private
// file; Pkcs11Hsm (pkcs11-hsm.ts) keeps the keys in a PKCS#11 token, since
// every card key is one AES-ECB block under a master key (lib/crypto/keys.ts).
// DATA/load/hsm.json says which (open-hsm.ts, docs/hsm.md).

import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { deriveSessionKey, diversifyCardKey } from "../../lib/crypto/keys.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { Mutex } from "../../lib/mutex.js";
import { LoadCommand, loadS1, loadS2, s3Verifies, type Load, type LoadAnswer, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import { isExpired, PurseStatusByte } from "../../lib/protocol/purse.js";

/** Why the security module will not sign a LOAD command for a card whose S1 verified. */
export type HsmRefusal = "KEY_VERSION_UNKNOWN" | "BAD_S1" | "EXPIRED" | "BLOCKED" | "CURRENCY_MISMATCH" | "MAX_BALANCE_EXCEEDED";

/** A refusal of a card whose S1 verified, as the contract reports it (the load server's and a programme's module alike). */
export const REFUSAL_REASON: Record<Exclude<HsmRefusal, "BAD_S1">, ErrorReason> = {
  KEY_VERSION_UNKNOWN: ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN,
  EXPIRED: ErrorReason.ERROR_REASON_CARD_EXPIRED,
  BLOCKED: ErrorReason.ERROR_REASON_CARD_BLOCKED,
  CURRENCY_MISMATCH: ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
  MAX_BALANCE_EXCEEDED: ErrorReason.ERROR_REASON_MAX_BALANCE_EXCEEDED,
};

export class HsmRefused extends Error {
  constructor(
    readonly refusal: HsmRefusal,
    message: string,
  ) {
    super(message);
  }
}

export interface IssuedLoad {
  hsmId: string;
  hsmCounter: number;
  /** The LOAD command's data field, S2 last. */
  command: Buffer;
}

export interface HostSecurityModule {
  /** The module's 4-byte id, hex. */
  readonly id: string;
  /**
   * Step 898: verifies the card's S1 over the load the bank authorised and
   * the card's state, checks the card may take the load (status, expiry,
   * currency code and exponent, room under its maximum), and signs the LOAD
   * command (S2) under a fresh counter of its own.
   */
  issueLoad(authorised: LoadInitCommand, exponent: number, init: LoadInit): Promise<IssuedLoad>;
  /** Step 885: whether the card's LOAD answer (result, counter, balance, S3) is genuine for this load. */
  verifyLoadAnswer(authorised: LoadInitCommand, init: LoadInit, issued: { hsmCounter: number }, answer: LoadAnswer): boolean;
  /**
   * Negative result handling: recomputes the S1 a card would give for the
   * zero-value request `zeroCommand` if its state were `expected` (the
   * values the original load would have left had it failed), with the
   * challenge of the card's new answer, and compares it with that answer's S1.
   */
  matchesS1(zeroCommand: LoadInitCommand, expected: LoadInit): boolean;
  /** Lets go of what the module holds open (a token's session). */
  close?(): void;
}

/**
 * After S1 verified: refuses a card that may not take the load (blocked,
 * expired at the bank's time stamp, another currency or exponent, no room).
 */
export function refuseUnloadable(authorised: LoadInitCommand, exponent: number, init: LoadInit): void {
  const when = new Date(authorised.dateTime * 1000);
  if (init.status !== PurseStatusByte.ACTIVE) throw new HsmRefused("BLOCKED", "the card is blocked");
  if (isExpired(init.expiry, when)) throw new HsmRefused("EXPIRED", `the card expired on ${init.expiry}`);
  if (init.currency !== authorised.currency || init.exponent !== exponent) {
    throw new HsmRefused(
      "CURRENCY_MISMATCH",
      `the card holds currency ${init.currency} with exponent ${init.exponent}, the load is in ${authorised.currency} with exponent ${exponent}`,
    );
  }
  if (init.balance + authorised.amount > init.maxBalance) {
    throw new HsmRefused("MAX_BALANCE_EXCEEDED", `the card holds ${init.balance} of at most ${init.maxBalance}; ${authorised.amount} more does not fit`);
  }
}

/** The LOAD command's fields but S2: the authorised load, under the module's id and counter. */
export function loadFields(authorised: LoadInitCommand, hsmId: string, hsmCounter: number): Omit<Load, "s2"> {
  return {
    amount: authorised.amount,
    currency: authorised.currency,
    hsmId: Buffer.from(hsmId, "hex"),
    hsmCounter,
    dateTime: authorised.dateTime,
    transactionRef: authorised.transactionRef,
  };
}

/** The software module's file: private (0600), it holds the issuer's load master keys. */
export interface HsmFile {
  format: 1;
  kind?: "software";
  hsmId: string;
  /** Load master keys by key version, hex. */
  loadKeys: Record<string, string>;
  /** The last counter used for a LOAD command. */
  counter: number;
}

export class SoftwareHsm implements HostSecurityModule {
  private readonly mutex = new Mutex();

  private constructor(
    private readonly path: string,
    private state: HsmFile,
  ) {}

  static async open(path: string): Promise<SoftwareHsm> {
    const state = await readJson<HsmFile>(path);
    if (state.format !== 1) throw new Error(`${path}: unknown security module file format ${String(state.format)}`);
    if ((state.kind ?? "software") !== "software") throw new Error(`${path}: a ${String(state.kind)} security module, not the software one`);
    return new SoftwareHsm(path, state);
  }

  static async write(path: string, file: HsmFile): Promise<void> {
    await writeJsonAtomic(path, file, { private: true });
  }

  get id(): string {
    return this.state.hsmId;
  }

  /** The card's load key, inside the module only. */
  private cardKey(init: Pick<LoadInit, "keyVersion" | "purseId">): Buffer | undefined {
    const master = this.state.loadKeys[String(init.keyVersion)];
    return master ? diversifyCardKey(Buffer.from(master, "hex"), init.purseId) : undefined;
  }

  private sessionKey(cardKey: Buffer, init: LoadInit, hsmCounter: number): Buffer {
    return deriveSessionKey(cardKey, {
      cardCounter: init.counter,
      securityModuleId: Buffer.from(this.id, "hex"),
      securityModuleCounter: hsmCounter,
      challenge: init.challenge,
    });
  }

  issueLoad(authorised: LoadInitCommand, exponent: number, init: LoadInit): Promise<IssuedLoad> {
    return this.mutex.run(async () => {
      const key = this.cardKey(init);
      if (!key) throw new HsmRefused("KEY_VERSION_UNKNOWN", `no load master key of version ${init.keyVersion}`);
      if (!macEqual(loadS1(key, authorised, init), init.s1)) throw new HsmRefused("BAD_S1", "the card's S1 does not verify for the authorised load");
      refuseUnloadable(authorised, exponent, init);
      const hsmCounter = this.state.counter + 1;
      // The counter is on disk before the command leaves: a counter is never used twice.
      const next = { ...this.state, counter: hsmCounter };
      await SoftwareHsm.write(this.path, next);
      this.state = next;
      const fields = loadFields(authorised, this.id, hsmCounter);
      const s2 = loadS2(this.sessionKey(key, init, hsmCounter), init, fields);
      return { hsmId: this.id, hsmCounter, command: LoadCommand.encode({ ...fields, s2 }) };
    });
  }

  verifyLoadAnswer(authorised: LoadInitCommand, init: LoadInit, issued: { hsmCounter: number }, answer: LoadAnswer): boolean {
    const master = this.state.loadKeys[String(init.keyVersion)];
    if (!master) return false;
    return s3Verifies(Buffer.from(master, "hex"), init, loadFields(authorised, this.id, issued.hsmCounter), answer);
  }

  matchesS1(zeroCommand: LoadInitCommand, expected: LoadInit): boolean {
    const key = this.cardKey(expected);
    return !!key && macEqual(loadS1(key, zeroCommand, expected), expected.s1);
  }
}
