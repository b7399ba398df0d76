// The issuer's tools: master keys per purpose and version, personalisation
// of software cards, provisioning of software PSAMs. The keys file is private
// (mode 0600) and its contents never reach a log. A load master key version
// may instead live in a PKCS#11 token (docs/hsm.md): generated there, the
// keys file names it and holds no value for it.

import type { PsamRegistryFile } from "../concentrator/psam-registry.js";
import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { diversifyCardKey, KEY_PURPOSES, type KeyPurpose } from "../../lib/crypto/keys.js";
import { readState } from "../../lib/apdu/state-log.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { ensureToken, loadMasterKeyLabel, tokenConfigOf, withToken, type TokenConfig } from "../../lib/hsm/pkcs11.js";
import { AUTHENTICATION_CURRENCY, isMoneyCurrency, isProgrammeCode, MAX_CARD_AMOUNT } from "../../lib/money.js";
import { diversifyPsamKey } from "../../lib/protocol/psam.js";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { SoftwareCard, type CardFile, type PointsPurseFile } from "../../client/card/software-card.js";
import { SoftwarePsam, type PsamFile } from "../terminal/psam/software-psam.js";
import { SoftwareHsm, type HsmFile } from "../load/hsm.js";
import type { Pkcs11HsmFile } from "../load/pkcs11-hsm.js";
import type { VerdictKeyFile } from "../payment/security-module.js";
import type { ClearingKeysFile } from "../clearing/security-module.js";

/** The issuer id clearing books the demo installation's float under. */
export const DEMO_ISSUER_ID = "demo-issuer";

/** The issuer's (and, for the demo, the acquirer's) master keys. */
export interface IssuerKeys {
  format: 1;
  /** Master keys per purpose and key version, hex. */
  master: Record<KeyPurpose, Record<string, string>>;
  /** The acquirer's master key from which each PSAM's batch key is diversified, hex. */
  batchMaster: string;
  /**
   * The master key from which each PSAM's verdict key is diversified, hex.
   * The payment operator's security module holds a copy (export-verdict-key)
   * to check the PSAMs' verdicts.
   */
  verdictMaster: string;
  /**
   * Master keys held in a PKCS#11 token rather than here: the token, and
   * the label of each load master key in it by key version. Such a version
   * has no value in `master.load`.
   */
  token?: { config: TokenConfig; load: Record<string, string> };
  /**
   * Loyalty programmes by code (1000..65535, docs/loyalty.md): the name, and
   * the redeem and earn master keys by key version, hex. Every key version of
   * the issuer has both, so a card of any version can hold the programme's purse.
   */
  programmes?: Record<string, Programme>;
}

/** A loyalty programme's master keys by key version, hex. */
export interface Programme {
  name: string;
  /** MK_points,P,redeem: the programme's PSAMs and clearing verify redemptions with it. */
  redeem: Record<string, string>;
  /** MK_points,P,earn: the programme's security module signs points credits with it. */
  earn: Record<string, string>;
}

/** The default and largest points a card's points purse holds unless told otherwise. */
export const DEFAULT_POINTS_MAX_BALANCE = 1_000_000;

/** Gives every programme both master keys of each of `versions` it lacks; says whether any was added. */
function fillProgrammeKeys(k: Pick<IssuerKeys, "programmes">, versions: number[]): boolean {
  let added = false;
  for (const programme of Object.values(k.programmes ?? {}))
    for (const v of versions)
      for (const role of ["redeem", "earn"] as const)
        if (!programme[role][String(v)]) {
          programme[role][String(v)] = randomBytes(16).toString("hex");
          added = true;
        }
  return added;
}

/** The label of a token-held load master key version, if that version is one. */
const tokenLabelOf = (k: Pick<IssuerKeys, "token">, version: number): string | undefined =>
  k.token && Object.hasOwn(k.token.load, String(version)) ? k.token.load[String(version)] : undefined;

