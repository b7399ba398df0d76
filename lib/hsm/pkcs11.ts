// A PKCS#11 token holding the issuer's load master keys (SoftHSM2, or an
// HSM's PKCS#11 module), through the optional binding pkcs11js. The master
// keys are generated in the token and never leave it: a card's key and its
// session key are derived inside it as session objects, MACs are computed
// inside it, and the derived objects are destroyed after use. The load
// server's module (services/load/pkcs11-hsm.ts), clearing's S1/S3 checks and
// the issuer's personalisation share this wrapper.
//
// pkcs11js is loaded with a dynamic import only when a token is opened, so
// that the software path never needs it. Its calls are synchronous: an
// operation (derive, MAC, destroy) runs to its end before any other code of
// this process touches the session.

import { createHash, timingSafeEqual } from "node:crypto";
import { existsSync, readFileSync, realpathSync, statSync } from "node:fs";
import { diversificationBlock, sessionBlock, type SessionData } from "../crypto/keys.js";
import { SecurityModuleUnavailable } from "./unavailable.js";

export { SecurityModuleUnavailable };

/** Where the token is and how to log in to it; kept in the services' configuration files. */
export interface TokenConfig {
  /** The PKCS#11 module (shared library), e.g. /usr/lib/softhsm/libsofthsm2.so. */
  module: string;
  /** The token's label. */
  tokenLabel: string;
  /** The file holding the user PIN (mode 0600, read at each login); without one, $NETPURSE_HSM_PIN. */
  pinFile?: string;
  /** SoftHSM2's configuration (it names the token folder): set as SOFTHSM2_CONF before the module initialises. */
  softhsm2Conf?: string;
}

/** The token part of a configuration file, as the wrapper takes it. */
export function tokenConfigOf(f: TokenConfig): TokenConfig {
  return {
    module: f.module,
    tokenLabel: f.tokenLabel,
    ...(f.pinFile !== undefined ? { pinFile: f.pinFile } : {}),
    ...(f.softhsm2Conf !== undefined ? { softhsm2Conf: f.softhsm2Conf } : {}),
  };
}

/** The label of the load master key of a key version, in the token. */
export const loadMasterKeyLabel = (keyVersion: number) => `netpurse-load-mk-v${keyVersion}`;

/** The binding is not there: pkcs11js is an optional dependency with a native part. */
export class Pkcs11NotInstalled extends Error {
  override readonly name = "Pkcs11NotInstalled";
}

type Handle = Buffer;
interface Attribute {
  type: number;
  value?: number | boolean | string | Buffer;
}
interface Mechanism {
  mechanism: number;
  parameter?: Buffer | number | { type: number; [field: string]: unknown };
}

/** The part of pkcs11js's PKCS11 class netpurse uses (declared here so that type checking does not need the optional package). */
export interface Pkcs11Api {
  load(path: string): void;
  C_Initialize(): void;
  C_Finalize(): void;
  C_GetSlotList(tokenPresent?: boolean): Handle[];
  C_GetTokenInfo(slot: Handle): { label: string; flags: number };
  C_InitToken(slot: Handle, pin: string, label: string): string;
  C_InitPIN(session: Handle, pin: string): void;
  C_OpenSession(slot: Handle, flags: number): Handle;
  C_CloseSession(session: Handle): void;
  C_Login(session: Handle, userType: number, pin: string): void;
  C_Logout(session: Handle): void;
  C_FindObjectsInit(session: Handle, template: Attribute[]): void;
  C_FindObjects(session: Handle, max: number): Handle[];
  C_FindObjectsFinal(session: Handle): void;
  C_CreateObject(session: Handle, template: Attribute[]): Handle;
  C_GenerateKey(session: Handle, mechanism: Mechanism, template: Attribute[]): Handle;
  C_DeriveKey(session: Handle, mechanism: Mechanism, base: Handle, template: Attribute[]): Handle;
  C_GetAttributeValue(session: Handle, object: Handle, template: Attribute[]): { type: number; value: Buffer }[];
  C_SetAttributeValue(session: Handle, object: Handle, template: Attribute[]): void;
  C_DestroyObject(session: Handle, object: Handle): void;
  C_SignInit(session: Handle, mechanism: Mechanism, key: Handle): void;
  C_Sign(session: Handle, data: Buffer, out: Buffer): Buffer;
  C_WrapKey(session: Handle, mechanism: Mechanism, wrappingKey: Handle, key: Handle, out: Buffer): Buffer;
}

