// Clearing's security module: it holds the acquirer's batch master key, the
// issuer's purchase and load master keys and each loyalty programme's
// redemption master keys, and answers only whether a
// PSAM's MAC, a card's signature or a load's S3 verifies. Like the load
// server's host security module it never hands out a key; every card or
// PSAM key is one AES-ECB block under a master key (lib/crypto/keys.ts), so a
// PKCS#11 token can sit behind the same interface. The software module keeps
// its keys in a private file (mode 0600), written by
// 'netpurse-issuer export-clearing-keys'. A load master key version held in a
// PKCS#11 token (docs/hsm.md) is in that file only as a reference: its S1s
// and S3s are checked in the token, through the shared wrapper, whose
// binding is loaded only when the file names a token.

import { macEqual } from "../../lib/crypto/aes.js";
import { deriveSessionKey, diversifyCardKey } from "../../lib/crypto/keys.js";
import { readJson } from "../../lib/files.js";
import { Pkcs11Token, type TokenConfig, type TokenSession } from "../../lib/hsm/pkcs11.js";
import { SecurityModuleUnavailable, unavailableStatus } from "../../lib/hsm/unavailable.js";
import type { Logger } from "../../lib/log.js";
import { isProgrammeCode } from "../../lib/money.js";
import { loadS1, s1Message, s3Message, s3Verifies, type Load, type LoadAnswer, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import { batchMac, batchRecordMac, diversifyPsamKey, type PsamBatchRecord } from "../../lib/protocol/psam.js";
import { cardSignature, DebitResult } from "../../lib/protocol/purse.js";

/** The file 'netpurse-issuer export-clearing-keys' writes: DATA/clearing/keys.json, mode 0600. */
export interface ClearingKeysFile {
  format: 1;
  /** The issuer whose cards and float these keys stand for. */
  issuerId: string;
  /** The issuer's purchase master keys by key version, hex. */
  purchaseKeys: Record<string, string>;
  /** The issuer's load master keys by key version, hex. */
  loadKeys: Record<string, string>;
  /** The acquirer's batch master key, from which each PSAM's batch key is diversified, hex. */
  batchMaster: string;
  /** Load master key versions held in a PKCS#11 token: where the token is, and each key's label by key version (never a value). */
  tokenLoadKeys?: { token: TokenConfig; labels: Record<string, string> };
  /** Each loyalty programme's redeem master keys, by programme code and key version, hex: they verify points redemptions (docs/loyalty.md). */
  programmeKeys?: Record<string, Record<string, string>>;
}

/** What a closed batch's trailer says, as the PSAM MACed it. */
export interface BatchSummary {
  psamId: Buffer;
  batchNumber: number;
  count: number;
  total: number;
  currency: number;
}

export type CardProof = "OK" | "KEY_VERSION_UNKNOWN" | "PROGRAMME_UNKNOWN" | "BAD_CARD_SIGNATURE";

export interface ClearingSecurityModule {
  /** The issuer these keys belong to. */
  readonly issuerId: string;
  /** Whether a closed batch's MAC verifies under the PSAM's batch key. */
  verifyBatchMac(b: BatchSummary, mac: Buffer): boolean;
  /** Whether a batch record's MAC verifies under the PSAM's batch key. */
  verifyRecordMac(psamId: Buffer, batchNumber: number, r: PsamBatchRecord): boolean;
  /**
   * Whether the record's card signature is the card's own DEBITED answer for
   * this debit: under the issuer's purchase keys for money, under the
   * programme's redemption keys for points (the record's currency a
   * programme code).
   */
  verifyCardSignature(psamId: Buffer, r: PsamBatchRecord): CardProof;
  /** Whether a load's S1 is the card's own signature over the load it was asked for (bank, amount, transaction) and its state. */
  verifyLoadS1(authorised: LoadInitCommand, init: LoadInit): boolean;
  /** Whether a load's S3 is the card's own LOADED answer to this LOAD command. */
  verifyLoadS3(init: LoadInit, command: Omit<Load, "s2">, answer: LoadAnswer): boolean;
  /** Lets go of what the module holds open (a token's session). */
  close?(): void;
}

const hexKey = (k: string | undefined) => (k && /^[0-9a-f]{32}$/.test(k) ? Buffer.from(k, "hex") : undefined);

export class SoftwareClearingModule implements ClearingSecurityModule {
  private constructor(
    private readonly keys: ClearingKeysFile,
    private readonly token?: Pkcs11Token,
  ) {}

  /** Opens the keys file; when it names a token, the token too (a token out of reach is logged, and each check tries it again). */
  static async open(path: string, log?: Logger): Promise<SoftwareClearingModule> {
    let keys: ClearingKeysFile;
    try {
      keys = await readJson<ClearingKeysFile>(path);
    } catch (e) {
      // A parse error would quote the file's text, key bytes included: say only what kind of failure it was.
      const why = e instanceof SyntaxError ? "not valid JSON" : ((e as NodeJS.ErrnoException).code ?? "unreadable");
      // eslint-disable-next-line preserve-caught-error -- the caught error quotes the file, key bytes included: it must not travel on
      throw new Error(`cannot read clearing's keys ${path} (${why}): export them with 'netpurse-issuer export-clearing-keys --out ${path}'`);
    }
    if (keys.format !== 1 || !hexKey(keys.batchMaster) || typeof keys.issuerId !== "string") throw new Error(`${path}: not a clearing keys file`);
    if (!keys.tokenLoadKeys || Object.keys(keys.tokenLoadKeys.labels).length === 0) return new SoftwareClearingModule(keys);
    const token = await Pkcs11Token.open(keys.tokenLoadKeys.token);
    const unavailable = token.check();
    if (unavailable) log?.warn("the token of the load master keys is unavailable; loads of its key versions wait until it is back", { why: unavailable });
    return new SoftwareClearingModule(keys, token);
  }

  close(): void {
    this.token?.close();
  }

  /** The label of a token-held load master key version. */
  private tokenLabel(version: number): string | undefined {
    const labels = this.keys.tokenLoadKeys?.labels;
    return this.token && labels && Object.hasOwn(labels, String(version)) ? labels[String(version)] : undefined;
  }

  /** A MAC made in the token; a token out of reach answers the whole submission UNAVAILABLE, so nothing is quarantined for it. */
  private onToken(mac: (t: TokenSession) => Buffer): Buffer {
    try {
      return this.token!.run(mac);
    } catch (e) {
      if (e instanceof SecurityModuleUnavailable) throw unavailableStatus(e, "nothing of this submission was recorded: send it again");
      throw e;
    }
  }

  static fromKeys(keys: ClearingKeysFile): SoftwareClearingModule {
    return new SoftwareClearingModule(keys);
  }

  get issuerId(): string {
    return this.keys.issuerId;
  }

  private batchKey(psamId: Buffer): Buffer {
    return diversifyPsamKey(hexKey(this.keys.batchMaster)!, psamId);
  }

  private master(keys: Record<string, string>, version: number): Buffer | undefined {
    return Object.hasOwn(keys, String(version)) ? hexKey(keys[String(version)]) : undefined;
  }

  verifyBatchMac(b: BatchSummary, mac: Buffer): boolean {
    return macEqual(batchMac(this.batchKey(b.psamId), b), mac);
  }

  verifyRecordMac(psamId: Buffer, batchNumber: number, r: PsamBatchRecord): boolean {
    const { recordMac, ...rest } = r;
    return macEqual(batchRecordMac(this.batchKey(psamId), psamId, batchNumber, rest), recordMac);
  }

  verifyCardSignature(psamId: Buffer, r: PsamBatchRecord): CardProof {
    // A points purse signs its redemptions exactly like a purchase, with its own key: K_card,P,redeem = AES-ECB(MK_points,P,redeem[v], D(purse)).
    let masters = this.keys.purchaseKeys;
    if (isProgrammeCode(r.currency)) {
      const programmes = this.keys.programmeKeys ?? {};
      if (!Object.hasOwn(programmes, String(r.currency))) return "PROGRAMME_UNKNOWN";
      masters = programmes[String(r.currency)]!;
    }
    const master = this.master(masters, r.keyVersion);
    if (!master) return "KEY_VERSION_UNKNOWN";
    const session = { purseId: r.purseId, cardCounter: r.sessionCounter, challenge: r.challenge };
    const sk = deriveSessionKey(diversifyCardKey(master, r.purseId), {
      cardCounter: r.sessionCounter,
      securityModuleId: psamId,
      securityModuleCounter: r.psamCounter,
      challenge: r.challenge,
    });
    const debit = { amount: r.amount, currency: r.currency, psamId, psamCounter: r.psamCounter, dateTime: r.dateTime, transactionRef: r.transactionRef };
    const answer = { result: DebitResult.DEBITED, counter: r.cardCounter, balance: r.balanceAfter };
    return macEqual(cardSignature(sk, session, debit, answer), r.cardSignature) ? "OK" : "BAD_CARD_SIGNATURE";
  }

  verifyLoadS1(authorised: LoadInitCommand, init: LoadInit): boolean {
    const master = this.master(this.keys.loadKeys, init.keyVersion);
    const { s1, ...response } = init;
    if (master) return macEqual(loadS1(diversifyCardKey(master, init.purseId), authorised, response), s1);
    const label = this.tokenLabel(init.keyVersion);
    return (
      !!label &&
      macEqual(
        this.onToken((t) => t.cardMac(label, init.purseId, s1Message(authorised, response))),
        s1,
      )
    );
  }

  verifyLoadS3(init: LoadInit, command: Omit<Load, "s2">, answer: LoadAnswer): boolean {
    const master = this.master(this.keys.loadKeys, init.keyVersion);
    if (master) return s3Verifies(master, init, command, answer);
    const label = this.tokenLabel(init.keyVersion);
    if (!label) return false;
    const { s3, ...result } = answer;
    const session = { cardCounter: init.counter, securityModuleId: command.hsmId, securityModuleCounter: command.hsmCounter, challenge: init.challenge };
    return macEqual(
      this.onToken((t) => t.sessionMac(label, init.purseId, session, s3Message(init, command, result))),
      s3,
    );
  }
}