/** Whether the keys hold the master key of this purpose and version, in the file or in the token. */
const holds = (k: IssuerKeys, p: KeyPurpose, version: number) => !!k.master[p][String(version)] || (p === "load" && !!tokenLabelOf(k, version));

/** Keys files made before PSAM verdicts have no verdict master key. */
type StoredKeys = Omit<IssuerKeys, "verdictMaster"> & { verdictMaster?: string };

/** The keys with a verdict master key, made now if the file had none; `added` says whether the file must be written. */
function withVerdictMaster(k: StoredKeys): { keys: IssuerKeys; added: boolean } {
  if (k.verdictMaster) return { keys: { ...k, verdictMaster: k.verdictMaster }, added: false };
  return { keys: { ...k, verdictMaster: randomBytes(16).toString("hex") }, added: true };
}

const MIGRATIONS = [
  `CREATE TABLE cards (
     purse_id TEXT PRIMARY KEY,
     provider_id TEXT NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     max_balance INTEGER NOT NULL,
     expiry TEXT NOT NULL,
     key_version INTEGER NOT NULL,
     personalised_at TEXT NOT NULL
   );
   CREATE TABLE issuer_credits (
     id INTEGER PRIMARY KEY AUTOINCREMENT,
     purse_id TEXT NOT NULL REFERENCES cards(purse_id),
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     reason TEXT NOT NULL,
     credited_at TEXT NOT NULL
   );
   CREATE TABLE psams (
     psam_id TEXT PRIMARY KEY,
     currency INTEGER NOT NULL,
     key_versions TEXT NOT NULL,
     provisioned_at TEXT NOT NULL
   );`,
  // The terminal host each PSAM is provisioned for: the concentrator accepts a PSAM only from it.
  `ALTER TABLE psams ADD COLUMN terminal_id TEXT;`,
];

export class Issuer {
  private constructor(
    readonly dir: string,
    private readonly keys: IssuerKeys,
    readonly db: Db,
  ) {}

  static keysPath(dir: string): string {
    return join(dir, "keys.json");
  }

  /** Creates the master keys for a key version (all purposes); refuses to replace an existing version. */
  static async createKeys(dir: string, keyVersion = 1): Promise<{ created: boolean }> {
    if (keyVersion < 1 || keyVersion > 255) throw new RangeError("key version must be 1..255");
    const path = Issuer.keysPath(dir);
    const { keys, added } = withVerdictMaster(
      existsSync(path)
        ? await readJson<StoredKeys>(path)
        : { format: 1, master: { purchase: {}, load: {}, authentication: {} }, batchMaster: randomBytes(16).toString("hex") },
    );
    // A programme made before a version (or by an older issuer) gets that version's keys here.
    const programmeKeysAdded = fillProgrammeKeys(keys, [keyVersion]);
    if (KEY_PURPOSES.every((p) => holds(keys, p, keyVersion))) {
      if (added || programmeKeysAdded) await writeJsonAtomic(path, keys, { private: true });
      return { created: false };
    }
    for (const p of KEY_PURPOSES) if (!holds(keys, p, keyVersion)) keys.master[p][String(keyVersion)] = randomBytes(16).toString("hex");
    await writeJsonAtomic(path, keys, { private: true });
    return { created: true };
  }

  /** Opens the issuer's keys and registry; a keys file without a verdict master key gets one (written atomically, mode 0600). */
  static async open(dir: string): Promise<Issuer> {
    const path = Issuer.keysPath(dir);
    if (!existsSync(path)) throw new Error(`no issuer keys at ${path}: run 'netpurse-issuer create-keys' first`);
    const { keys, added } = withVerdictMaster(await readJson<StoredKeys>(path));
    if (added) await writeJsonAtomic(path, keys, { private: true });
    return new Issuer(dir, keys, openSqlite(join(dir, "issuer.db"), MIGRATIONS));
  }

  async close(): Promise<void> {
    await this.db.close();
  }