/** pkcs11js: the PKCS11 class, its error classes and the PKCS#11 constants by name. */
export interface Pkcs11Binding {
  PKCS11: new () => Pkcs11Api;
  NativeError: new (...args: never[]) => Error;
  [constant: string]: unknown;
}

const CONSTANTS = [
  "CKA_CLASS",
  "CKA_KEY_TYPE",
  "CKA_TOKEN",
  "CKA_PRIVATE",
  "CKA_LABEL",
  "CKA_VALUE",
  "CKA_VALUE_LEN",
  "CKA_SENSITIVE",
  "CKA_EXTRACTABLE",
  "CKA_DERIVE",
  "CKA_SIGN",
  "CKO_SECRET_KEY",
  "CKK_AES",
  "CKM_AES_KEY_GEN",
  "CKM_AES_CBC_ENCRYPT_DATA",
  "CKM_AES_CMAC",
  "CK_PARAMS_AES_CBC",
  "CKF_SERIAL_SESSION",
  "CKF_RW_SESSION",
  "CKF_TOKEN_INITIALIZED",
  "CKU_SO",
  "CKU_USER",
  "CKR_USER_ALREADY_LOGGED_IN",
  "CKR_PIN_INCORRECT",
  "CKR_PIN_INVALID",
  "CKR_PIN_LEN_RANGE",
  "CKR_PIN_LOCKED",
  "CKR_CRYPTOKI_ALREADY_INITIALIZED",
] as const;
export type Ck = Record<(typeof CONSTANTS)[number], number>;

const INSTALL_HINT =
  "the PKCS#11 security module needs the optional npm package pkcs11js, which is not installed or not built: " +
  "install a PKCS#11 module (Debian: apt-get install softhsm2) and then 'npm install pkcs11js'; " +
  "or provision the software module (netpurse-issuer provision-hsm without --pkcs11)";

/** Loads pkcs11js (the specifier is a parameter only so that a test can name one that is missing). */
export async function loadPkcs11Binding(specifier = "pkcs11js"): Promise<{ binding: Pkcs11Binding; ck: Ck }> {
  let binding: Pkcs11Binding;
  try {
    const m = (await import(specifier)) as { default?: Pkcs11Binding } & Pkcs11Binding;
    binding = m.default ?? m;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === "ERR_MODULE_NOT_FOUND" || code === "MODULE_NOT_FOUND" || code === "ERR_DLOPEN_FAILED") {
      throw new Pkcs11NotInstalled(`${INSTALL_HINT} (${(e as Error).message.split("\n")[0]})`, { cause: e });
    }
    throw e;
  }
  const ck = {} as Ck;
  for (const name of CONSTANTS) {
    const v = binding[name];
    if (typeof v !== "number") throw new Pkcs11NotInstalled(`${specifier} has no constant ${name}: ${INSTALL_HINT}`);
    ck[name] = v;
  }
  return { binding, ck };
}

/**
 * One PKCS#11 module in this process. Cryptoki is initialised once per
 * process, so every token opened on the same module shares this: the first
 * initialises it, the last one closed finalises it. After a failure the
 * module is finalised and initialised again (a new generation), which is
 * how SoftHSM2 and HSMs alike see a token that came back; sessions of an
 * earlier generation are gone and are reopened, not closed.
 */
class LoadedModule {
  api: Pkcs11Api | undefined;
  initialised = false;
  generation = 0;
  users = 0;
  softhsm2Conf: string | undefined;
  /** The SHA-256 of the PIN this process logged in with, by token label: the login is the process's, shared by its sessions. */
  readonly loggedIn = new Map<string, Buffer>();

  constructor(
    readonly path: string,
    private readonly binding: Pkcs11Binding,
    private readonly ck: Ck,
  ) {}

  initialise(): Pkcs11Api {
    if (this.initialised && this.api) return this.api;
    if (this.softhsm2Conf !== undefined) process.env.SOFTHSM2_CONF = this.softhsm2Conf;
    if (!this.api) {
      const api = new this.binding.PKCS11();
      try {
        api.load(this.path);
      } catch (e) {
        throw new SecurityModuleUnavailable(`cannot load the PKCS#11 module ${this.path}: ${(e as Error).message}`);
      }
      this.api = api;
    }
    try {
      this.api.C_Initialize();
    } catch (e) {
      // Initialised already in this process (the same library under another name): share it.
      if ((e as { code?: number }).code !== this.ck.CKR_CRYPTOKI_ALREADY_INITIALIZED) throw e;
    }
    this.initialised = true;
    this.generation++;
    this.loggedIn.clear();
    return this.api;
  }

