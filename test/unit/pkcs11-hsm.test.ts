// The load server's host security module on a SoftHSM2 token (docs/hsm.md):
// it signs exactly what the software module signs, the master keys cannot be
// read or wrapped out of the token, its counter survives a restart, and a
// token out of reach is SecurityModuleUnavailable, never a wrong answer.
// Skipped, loudly, without SoftHSM2 or pkcs11js.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { randomBytes, randomUUID } from "node:crypto";
import { readFile, rename, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { diversifyCardKey, deriveSessionKey } from "../../lib/crypto/keys.js";
import { loadPkcs11Binding, Pkcs11NotInstalled, Pkcs11Token, SecurityModuleUnavailable, type Pkcs11Binding, type TokenConfig } from "../../lib/hsm/pkcs11.js";
import { InitializeForLoadResponse, LoadCommand, loadS1, loadS3, LoadResult, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import { PurseStatusByte } from "../../lib/protocol/purse.js";
import { HsmRefused, SoftwareHsm, type HostSecurityModule } from "../../services/load/hsm.js";
import { openHsm } from "../../services/load/open-hsm.js";
import { Pkcs11Hsm, type Pkcs11HsmFile } from "../../services/load/pkcs11-hsm.js";
import { tempDir } from "../support/fixtures.js";
import { freshToken, requirePkcs11 } from "../support/softhsm.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;

/** A card's INITIALIZE FOR LOAD answer with a genuine S1 under its load key. */
function cardInit(cardKey: Buffer, authorised: LoadInitCommand, o: { purseId: Buffer; keyVersion: number; balance?: number }): LoadInit {
  const response = {
    format: 1,
    providerId: Buffer.from("4e500001", "hex"),
    purseId: o.purseId,
    currency: 978,
    exponent: 2,
    balance: o.balance ?? 1_000,
    maxBalance: 50_000,
    expiry: "2031-12-31",
    counter: 7,
    keyVersion: o.keyVersion,
    algorithm: 1,
    status: PurseStatusByte.ACTIVE,
    challenge: randomBytes(8),
  };
  return InitializeForLoadResponse.decode(InitializeForLoadResponse.encode({ ...response, s1: loadS1(cardKey, authorised, response) }));
}

/** A PKCS#11 constant of the binding, by name. */
const constants = (binding: Pkcs11Binding) => (name: string) => {
  const v = binding[name];
  if (typeof v !== "number") throw new Error(`pkcs11js has no ${name}`);
  return v;
};

const authorisedLoad = (amount = 2_500): LoadInitCommand => ({
  amount,
  currency: 978,
  bankId: "demo-bank",
  dateTime: Math.floor(Date.now() / 1000),
  transactionRef: randomUUID(),
});

async function refusal(p: Promise<unknown>): Promise<HsmRefused> {
  try {
    await p;
  } catch (e) {
    if (e instanceof HsmRefused) return e;
    throw e;
  }
  throw new Error("the security module signed; a refusal was expected");
}

describe("the PKCS#11 host security module (SoftHSM2)", function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => Promise<void>;
  let token: TokenConfig;
  let tokens: string;
  let fixture: Pkcs11Token;
  const MASTER = randomBytes(16);
  const FIXTURE_LABEL = "fixture-known-mk";
  const opened: HostSecurityModule[] = [];

  before(async function () {
    await requirePkcs11(this);
    ({ dir, cleanup } = await tempDir("netpurse-pkcs11-"));
    ({ token, tokens } = await freshToken(dir));
    // Purely a fixture: a master key of known value, so that the software module can hold the same one. Like a generated
    // key it is sensitive and never extractable; provisioning never imports a key.
    fixture = await Pkcs11Token.open(token);
    fixture.run((s) => {
      const k = constants(fixture.binding);
      s.api.C_CreateObject(s.session, [
        { type: k("CKA_CLASS"), value: k("CKO_SECRET_KEY") },
        { type: k("CKA_KEY_TYPE"), value: k("CKK_AES") },
        { type: k("CKA_TOKEN"), value: true },
        { type: k("CKA_PRIVATE"), value: true },
        { type: k("CKA_LABEL"), value: FIXTURE_LABEL },
        { type: k("CKA_VALUE"), value: MASTER },
        { type: k("CKA_SENSITIVE"), value: true },
        { type: k("CKA_EXTRACTABLE"), value: false },
        { type: k("CKA_DERIVE"), value: true },
      ]);
    });
  });
  afterEach(() => {
    for (const h of opened.splice(0)) h.close?.();
  });
  after(async () => {
    fixture?.close();
    await cleanup?.();
  });

  /** The two modules over the same master key (version 3), the same module id and counter. */
  async function twins(counter = 41) {
    const softPath = join(dir, `soft-${randomUUID()}.json`);
    const tokenPath = join(dir, `pkcs11-${randomUUID()}.json`);
    await SoftwareHsm.write(softPath, { format: 1, hsmId: "0a0b0c0d", loadKeys: { "3": MASTER.toString("hex") }, counter });
    const file: Pkcs11HsmFile = { format: 1, kind: "pkcs11", hsmId: "0a0b0c0d", ...token, loadKeys: { "3": FIXTURE_LABEL }, counter };
    await writeFile(tokenPath, JSON.stringify(file), { mode: 0o600 });
    const soft = await openHsm(softPath);
    const hsm = await openHsm(tokenPath);
    opened.push(soft, hsm);
    return { soft, hsm, tokenPath };
  }

  it("signs the same LOAD command (S2) as the software module for the same card, load, master key and counter", async () => {
    const { soft, hsm } = await twins();
    expect(hsm).to.be.instanceOf(Pkcs11Hsm);
    for (let i = 0; i < 3; i++) {
      const purseId = randomBytes(8);
      const authorised = authorisedLoad(1_000 + i);
      const init = cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 3 });
      const a = await soft.issueLoad(authorised, 2, init);
      const b = await hsm.issueLoad(authorised, 2, init);
      expect(b.hsmCounter).to.equal(42 + i);
      expect(b).to.deep.equal(a);
      expect(LoadCommand.decode(b.command).s2).to.have.length(8);
    }
  });

  it("verifies the card's S3 and the negative result's S1 as the software module does, and refuses a changed one", async () => {
    const { soft, hsm } = await twins();
    const purseId = randomBytes(8);
    const cardKey = diversifyCardKey(MASTER, purseId);
    const authorised = authorisedLoad();
    const init = cardInit(cardKey, authorised, { purseId, keyVersion: 3 });
    const issued = await hsm.issueLoad(authorised, 2, init);
    const l = LoadCommand.decode(issued.command);
    const sessionKey = deriveSessionKey(cardKey, {
      cardCounter: init.counter,
      securityModuleId: l.hsmId,
      securityModuleCounter: l.hsmCounter,
      challenge: init.challenge,
    });
    const result = { result: LoadResult.LOADED, counter: init.counter + 1, balance: init.balance + authorised.amount };
    const answer = { ...result, s3: loadS3(sessionKey, init, l, result) };
    const forged = { ...answer, s3: Buffer.from(answer.s3).fill(0x55, 0, 1) };
    for (const m of [soft, hsm]) {
      expect(m.verifyLoadAnswer(authorised, init, issued, answer), "genuine S3").to.equal(true);
      expect(m.verifyLoadAnswer(authorised, init, issued, forged), "forged S3").to.equal(false);
      expect(m.verifyLoadAnswer(authorised, init, { hsmCounter: issued.hsmCounter + 1 }, answer), "S3 of another counter").to.equal(false);
      expect(m.matchesS1(authorised, init), "the card's own S1").to.equal(true);
      expect(m.matchesS1(authorised, { ...init, balance: init.balance + 1 }), "S1 over another balance").to.equal(false);
    }
  });

  it("refuses a wrong S1, an unknown key version and an unloadable card exactly as the software module does", async () => {
    const { soft, hsm } = await twins();
    const purseId = randomBytes(8);
    const authorised = authorisedLoad();
    const init = cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 3 });
    const badS1 = { ...init, s1: Buffer.from(init.s1).fill(0, 0, 1) };
    const otherVersion = cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 4 });
    const full = cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 3, balance: 49_000 });
    for (const m of [soft, hsm]) {
      expect((await refusal(m.issueLoad(authorised, 2, badS1))).refusal).to.equal("BAD_S1");
      expect((await refusal(m.issueLoad(authorised, 2, otherVersion))).refusal).to.equal("KEY_VERSION_UNKNOWN");
      expect((await refusal(m.issueLoad(authorised, 2, full))).refusal).to.equal("MAX_BALANCE_EXCEEDED");
    }
  });

  it("keeps the master key inside: its value cannot be read, it cannot be wrapped, made extractable or used to MAC", async () => {
    const k = constants((await loadPkcs11Binding()).binding);
    const t = await Pkcs11Token.open(token);
    try {
      t.run((s) => {
        const label = "netpurse-load-mk-v9";
        const mk = s.generateMasterKey(label);
        const code = (f: () => unknown) => {
          try {
            f();
          } catch (e) {
            return (e as { message: string }).message;
          }
          return "succeeded";
        };
        expect(code(() => s.api.C_GetAttributeValue(s.session, mk, [{ type: k("CKA_VALUE") }]))).to.equal("CKR_ATTRIBUTE_SENSITIVE");
        const attrs = s.api.C_GetAttributeValue(s.session, mk, [
          { type: k("CKA_SENSITIVE") },
          { type: k("CKA_EXTRACTABLE") },
          { type: k("CKA_NEVER_EXTRACTABLE") },
          { type: k("CKA_ALWAYS_SENSITIVE") },
          { type: k("CKA_LOCAL") },
          { type: k("CKA_TOKEN") },
        ]);
        expect(attrs.map((a) => a.value[0])).to.deep.equal([1, 0, 1, 1, 1, 1], "sensitive, not extractable, never extractable, always sensitive, local, token");
        const kek = s.api.C_GenerateKey(s.session, { mechanism: k("CKM_AES_KEY_GEN") }, [
          { type: k("CKA_CLASS"), value: k("CKO_SECRET_KEY") },
          { type: k("CKA_KEY_TYPE"), value: k("CKK_AES") },
          { type: k("CKA_VALUE_LEN"), value: 16 },
          { type: k("CKA_TOKEN"), value: false },
          { type: k("CKA_WRAP"), value: true },
        ]);
        expect(code(() => s.api.C_WrapKey(s.session, { mechanism: k("CKM_AES_KEY_WRAP") }, kek, mk, Buffer.alloc(64)))).to.equal("CKR_KEY_UNEXTRACTABLE");
        expect(code(() => s.api.C_SetAttributeValue(s.session, mk, [{ type: k("CKA_EXTRACTABLE"), value: true }]))).to.match(/^CKR_ATTRIBUTE_READ_ONLY/);
        expect(code(() => s.api.C_SetAttributeValue(s.session, mk, [{ type: k("CKA_SENSITIVE"), value: false }]))).to.match(/^CKR_ATTRIBUTE_READ_ONLY/);
        expect(code(() => s.cmac(mk, Buffer.from("x")))).to.equal("CKR_KEY_FUNCTION_NOT_PERMITTED");
        // The keys the load server derives are as closed: only personalisation derives a readable card key.
        const purseId = randomBytes(8);
        const closed = s.deriveKey(mk, Buffer.alloc(16));
        expect(code(() => s.value(closed))).to.equal("CKR_ATTRIBUTE_SENSITIVE");
        s.destroy(closed);
        expect(s.cardKey(label, purseId)).to.have.length(16);
      });
    } finally {
      t.close();
    }
  });

  it("derives in the token the card key the software derivation gives (what personalisation writes into the card)", async () => {
    const t = await Pkcs11Token.open(token);
    try {
      const purseId = randomBytes(8);
      expect(t.run((s) => s.cardKey(FIXTURE_LABEL, purseId)).equals(diversifyCardKey(MASTER, purseId))).to.equal(true);
    } finally {
      t.close();
    }
  });

  it("never uses a counter twice: the counter is on disk before the LOAD command leaves, and goes on after a restart", async () => {
    const { hsm, tokenPath } = await twins(100);
    const purseId = randomBytes(8);
    const load = async (m: HostSecurityModule) => {
      const authorised = authorisedLoad();
      return m.issueLoad(authorised, 2, cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 3 }));
    };
    expect((await load(hsm)).hsmCounter).to.equal(101);
    expect((JSON.parse(await readFile(tokenPath, "utf8")) as Pkcs11HsmFile).counter).to.equal(101);
    hsm.close?.();
    const again = await openHsm(tokenPath);
    opened.push(again);
    expect((await load(again)).hsmCounter).to.equal(102);
    expect((await stat(tokenPath)).mode & 0o777).to.equal(0o600);
  });

  it("with the token folder gone: SecurityModuleUnavailable, no counter used up; back again: signs, without a restart", async () => {
    const { hsm, tokenPath } = await twins(7);
    const purseId = randomBytes(8);
    const authorised = authorisedLoad();
    const init = cardInit(diversifyCardKey(MASTER, purseId), authorised, { purseId, keyVersion: 3 });
    await rename(tokens, `${tokens}-away`);
    try {
      for (let i = 0; i < 2; i++) {
        const e = await hsm.issueLoad(authorised, 2, init).then(
          () => undefined,
          (x: unknown) => x,
        );
        expect(e).to.be.instanceOf(SecurityModuleUnavailable);
      }
      expect(() => hsm.matchesS1(authorised, init)).to.throw(SecurityModuleUnavailable);
      expect((JSON.parse(await readFile(tokenPath, "utf8")) as Pkcs11HsmFile).counter).to.equal(7);
    } finally {
      await rename(`${tokens}-away`, tokens);
    }
    expect((await hsm.issueLoad(authorised, 2, init)).hsmCounter).to.equal(8);
  });

  it("a wrong PIN is SecurityModuleUnavailable without the PIN in the message, is not tried twice, and a corrected PIN file works", async () => {
    const right = (await readFile(token.pinFile!, "utf8")).trim();
    const pinFile = join(dir, `pin-${randomUUID()}`);
    const wrong = "not-the-pin-0000";
    await writeFile(pinFile, `${wrong}\n`, { mode: 0o600 });
    // Alone on the module (no other login in this process), so the token itself judges the PIN.
    fixture.close();
    const t = await Pkcs11Token.open({ ...token, pinFile });
    try {
      const why = t.check();
      expect(why).to.match(/refused the PIN \(CKR_PIN_INCORRECT\)/);
      expect(t.check()).to.match(/refused this PIN before; it is not tried again/);
      for (const secret of [right, wrong]) expect(why).to.not.contain(secret);
      await writeFile(pinFile, `${right}\n`, { mode: 0o600 });
      expect(t.check()).to.equal(undefined);
    } finally {
      t.close();
      fixture = await Pkcs11Token.open(token);
    }
  });

  it("refuses a PIN file others can read, and says where the PIN must come from", async () => {
    const loose = join(dir, `loose-${randomUUID()}`);
    await writeFile(loose, "1234\n", { mode: 0o644 });
    const t = await Pkcs11Token.open({ ...token, pinFile: loose });
    const noPin = await Pkcs11Token.open({ module: token.module, tokenLabel: token.tokenLabel, softhsm2Conf: token.softhsm2Conf! });
    const env = process.env.NETPURSE_HSM_PIN;
    delete process.env.NETPURSE_HSM_PIN;
    try {
      expect(t.check()).to.match(/readable by others \(mode 644\): it must be 0600/);
      expect(noPin.check()).to.match(/no PIN: name a PIN file .* or set NETPURSE_HSM_PIN/);
    } finally {
      if (env !== undefined) process.env.NETPURSE_HSM_PIN = env;
      t.close();
      noPin.close();
    }
  });

  it("a module that does not load is unavailable, not a crash; another token label is unavailable too", async () => {
    const gone = await Pkcs11Token.open({ ...token, module: join(dir, "no-such-libsofthsm2.so") });
    const other = await Pkcs11Token.open({ ...token, tokenLabel: "not-provisioned" });
    try {
      expect(gone.check()).to.match(/cannot load the PKCS#11 module .*no-such-libsofthsm2\.so/);
      expect(other.check()).to.match(/no token labelled not-provisioned/);
    } finally {
      gone.close();
      other.close();
    }
  });
});