  /** The key versions of a purpose, those held in the token included. */
  keyVersions(purpose: KeyPurpose): number[] {
    const inToken = purpose === "load" && this.keys.token ? Object.keys(this.keys.token.load) : [];
    return [...new Set([...Object.keys(this.keys.master[purpose]), ...inToken])].map(Number).sort((a, b) => a - b);
  }

  /** The key versions of a purpose whose master key is in the keys file. */
  private fileKeyVersions(purpose: KeyPurpose): number[] {
    return Object.keys(this.keys.master[purpose])
      .map(Number)
      .sort((a, b) => a - b);
  }

  private masterKey(purpose: KeyPurpose, version: number): Buffer {
    const hex = this.keys.master[purpose][String(version)];
    if (!hex) {
      if (purpose === "load" && tokenLabelOf(this.keys, version))
        throw new Error(`the load master key of version ${version} is in token ${this.keys.token!.config.tokenLabel}, never out of it`);
      throw new Error(`no ${purpose} master key of version ${version}`);
    }
    return Buffer.from(hex, "hex");
  }

  /**
   * Creates loyalty programme `code` (1000..65535) named `name`: 16 random
   * bytes of redeem and of earn master key for every key version the issuer
   * holds, in the keys file (mode 0600). Refuses a code in use.
   */
  async createProgramme(code: number, name: string): Promise<{ code: number; name: string; keyVersions: number[] }> {
    if (!isProgrammeCode(code)) throw new RangeError(`a programme code is 1000..65535 (1..998 are money currencies, 999 is authentication), not ${code}`);
    const trimmed = name.trim();
    if (!/^[^\p{Cc}]{1,64}$/u.test(trimmed)) throw new RangeError("a programme name is 1..64 characters, no control characters");
    const programmes = (this.keys.programmes ??= {});
    const existing = programmes[String(code)];
    if (existing) throw new RangeError(`programme ${code} exists already ("${existing.name}")`);
    programmes[String(code)] = { name: trimmed, redeem: {}, earn: {} };
    const keyVersions = this.keyVersions("purchase");
    fillProgrammeKeys(this.keys, keyVersions);
    await writeJsonAtomic(Issuer.keysPath(this.dir), this.keys, { private: true });
    return { code, name: trimmed, keyVersions };
  }

  /** The loyalty programmes, by code. */
  programmes(): { code: number; name: string; keyVersions: number[] }[] {
    return Object.entries(this.keys.programmes ?? {})
      .map(([code, p]) => ({
        code: Number(code),
        name: p.name,
        keyVersions: Object.keys(p.redeem)
          .map(Number)
          .sort((a, b) => a - b),
      }))
      .sort((a, b) => a.code - b.code);
  }

  /** A programme's keys; an unknown code is a mistake the issuer explains. */
  private programme(code: number): Programme {
    const p = isProgrammeCode(code) ? this.keys.programmes?.[String(code)] : undefined;
    if (!p) throw new Error(`no loyalty programme ${code} at this issuer: create it first with 'netpurse-issuer create-programme --code ${code} --name NAME'`);
    return p;
  }

  /** A programme's redeem or earn master key of a key version. */
  private programmeKey(code: number, role: "redeem" | "earn", version: number): Buffer {
    const hex = this.programme(code)[role][String(version)];
    if (!hex) throw new Error(`loyalty programme ${code} has no ${role} master key of version ${version}`);
    return Buffer.from(hex, "hex");
  }

  /** A programme's master keys of one role, by key version (hex), as a PSAM or security module holds them. */
  private programmeKeys(code: number, role: "redeem" | "earn"): Record<string, string> {
    return { ...this.programme(code)[role] };
  }

  /** A card's load key: diversified from the file's master key, or inside the token (derived extractable, read once) for a token-held version. */
  private async cardLoadKey(version: number, purseId: Buffer): Promise<Buffer> {
    const label = tokenLabelOf(this.keys, version);
    if (!label) return diversifyCardKey(this.masterKey("load", version), purseId);
    return withToken(this.keys.token!.config, (t) => t.cardKey(label, purseId));
  }