  finalise(): void {
    if (!this.initialised) return;
    this.initialised = false;
    this.loggedIn.clear();
    try {
      this.api?.C_Finalize();
    } catch {
      // A module that lost its token may fail to finalise; initialising it again is what matters.
    }
  }
}

const modules = new Map<string, LoadedModule>();

interface Connection {
  session: Handle;
  generation: number;
  /** Master key handles found in this session, by label. */
  keys: Map<string, Handle>;
}

/** No login with this PIN: the token is fine, so the module is not initialised again for it (that would cost its other users their sessions). */
class NoLogin extends SecurityModuleUnavailable {}

/** The PIN, from its file (which must be private) or from $NETPURSE_HSM_PIN. Never logged, never in a message. */
function readPin(c: TokenConfig): string {
  if (c.pinFile) {
    let mode: number;
    try {
      mode = statSync(c.pinFile).mode;
    } catch (e) {
      throw new NoLogin(`cannot read the PIN file ${c.pinFile} (${(e as NodeJS.ErrnoException).code ?? "unreadable"})`);
    }
    if (mode & 0o077) throw new NoLogin(`the PIN file ${c.pinFile} is readable by others (mode ${(mode & 0o777).toString(8)}): it must be 0600`);
    const pin = readFileSync(c.pinFile, "utf8").trim();
    if (!pin) throw new NoLogin(`the PIN file ${c.pinFile} is empty`);
    return pin;
  }
  const pin = process.env.NETPURSE_HSM_PIN;
  if (!pin) throw new NoLogin("no PIN: name a PIN file in the configuration or set NETPURSE_HSM_PIN");
  return pin;
}

const digest = (pin: string) => createHash("sha256").update(pin).digest();

/** A PKCS#11 token, logged in as its user, reopened after any failure. */
export class Pkcs11Token {
  private connection: Connection | undefined;
  /** The module generation in which this token last failed: the next use initialises the module again. */
  private failedIn: number | undefined;
  /** The SHA-256 of a PIN the token refused: it is not tried again (an HSM locks a PIN after a few tries) until the PIN changes. */
  private refusedPin: Buffer | undefined;
  private closed = false;

  private constructor(
    readonly binding: Pkcs11Binding,
    readonly ck: Ck,
    readonly config: TokenConfig,
    private readonly module: LoadedModule,
  ) {}

  /**
   * Opens the token's configuration: loads pkcs11js (Pkcs11NotInstalled
   * without it) and registers with the module. It does not reach the token
   * yet: `check()` does, and every operation does again until it succeeds.
   */
  static async open(config: TokenConfig): Promise<Pkcs11Token> {
    const { binding, ck } = await loadPkcs11Binding();
    // One entry per library, whatever path names it (dlopen gives one library per file).
    const key = existsSync(config.module) ? realpathSync(config.module) : config.module;
    let module = modules.get(key);
    if (!module) modules.set(key, (module = new LoadedModule(config.module, binding, ck)));
    if (module.users > 0 && config.softhsm2Conf !== undefined && module.softhsm2Conf !== undefined && module.softhsm2Conf !== config.softhsm2Conf) {
      throw new Error(`${config.module} is already in use in this process with SoftHSM2 configuration ${module.softhsm2Conf}, not ${config.softhsm2Conf}`);
    }
    if (module.users === 0) module.softhsm2Conf = config.softhsm2Conf;
    module.users++;
    return new Pkcs11Token(binding, ck, config, module);
  }

  /** The module's functions, initialised (for setting up a token, before anyone can log in to it). */
  initialisedModule(): Pkcs11Api {
    return this.module.initialise();
  }

  /** Reaches the token now: undefined when it answers, else why it cannot be used (no PIN in it). */
  check(): string | undefined {
    try {
      this.run(() => undefined);
      return undefined;
    } catch (e) {
      if (e instanceof SecurityModuleUnavailable) return e.message;
      throw e;
    }
  }

