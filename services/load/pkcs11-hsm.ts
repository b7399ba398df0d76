// The load server's host security module on a PKCS#11 token (docs/hsm.md).
// The issuer's load master keys were generated in the token and never leave
// it: for each S1, S2 and S3 the token derives the card's key and the
// session key as session objects, MACs with CKM_AES_CMAC and destroys them.
// The module's counter is in DATA/load/hsm.json, written atomically with
// fsync before a LOAD command leaves: SoftHSM2 writes its objects without
// fsync, and a counter that a power cut could roll back would be used twice.

import { macEqual } from "../../lib/crypto/aes.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { Pkcs11Token, tokenConfigOf, type TokenConfig } from "../../lib/hsm/pkcs11.js";
import type { Logger } from "../../lib/log.js";
import { Mutex } from "../../lib/mutex.js";
import { LoadCommand, s1Message, s2Message, s3Message, type LoadAnswer, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import { HsmRefused, loadFields, refuseUnloadable, type HostSecurityModule, type IssuedLoad } from "./hsm.js";

/** DATA/load/hsm.json for a PKCS#11 module (mode 0600; it holds no key, but names the PIN file). */
export interface Pkcs11HsmFile extends TokenConfig {
  format: 1;
  kind: "pkcs11";
  /** The module's 4-byte id, hex. */
  hsmId: string;
  /** The label of each load master key in the token, by key version. */
  loadKeys: Record<string, string>;
  /** The last counter used for a LOAD command. */
  counter: number;
}

function checkFile(path: string, f: Pkcs11HsmFile): void {
  const bad = (what: string) => new Error(`${path}: ${what}`);
  if (f.format !== 1 || f.kind !== "pkcs11") throw bad("not a PKCS#11 security module file");
  if (typeof f.hsmId !== "string" || !/^[0-9a-f]{8}$/.test(f.hsmId)) throw bad("hsmId must be 8 hex digits");
  if (typeof f.module !== "string" || !f.module) throw bad("module must name the PKCS#11 library");
  if (typeof f.tokenLabel !== "string" || !f.tokenLabel) throw bad("tokenLabel must name the token");
  if (!Number.isInteger(f.counter) || f.counter < 0) throw bad("counter must be a whole number");
  if (typeof f.loadKeys !== "object" || Object.values(f.loadKeys).some((l) => typeof l !== "string")) throw bad("loadKeys must map key versions to key labels");
}

export class Pkcs11Hsm implements HostSecurityModule {
  private readonly mutex = new Mutex();

  private constructor(
    private readonly path: string,
    private state: Pkcs11HsmFile,
    private readonly token: Pkcs11Token,
  ) {}

  /**
   * Opens the module from its file. Without pkcs11js this fails (saying what
   * to install); a token out of reach does not stop the load server from
   * starting: it is logged, and every call tries the token again.
   */
  static async open(path: string, file?: Pkcs11HsmFile, log?: Logger): Promise<Pkcs11Hsm> {
    const state = file ?? (await readJson<Pkcs11HsmFile>(path));
    checkFile(path, state);
    const token = await Pkcs11Token.open(tokenConfigOf(state));
    const unavailable = token.check();
    if (unavailable) log?.warn("security module unavailable at start; loads answer UNAVAILABLE until it is back", { why: unavailable });
    else log?.info("security module ready", { hsm: state.hsmId, token: state.tokenLabel, keyVersions: Object.keys(state.loadKeys).join(",") });
    return new Pkcs11Hsm(path, state, token);
  }

  get id(): string {
    return this.state.hsmId;
  }

  close(): void {
    this.token.close();
  }

  private label(keyVersion: number): string | undefined {
    return Object.hasOwn(this.state.loadKeys, String(keyVersion)) ? this.state.loadKeys[String(keyVersion)] : undefined;
  }

  private session(init: LoadInit, hsmCounter: number) {
    return { cardCounter: init.counter, securityModuleId: Buffer.from(this.id, "hex"), securityModuleCounter: hsmCounter, challenge: init.challenge };
  }

  issueLoad(authorised: LoadInitCommand, exponent: number, init: LoadInit): Promise<IssuedLoad> {
    return this.mutex.run(async () => {
      const label = this.label(init.keyVersion);
      if (!label) throw new HsmRefused("KEY_VERSION_UNKNOWN", `no load master key of version ${init.keyVersion} in token ${this.state.tokenLabel}`);
      const { s1, ...response } = init;
      const expected = this.token.run((t) => t.cardMac(label, init.purseId, s1Message(authorised, response)));
      if (!macEqual(expected, s1)) throw new HsmRefused("BAD_S1", "the card's S1 does not verify for the authorised load");
      refuseUnloadable(authorised, exponent, init);
      const hsmCounter = this.state.counter + 1;
      // The counter is on disk before the command is made: a counter is never used twice, even if the token fails now.
      const next = { ...this.state, counter: hsmCounter };
      await writeJsonAtomic(this.path, next, { private: true });
      this.state = next;
      const fields = loadFields(authorised, this.id, hsmCounter);
      const s2 = this.token.run((t) => t.sessionMac(label, init.purseId, this.session(init, hsmCounter), s2Message(init, fields)));
      return { hsmId: this.id, hsmCounter, command: LoadCommand.encode({ ...fields, s2 }) };
    });
  }

  verifyLoadAnswer(authorised: LoadInitCommand, init: LoadInit, issued: { hsmCounter: number }, answer: LoadAnswer): boolean {
    const label = this.label(init.keyVersion);
    if (!label) return false;
    const { s3, ...result } = answer;
    const message = s3Message(init, loadFields(authorised, this.id, issued.hsmCounter), result);
    return macEqual(
      this.token.run((t) => t.sessionMac(label, init.purseId, this.session(init, issued.hsmCounter), message)),
      s3,
    );
  }

  matchesS1(zeroCommand: LoadInitCommand, expected: LoadInit): boolean {
    const label = this.label(expected.keyVersion);
    if (!label) return false;
    const { s1, ...response } = expected;
    return macEqual(
      this.token.run((t) => t.cardMac(label, expected.purseId, s1Message(zeroCommand, response))),
      s1,
    );
  }
}