  /**
   * Personalises a software card: diversified keys, purse data, and an
   * initial value recorded as an issuer credit (until loading exists).
   */
  async personaliseCard(p: {
    path: string;
    currency: number;
    exponent: number;
    initialValue: number;
    maxBalance: number;
    expiry: string;
    keyVersion?: number;
    providerId?: string;
    purseId?: string;
    /** Points purses: one per programme, with its initial points and maximum (default DEFAULT_POINTS_MAX_BALANCE). */
    points?: { programme: number; value: number; maxBalance?: number }[];
  }): Promise<CardFile> {
    const keyVersion = p.keyVersion ?? Math.max(...this.keyVersions("purchase"));
    // The money purse's currency must be money: 999 would hide the authentication application, a programme code a points purse.
    if (!isMoneyCurrency(p.currency)) throw new RangeError(`the purse's currency must be an ISO 4217 money code 1..998, not ${p.currency}`);
    if (!(p.maxBalance >= 0 && p.maxBalance <= MAX_CARD_AMOUNT)) throw new RangeError("maximum balance out of range");
    if (!(p.initialValue >= 0 && p.initialValue <= p.maxBalance)) throw new RangeError("initial value must be between 0 and the maximum balance");
    if (!/^\d{4}-\d{2}-\d{2}$/.test(p.expiry)) throw new RangeError("expiry must be YYYY-MM-DD");
    const purseId = p.purseId ?? randomBytes(8).toString("hex");
    if (!/^[0-9a-f]{16}$/.test(purseId)) throw new RangeError("purse id must be 16 hex digits");
    const id = Buffer.from(purseId, "hex");
    // READ PURSE names a points purse by one byte (P1 = 1..255).
    if ((p.points?.length ?? 0) > 255) throw new RangeError("a card holds at most 255 points purses");
    const points: PointsPurseFile[] = [];
    for (const q of p.points ?? []) {
      this.programme(q.programme);
      if (points.some((x) => x.programme === q.programme)) throw new RangeError(`programme ${q.programme} twice: a card holds one points purse per programme`);
      const maxBalance = q.maxBalance ?? DEFAULT_POINTS_MAX_BALANCE;
      if (!(Number.isInteger(maxBalance) && maxBalance >= 0 && maxBalance <= MAX_CARD_AMOUNT))
        throw new RangeError(`programme ${q.programme}: maximum points out of range`);
      if (!(Number.isInteger(q.value) && q.value >= 0 && q.value <= maxBalance))
        throw new RangeError(`programme ${q.programme}: initial points must be whole and between 0 and the maximum (${maxBalance})`);
      points.push({
        programme: q.programme,
        balance: q.value,
        maxBalance,
        keys: {
          redeem: diversifyCardKey(this.programmeKey(q.programme, "redeem", keyVersion), id).toString("hex"),
          earn: diversifyCardKey(this.programmeKey(q.programme, "earn", keyVersion), id).toString("hex"),
        },
      });
    }
    const card: CardFile = {
      format: 1,
      providerId: p.providerId ?? "4e500001",
      purseId,
      currency: p.currency,
      exponent: p.exponent,
      balance: p.initialValue,
      maxBalance: p.maxBalance,
      expiry: p.expiry,
      counter: 0,
      keyVersion,
      status: "active",
      keys: {
        purchase: diversifyCardKey(this.masterKey("purchase", keyVersion), id).toString("hex"),
        load: (await this.cardLoadKey(keyVersion, id)).toString("hex"),
        authentication: diversifyCardKey(this.masterKey("authentication", keyVersion), id).toString("hex"),
      },
      log: [],
      ...(points.length ? { points } : {}),
    };
    const now = new Date().toISOString();
    await this.db.transaction(async (tx) => {
      await tx.run(
        "INSERT INTO cards (purse_id, provider_id, currency, exponent, max_balance, expiry, key_version, personalised_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [purseId, card.providerId, p.currency, p.exponent, p.maxBalance, p.expiry, keyVersion, now],
      );
      if (p.initialValue > 0) {
        await tx.run("INSERT INTO issuer_credits (purse_id, amount_minor, currency, reason, credited_at) VALUES (?, ?, ?, ?, ?)", [
          purseId,
          p.initialValue,
          p.currency,
          "initial value at personalisation",
          now,
        ]);
      }
      // Points are credited in the programme's unit (its code as the currency), apart from the money.
      for (const q of points) {
        if (q.balance === 0) continue;
        await tx.run("INSERT INTO issuer_credits (purse_id, amount_minor, currency, reason, credited_at) VALUES (?, ?, ?, ?, ?)", [
          purseId,
          q.balance,
          q.programme,
          "initial points at personalisation",
          now,
        ]);
      }
      await SoftwareCard.write(p.path, card); // inside the transaction: no card without its record
    });
    return card;
  }