  /**
   * Runs `operation` in the token's session. Any PKCS#11 failure (the token
   * removed, the session or login lost, a key gone) ends the session and is
   * SecurityModuleUnavailable; the next call opens a new session.
   */
  run<T>(operation: (s: TokenSession) => T): T {
    const c = this.connect();
    try {
      return operation(new TokenSession(this.module.api!, this.ck, c));
    } catch (e) {
      if (!(e instanceof SecurityModuleUnavailable) && !(e instanceof this.binding.NativeError)) throw e;
      this.failedIn = this.module.generation;
      this.drop(c);
      throw e instanceof SecurityModuleUnavailable ? e : new SecurityModuleUnavailable(describe(e), { cause: e });
    }
  }

  /** Ends this token's session; the last token of the module finalises it. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.connection) this.drop(this.connection);
    if (--this.module.users === 0) this.module.finalise();
  }

  private connect(): Connection {
    if (this.closed) throw new Error(`token ${this.config.tokenLabel} was closed`);
    const m = this.module;
    if (this.connection && this.connection.generation === m.generation && m.initialised) return this.connection;
    // A session of an earlier generation died with it: its handle may now be another session's.
    this.connection = undefined;
    if (this.failedIn !== undefined && this.failedIn === m.generation) m.finalise();
    try {
      const api = m.initialise();
      const slot = this.slot(api);
      const pin = readPin(this.config);
      const pinDigest = digest(pin);
      if (this.refusedPin && timingSafeEqual(this.refusedPin, pinDigest)) {
        throw new NoLogin(`token ${this.config.tokenLabel} refused this PIN before; it is not tried again until the PIN changes`);
      }
      const session = api.C_OpenSession(slot, this.ck.CKF_SERIAL_SESSION | this.ck.CKF_RW_SESSION);
      try {
        this.login(api, session, pinDigest, pin);
      } catch (e) {
        try {
          api.C_CloseSession(session);
        } catch {
          // the login failure is what counts
        }
        throw e;
      }
      this.connection = { session, generation: m.generation, keys: new Map() };
      this.failedIn = undefined;
      return this.connection;
    } catch (e) {
      if (!(e instanceof NoLogin)) this.failedIn = m.generation;
      if (e instanceof SecurityModuleUnavailable) throw e;
      if (e instanceof this.binding.NativeError) throw new SecurityModuleUnavailable(describe(e), { cause: e });
      throw e;
    }
  }

  private login(api: Pkcs11Api, session: Handle, pinDigest: Buffer, pin: string): void {
    const label = this.config.tokenLabel;
    try {
      api.C_Login(session, this.ck.CKU_USER, pin);
      this.module.loggedIn.set(label, pinDigest);
    } catch (e) {
      const code = (e as { code?: number }).code;
      if (code === this.ck.CKR_USER_ALREADY_LOGGED_IN) {
        // Another part of this process logged in: the token does not look at this PIN, so compare it with that one.
        const known = this.module.loggedIn.get(label);
        if (known && !timingSafeEqual(known, pinDigest)) {
          this.refusedPin = pinDigest;
          throw new NoLogin(`token ${label}: this PIN is not the one this process logged in with`);
        }
        return;
      }
      if (code === this.ck.CKR_PIN_INCORRECT || code === this.ck.CKR_PIN_INVALID || code === this.ck.CKR_PIN_LEN_RANGE || code === this.ck.CKR_PIN_LOCKED) {
        this.refusedPin = pinDigest;
        throw new NoLogin(`token ${label} refused the PIN (${(e as Error).message})`);
      }
      throw e;
    }
  }

  private slot(api: Pkcs11Api): Handle {
    const slot = findSlot(api, this.config.tokenLabel);
    if (!slot) throw new SecurityModuleUnavailable(`no token labelled ${this.config.tokenLabel} in ${this.config.module}`);
    return slot;
  }

  private drop(c: Connection): void {
    if (this.connection === c) this.connection = undefined;
    if (c.generation !== this.module.generation || !this.module.initialised) return;
    try {
      this.module.api?.C_CloseSession(c.session);
    } catch {
      // a session the token lost is closed already
    }
  }
}

function findSlot(api: Pkcs11Api, label: string): Handle | undefined {
  // The label is 32 bytes, padded with blanks (or, as some bindings write it, NULs).
  for (const slot of api.C_GetSlotList(true)) if (api.C_GetTokenInfo(slot).label.replace(/[\s\0]+$/, "") === label) return slot;
  return undefined;
}

/** A PKCS#11 failure as one line: the function and the CKR_ code, never an argument. */
function describe(e: unknown): string {
  const err = e as Error & { method?: string };
  return err.method ? `${err.method}: ${err.message}` : err.message;
}

/** The operations on a logged-in session. Keys derived here are session objects, destroyed after use. */
export class TokenSession {
  constructor(
    /** The module's functions and the session, for what this class does not wrap (the tests' fixtures). */
    readonly api: Pkcs11Api,
    readonly ck: Ck,
    private readonly c: Connection,
  ) {}

