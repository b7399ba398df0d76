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
import { MAX_CARD_AMOUNT } from "../../lib/money.js";
import { diversifyPsamKey } from "../../lib/protocol/psam.js";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
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
    if (KEY_PURPOSES.every((p) => holds(keys, p, keyVersion))) {
      if (added) await writeJsonAtomic(path, keys, { private: true });
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
  }): Promise<CardFile> {
    const keyVersion = p.keyVersion ?? Math.max(...this.keyVersions("purchase"));
    if (!(p.maxBalance >= 0 && p.maxBalance <= MAX_CARD_AMOUNT)) throw new RangeError("maximum balance out of range");
    if (!(p.initialValue >= 0 && p.initialValue <= p.maxBalance)) throw new RangeError("initial value must be between 0 and the maximum balance");
    if (!/^\d{4}-\d{2}-\d{2}$/.test(p.expiry)) throw new RangeError("expiry must be YYYY-MM-DD");
    const purseId = p.purseId ?? randomBytes(8).toString("hex");
    if (!/^[0-9a-f]{16}$/.test(purseId)) throw new RangeError("purse id must be 16 hex digits");
    const id = Buffer.from(purseId, "hex");
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
      await SoftwareCard.write(p.path, card); // inside the transaction: no card without its record
    });
    return card;
  }

  /** Provisions a software PSAM with every purchase key version, its batch key and its verdict key. */
  /** Provisions a software PSAM into `path`, for the terminal host `terminalId` (without one, no concentrator accepts it until it is assigned). */
  async provisionPsam(p: { path: string; currency: number; terminalId?: string; psamId?: string; batchCapacity?: number }): Promise<PsamFile> {
    const psamId = p.psamId ?? randomBytes(4).toString("hex");
    if (!/^[0-9a-f]{8}$/.test(psamId)) throw new RangeError("PSAM id must be 8 hex digits");
    const purchaseKeys: Record<string, string> = {};
    for (const v of this.keyVersions("purchase")) purchaseKeys[String(v)] = this.masterKey("purchase", v).toString("hex");
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
   * token as a reference to the token and the key's label. Clearing reads
   * them from DATA/clearing/keys.json. Rewriting it after a new key version
   * is safe.
   */
  async exportClearingKeys(path: string, issuerId = DEMO_ISSUER_ID): Promise<ClearingKeysFile> {
    if (!/^[A-Za-z0-9._-]{1,64}$/.test(issuerId)) throw new RangeError("issuer id must be 1..64 characters of [A-Za-z0-9._-]");
    const versions = (purpose: KeyPurpose) =>
      Object.fromEntries(this.fileKeyVersions(purpose).map((v) => [String(v), this.masterKey(purpose, v).toString("hex")]));
    const file: ClearingKeysFile = {
      format: 1,
      issuerId,
      purchaseKeys: versions("purchase"),
      loadKeys: versions("load"),
      batchMaster: this.keys.batchMaster,
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
         FROM cards c LEFT JOIN issuer_credits k ON k.purse_id = c.purse_id
        WHERE c.purse_id = ? GROUP BY c.purse_id`,
      [purseId],
    );
    return row ? { amountMinor: row.credited, currency: row.currency, exponent: row.exponent } : undefined;
  }

  async listCards(): Promise<{ purse_id: string; currency: number; expiry: string; key_version: number; credited: number }[]> {
    return this.db.all(
      `SELECT c.purse_id, c.currency, c.expiry, c.key_version, COALESCE(SUM(k.amount_minor), 0) AS credited
         FROM cards c LEFT JOIN issuer_credits k ON k.purse_id = c.purse_id
        GROUP BY c.purse_id ORDER BY c.personalised_at`,
    );
  }
}