  /**
   * Provisions a software PSAM into `path`, for the terminal host `terminalId` (without one, no concentrator
   * accepts it until it is assigned), with its batch key, its verdict key and, as its "purchase" keys, the
   * master keys of every version that verify the cards' signatures in its currency: the purchase keys for
   * a money currency, the authentication keys for currency 999, a programme's redeem keys for its code.
   */
  async provisionPsam(p: { path: string; currency: number; terminalId?: string; psamId?: string; batchCapacity?: number }): Promise<PsamFile> {
    const psamId = p.psamId ?? randomBytes(4).toString("hex");
    if (!/^[0-9a-f]{8}$/.test(psamId)) throw new RangeError("PSAM id must be 8 hex digits");
    let purchaseKeys: Record<string, string> = {};
    if (isProgrammeCode(p.currency)) purchaseKeys = this.programmeKeys(p.currency, "redeem");
    else if (p.currency === AUTHENTICATION_CURRENCY)
      for (const v of this.keyVersions("authentication")) purchaseKeys[String(v)] = this.masterKey("authentication", v).toString("hex");
    else if (isMoneyCurrency(p.currency)) for (const v of this.keyVersions("purchase")) purchaseKeys[String(v)] = this.masterKey("purchase", v).toString("hex");
    else throw new RangeError(`currency must be 1..998 (money), 999 (authentication) or a programme code 1000..65535, not ${p.currency}`);
    const file: PsamFile = {
      format: 1,
      psamId,
      currency: p.currency,
      purchaseKeys,
      batchKey: this.psamBatchKey(psamId).toString("hex"),
      verdictKey: this.psamVerdictKey(psamId).toString("hex"),
      batchCapacity: p.batchCapacity ?? 256,
      counter: 0,
      batchNumber: 1,
      batch: [],
      pending: [],
      blockedPurses: [],
      settled: [],
    };
    await this.db.transaction(async (tx) => {
      await tx.run("INSERT INTO psams (psam_id, currency, key_versions, provisioned_at, terminal_id) VALUES (?, ?, ?, ?, ?)", [
        psamId,
        p.currency,
        Object.keys(purchaseKeys).join(","),
        new Date().toISOString(),
        p.terminalId ?? null,
      ]);
      await SoftwarePsam.write(p.path, file);
    });
    return file;
  }
  /** Assigns a provisioned PSAM to the terminal host that holds it (a PSAM moved to another host is assigned again). */
  async assignPsam(psamId: string, terminalId: string): Promise<void> {
    const r = await this.db.run("UPDATE psams SET terminal_id = ? WHERE psam_id = ?", [terminalId, psamId]);
    if (r.changes !== 1) throw new Error(`PSAM ${psamId} was never provisioned by this issuer`);
  }