  get session(): Handle {
    return this.c.session;
  }

  /** The secret key labelled so, if the token holds one. */
  findSecretKey(label: string): Handle | undefined {
    const cached = this.c.keys.get(label);
    if (cached) return cached;
    const { api, ck } = this;
    api.C_FindObjectsInit(this.session, [
      { type: ck.CKA_CLASS, value: ck.CKO_SECRET_KEY },
      { type: ck.CKA_LABEL, value: label },
    ]);
    let found: Handle[];
    try {
      found = api.C_FindObjects(this.session, 2);
    } finally {
      api.C_FindObjectsFinal(this.session);
    }
    if (found.length > 1) throw new SecurityModuleUnavailable(`token holds ${found.length} keys labelled ${label}: it must hold one`);
    if (found[0]) this.c.keys.set(label, found[0]);
    return found[0];
  }

  /** The master key labelled so; a token without it is not the one provisioned, so it is unavailable. */
  masterKey(label: string): Handle {
    const key = this.findSecretKey(label);
    if (!key) throw new SecurityModuleUnavailable(`the token holds no key labelled ${label}`);
    return key;
  }

  /**
   * Generates a 16-byte AES master key in the token: a token object,
   * private, sensitive and never extractable, usable only to derive card
   * keys (CKA_LOCAL tells anyone that it was made there).
   */
  generateMasterKey(label: string): Handle {
    const { ck } = this;
    return this.api.C_GenerateKey(this.session, { mechanism: ck.CKM_AES_KEY_GEN }, [
      { type: ck.CKA_CLASS, value: ck.CKO_SECRET_KEY },
      { type: ck.CKA_KEY_TYPE, value: ck.CKK_AES },
      { type: ck.CKA_VALUE_LEN, value: 16 },
      { type: ck.CKA_LABEL, value: label },
      { type: ck.CKA_TOKEN, value: true },
      { type: ck.CKA_PRIVATE, value: true },
      { type: ck.CKA_SENSITIVE, value: true },
      { type: ck.CKA_EXTRACTABLE, value: false },
      { type: ck.CKA_DERIVE, value: true },
      { type: ck.CKA_SIGN, value: false },
    ]);
  }

  /**
   * Derives AES-ECB(base, block) as a new AES key, a session object. The
   * PKCS#11 mechanism for that is CKM_AES_ECB_ENCRYPT_DATA, but pkcs11js
   * cannot pass its parameter (a structure holding a pointer); for one block
   * CBC with a zero IV is the same encryption, and CKM_AES_CBC_ENCRYPT_DATA's
   * parameter it can pass. Readable only when `extractable` (personalisation).
   */
  deriveKey(base: Handle, block: Buffer, o: { extractable?: boolean } = {}): Handle {
    if (block.length !== 16) throw new RangeError(`derivation needs one 16-byte block, got ${block.length}`);
    const { ck } = this;
    const readable = o.extractable === true;
    return this.api.C_DeriveKey(
      this.session,
      { mechanism: ck.CKM_AES_CBC_ENCRYPT_DATA, parameter: { type: ck.CK_PARAMS_AES_CBC, iv: Buffer.alloc(16), data: block } },
      base,
      [
        { type: ck.CKA_CLASS, value: ck.CKO_SECRET_KEY },
        { type: ck.CKA_KEY_TYPE, value: ck.CKK_AES },
        { type: ck.CKA_VALUE_LEN, value: 16 },
        { type: ck.CKA_TOKEN, value: false },
        { type: ck.CKA_PRIVATE, value: true },
        { type: ck.CKA_SENSITIVE, value: !readable },
        { type: ck.CKA_EXTRACTABLE, value: readable },
        { type: ck.CKA_DERIVE, value: true },
        { type: ck.CKA_SIGN, value: true },
      ],
    );
  }