describe("the PKCS#11 module without its binding, and the software path", function () {
  this.timeout(30_000);

  it("without pkcs11js: a clear error saying what to install", async () => {
    const e = await loadPkcs11Binding("pkcs11js-not-installed-here").then(
      () => undefined,
      (x: unknown) => x,
    );
    expect(e).to.be.instanceOf(Pkcs11NotInstalled);
    expect((e as Error).message).to.match(/apt-get install softhsm2.*npm install pkcs11js/);
  });

  it("the software module and the services' start code never load pkcs11js", async () => {
    const script = [
      'import { createRequire } from "node:module";',
      'import { readFileSync } from "node:fs";',
      'await import("./services/load/server.ts");',
      'await import("./services/clearing/server.ts");',
      'await import("./services/issuer/issuer.ts");',
      'const { SoftwareHsm } = await import("./services/load/hsm.ts");',
      'const { openHsm } = await import("./services/load/open-hsm.ts");',
      'const path = process.argv[1] + "/hsm.json";',
      'await SoftwareHsm.write(path, { format: 1, hsmId: "01020304", loadKeys: { "1": "00".repeat(16) }, counter: 0 });',
      "await openHsm(path);",
      "const loaded = Object.keys(createRequire(import.meta.url).cache).filter((k) => k.includes('pkcs11'));",
      "const mapped = readFileSync('/proc/self/maps', 'utf8').includes('pkcs11.node');",
      "console.log(JSON.stringify({ loaded, mapped }));",
    ].join("\n");
    const { dir, cleanup } = await tempDir();
    try {
      const r = await run(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script, dir], { cwd: ROOT });
      expect(JSON.parse(r.stdout.trim().split("\n").pop()!)).to.deep.equal({ loaded: [], mapped: false });
    } finally {
      await cleanup();
    }
  });
});