  /** The terminal each provisioned PSAM is assigned to, as the concentrator reads it. */
  async psamRegistry(): Promise<PsamRegistryFile> {
    const rows = await this.db.all<{ psam_id: string; terminal_id: string }>(
      "SELECT psam_id, terminal_id FROM psams WHERE terminal_id IS NOT NULL ORDER BY terminal_id, psam_id",
    );
    return { psams: rows.map((r) => ({ psamId: r.psam_id, terminalId: r.terminal_id })) };
  }

  /** Writes the PSAM registry for the concentrator (a file it follows: a new export takes effect within seconds). */
  async exportPsamRegistry(path: string): Promise<PsamRegistryFile> {
    const registry = await this.psamRegistry();
    await writeJsonAtomic(path, registry);
    return registry;
  }

  /**
   * Provisions the load server's software security module with every load
   * master key version in the keys file (not those held in a token). It is
   * the one place outside the issuer that holds them, as a hardware security
   * module would.
   */
  async provisionHsm(p: { path: string; hsmId?: string }): Promise<HsmFile> {
    const hsmId = p.hsmId ?? randomBytes(4).toString("hex");
    if (!/^[0-9a-f]{8}$/.test(hsmId)) throw new RangeError("security module id must be 8 hex digits");
    const loadKeys: Record<string, string> = {};
    for (const v of this.fileKeyVersions("load")) loadKeys[String(v)] = this.masterKey("load", v).toString("hex");
    const file: HsmFile = { format: 1, hsmId, loadKeys, counter: 0 };
    await SoftwareHsm.write(p.path, file);
    return file;
  }

  /**
   * Provisions a loyalty programme's security module (docs/loyalty.md): the
   * load server's software module, holding the programme's EARN master keys
   * of every key version as its load keys, so that it signs points credits
   * and nothing else. Written to `path` (mode 0600). Provisioning the same
   * module id again over its file keeps its counter: a counter used twice
   * would give a card the same session key twice.
   */
  async provisionProgrammeHsm(p: { path: string; programme: number; hsmId?: string }): Promise<HsmFile> {
    const loadKeys = this.programmeKeys(p.programme, "earn");
    if (p.hsmId !== undefined && !/^[0-9a-f]{8}$/.test(p.hsmId)) throw new RangeError("security module id must be 8 hex digits");
    const before = existsSync(p.path) ? await readJson<{ hsmId?: unknown; counter?: unknown }>(p.path) : undefined;
    const beforeId = typeof before?.hsmId === "string" && /^[0-9a-f]{8}$/.test(before.hsmId) ? before.hsmId : undefined;
    const hsmId = p.hsmId ?? beforeId ?? randomBytes(4).toString("hex");
    const counter = hsmId === beforeId && Number.isInteger(before?.counter) ? (before!.counter as number) : 0;
    const file: HsmFile = { format: 1, kind: "software", hsmId, loadKeys, counter };
    await SoftwareHsm.write(p.path, file);
    return file;
  }