  /** Runs `use` with a derived key and destroys the key afterwards, whatever happened. */
  withDerivedKey<T>(base: Handle, block: Buffer, use: (key: Handle) => T, o: { extractable?: boolean } = {}): T {
    const key = this.deriveKey(base, block, o);
    try {
      return use(key);
    } finally {
      this.destroy(key);
    }
  }

  destroy(object: Handle): void {
    try {
      this.api.C_DestroyObject(this.session, object);
    } catch {
      // a session object dies with its session anyway; a failing token shows in the operation itself
    }
  }

  /** AES-CMAC of `message` under `key` in the token: the full 16 bytes. */
  cmac(key: Handle, message: Buffer): Buffer {
    this.api.C_SignInit(this.session, { mechanism: this.ck.CKM_AES_CMAC }, key);
    return Buffer.from(this.api.C_Sign(this.session, message, Buffer.alloc(16)));
  }

  /** The value of a key the token lets out (only a derived, extractable one does). */
  value(key: Handle): Buffer {
    const [attribute] = this.api.C_GetAttributeValue(this.session, key, [{ type: this.ck.CKA_VALUE }]);
    return Buffer.from(attribute!.value);
  }

  /** The 8-byte MAC (lib/crypto/cmac.ts mac8) of `message` under a card's key K_card = AES(master, D(purse id)), derived in the token. */
  cardMac(masterLabel: string, purseId: Buffer, message: Buffer): Buffer {
    return this.withDerivedKey(this.masterKey(masterLabel), diversificationBlock(purseId), (card) => this.cmac(card, message).subarray(0, 8));
  }

  /** The 8-byte MAC of `message` under a card's session key, derived in the token from its card key. */
  sessionMac(masterLabel: string, purseId: Buffer, session: SessionData, message: Buffer): Buffer {
    return this.withDerivedKey(this.masterKey(masterLabel), diversificationBlock(purseId), (card) =>
      this.withDerivedKey(card, sessionBlock(session), (key) => this.cmac(key, message).subarray(0, 8)),
    );
  }

  /** A card's key, to write into the card at personalisation: derived extractable, read once, destroyed; the master stays inside. */
  cardKey(masterLabel: string, purseId: Buffer): Buffer {
    return this.withDerivedKey(this.masterKey(masterLabel), diversificationBlock(purseId), (card) => this.value(card), { extractable: true });
  }
}

/**
 * Makes sure a token labelled `config.tokenLabel` exists: if none does, the
 * first uninitialised token of the module (SoftHSM2 always keeps one free)
 * is initialised with that label and the security officer's PIN, and its
 * user PIN is set to the configuration's. Returns whether it initialised one.
 */
export async function ensureToken(config: TokenConfig, soPin: string): Promise<boolean> {
  const token = await Pkcs11Token.open(config);
  try {
    const api = token.initialisedModule();
    const { ck } = token;
    if (findSlot(api, config.tokenLabel)) return false;
    const free = api.C_GetSlotList(true).find((s) => (api.C_GetTokenInfo(s).flags & ck.CKF_TOKEN_INITIALIZED) === 0);
    if (!free) throw new Error(`${config.module} has no token labelled ${config.tokenLabel} and no free token to initialise`);
    const userPin = readPin(config);
    if (Buffer.byteLength(config.tokenLabel) > 32) throw new RangeError(`a token label has at most 32 bytes: ${config.tokenLabel}`);
    api.C_InitToken(free, soPin, config.tokenLabel.padEnd(32 - Buffer.byteLength(config.tokenLabel) + config.tokenLabel.length, " "));
    const slot = findSlot(api, config.tokenLabel);
    if (!slot) throw new Error(`token ${config.tokenLabel} was initialised but is not listed`);
    const session = api.C_OpenSession(slot, ck.CKF_SERIAL_SESSION | ck.CKF_RW_SESSION);
    try {
      api.C_Login(session, ck.CKU_SO, soPin);
      api.C_InitPIN(session, userPin);
      api.C_Logout(session);
    } finally {
      api.C_CloseSession(session);
    }
    return true;
  } finally {
    token.close();
  }
}

/** Opens a token, runs `use` in its session and closes it: for the issuer's occasional work. */
export async function withToken<T>(config: TokenConfig, use: (s: TokenSession) => T): Promise<T> {
  const token = await Pkcs11Token.open(config);
  try {
    return token.run(use);
  } finally {
    token.close();
  }
}