  /**
   * Provisions the load server's security module on a PKCS#11 token. The
   * token labelled `token.tokenLabel` is used, or initialised (a free one,
   * with `soPin` and the configuration's user PIN) when there is none; the
   * load master key of `keyVersion` is generated in it (sensitive, never
   * extractable, for derivation only) unless it holds it already. The keys
   * file records that version as the token's, with purchase and
   * authentication keys of the same version in the file as usual. The load
   * server's `path` (DATA/load/hsm.json) then names the token and every
   * token-held version; the module id and counter of a file already there
   * are kept, so that no counter is used twice.
   */
  async provisionTokenHsm(p: { path: string; token: TokenConfig; soPin: string; keyVersion?: number; hsmId?: string }): Promise<{
    file: Pkcs11HsmFile;
    keyVersion: number;
    generated: boolean;
    initialised: boolean;
  }> {
    const current = this.keys.token?.config;
    if (current && (current.module !== p.token.module || current.tokenLabel !== p.token.tokenLabel)) {
      throw new Error(`this issuer's token-held keys are in token ${current.tokenLabel} of ${current.module}; provision that token`);
    }
    const held = this.keys.token ? Object.keys(this.keys.token.load).map(Number) : [];
    const keyVersion = p.keyVersion ?? (held.length ? Math.max(...held) : Math.max(0, ...this.keyVersions("purchase")) + 1);
    if (!Number.isInteger(keyVersion) || keyVersion < 1 || keyVersion > 255) throw new RangeError("key version must be 1..255");
    if (this.keys.master.load[String(keyVersion)]) {
      throw new RangeError(
        `the load master key of version ${keyVersion} is in the keys file; a token-held key is generated in the token, for a version of its own (--key-version ${Math.max(...this.keyVersions("load")) + 1})`,
      );
    }
    if (p.hsmId !== undefined && !/^[0-9a-f]{8}$/.test(p.hsmId)) throw new RangeError("security module id must be 8 hex digits");
    const token = tokenConfigOf(p.token);
    const initialised = await ensureToken(token, p.soPin);
    const label = loadMasterKeyLabel(keyVersion);
    const generated = await withToken(token, (t) => {
      if (t.findSecretKey(label)) return false;
      t.generateMasterKey(label);
      return true;
    });
    for (const purpose of KEY_PURPOSES) if (purpose !== "load") this.keys.master[purpose][String(keyVersion)] ??= randomBytes(16).toString("hex");
    fillProgrammeKeys(this.keys, [keyVersion]);
    this.keys.token = { config: token, load: { ...this.keys.token?.load, [String(keyVersion)]: label } };
    await writeJsonAtomic(Issuer.keysPath(this.dir), this.keys, { private: true });

    const before = existsSync(p.path) ? await readJson<{ hsmId?: unknown; counter?: unknown }>(p.path) : undefined;
    const beforeId = typeof before?.hsmId === "string" && /^[0-9a-f]{8}$/.test(before.hsmId) ? before.hsmId : undefined;
    const hsmId = p.hsmId ?? beforeId ?? randomBytes(4).toString("hex");
    // The same module id goes on counting where it was: a counter used again would give a card the same session key twice.
    const counter = hsmId === beforeId && Number.isInteger(before?.counter) ? (before!.counter as number) : 0;
    const file: Pkcs11HsmFile = { format: 1, kind: "pkcs11", hsmId, ...token, loadKeys: { ...this.keys.token.load }, counter };
    await writeJsonAtomic(p.path, file, { private: true });
    return { file, keyVersion, generated, initialised };
  }

  /**
   * Gives a software PSAM provisioned before PSAM verdicts its verdict key,
   * keeping everything else it holds (counter, open debits, batch). Run it
   * while the PSAM's terminal host is stopped. `added` is false when the PSAM
   * had its key already.
   */
  async addVerdictKey(path: string): Promise<{ psamId: string; added: boolean }> {
    const file = await readState<Omit<PsamFile, "verdictKey"> & { verdictKey?: string }>(path);
    if (file.format !== 1) throw new Error(`${path}: unknown PSAM file format ${String(file.format)}`);
    if (!/^[0-9a-f]{8}$/.test(file.psamId)) throw new Error(`${path}: not a PSAM file (no 8-hex-digit PSAM id)`);
    const key = this.psamVerdictKey(file.psamId).toString("hex");
    if (file.verdictKey === key) return { psamId: file.psamId, added: false };
    if (file.verdictKey !== undefined) throw new Error(`${path}: PSAM ${file.psamId} holds another verdict key than this issuer's; provision it again`);
    await SoftwarePsam.write(path, { ...file, verdictKey: key });
    return { psamId: file.psamId, added: true };
  }

  /**
   * Writes the verdict master key for the payment operator's security module
   * (mode 0600), which derives each PSAM's verdict key from it to check the
   * PSAMs' MACs. The payment server reads it from DATA/payment/psam-verdict-key.json.
   */
  async exportVerdictKey(path: string): Promise<void> {
    const file: VerdictKeyFile = { format: 1, verdictMaster: this.keys.verdictMaster };
    await writeJsonAtomic(path, file, { private: true });
  }

  /**
   * Writes clearing's security module keys (mode 0600): every purchase and
   * load master key version, to check card signatures and S3s, and the batch
   * master key, to check the PSAMs' batch MACs; a load key version held in a
   * token as a reference to the token and the key's label; each loyalty
   * programme's redeem master keys, to check points redemptions. Clearing reads
   * them from DATA/clearing/keys.json. Rewriting it after a new key version
   * is safe.
   */
  async exportClearingKeys(path: string, issuerId = DEMO_ISSUER_ID): Promise<ClearingKeysFile> {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(issuerId)) throw new RangeError("issuer id must be 1..64 characters of [A-Za-z0-9._-]");
    const versions = (purpose: KeyPurpose) =>
      Object.fromEntries(this.fileKeyVersions(purpose).map((v) => [String(v), this.masterKey(purpose, v).toString("hex")]));
    const programmes = Object.entries(this.keys.programmes ?? {});
    const file: ClearingKeysFile = {
      format: 1,
      issuerId,
      purchaseKeys: versions("purchase"),
      loadKeys: versions("load"),
      batchMaster: this.keys.batchMaster,
      // Only the redeem keys: clearing verifies redemptions; points credits are the programme module's.
      ...(programmes.length ? { programmeKeys: Object.fromEntries(programmes.map(([code, p]) => [code, { ...p.redeem }])) } : {}),
      // Token-held load keys by reference only: clearing checks their S1s and S3s in the token.
      ...(this.keys.token ? { tokenLoadKeys: { token: this.keys.token.config, labels: { ...this.keys.token.load } } } : {}),
    };
    await writeJsonAtomic(path, file, { private: true });
    return file;
  }

  /** A PSAM's batch key: the acquirer's batch master key diversified by the PSAM id. */
  psamBatchKey(psamId: string): Buffer {
    return diversifyPsamKey(Buffer.from(this.keys.batchMaster, "hex"), Buffer.from(psamId, "hex"));
  }

  /** A PSAM's verdict key: the verdict master key diversified by the PSAM id, exactly like its batch key. */
  psamVerdictKey(psamId: string): Buffer {
    return diversifyPsamKey(Buffer.from(this.keys.verdictMaster, "hex"), Buffer.from(psamId, "hex"));
  }

  /**
   * What the issuer put on a card at personalisation (its issuer credits),
   * in the card's currency: the opening value the audit adds to the card's
   * loads. Undefined for a card this issuer never personalised.
   */
  async openingValue(purseId: string): Promise<{ amountMinor: number; currency: number; exponent: number } | undefined> {
    const row = await this.db.get<{ currency: number; exponent: number; credited: number }>(
      `SELECT c.currency, c.exponent, COALESCE(SUM(k.amount_minor), 0) AS credited
         FROM cards c LEFT JOIN issuer_credits k ON k.purse_id = c.purse_id AND k.currency = c.currency
        WHERE c.purse_id = ? GROUP BY c.purse_id`,
      [purseId],
    );
    return row ? { amountMinor: row.credited, currency: row.currency, exponent: row.exponent } : undefined;
  }

  async listCards(): Promise<{ purse_id: string; currency: number; expiry: string; key_version: number; credited: number }[]> {
    return this.db.all(
      `SELECT c.purse_id, c.currency, c.expiry, c.key_version, COALESCE(SUM(k.amount_minor), 0) AS credited
         FROM cards c LEFT JOIN issuer_credits k ON k.purse_id = c.purse_id AND k.currency = c.currency
        GROUP BY c.purse_id ORDER BY c.personalised_at`,
    );
  }
}
