// netpurse-issuer provision-hsm --pkcs11 through its real entry point, and
// netpurse-load --help: the token set up inside the data folder, the files
// private, no PIN or key printed, the keys file holding no value for the
// token-held version. Skipped, loudly, without SoftHSM2 or pkcs11js (the
// mistakes that need no token are checked regardless).

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { findSoftHsmModule } from "../../lib/hsm/softhsm.js";
import { commandFailure, tempDir } from "../support/fixtures.js";
import { requirePkcs11 } from "../support/softhsm.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;
const CLI = join(ROOT, "bin/netpurse-issuer");
const MODULE = findSoftHsmModule() ?? "/usr/lib/softhsm/libsofthsm2.so";

describe("netpurse-issuer provision-hsm --pkcs11", function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  const outputs: string[] = [];
  const issuer = async (...args: string[]) => {
    const r = await run(CLI, [...args, "--data", dir]);
    outputs.push(r.stdout, r.stderr);
    return r.stdout;
  };

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-issuer-pkcs11-"));
    await issuer("create-keys");
  });
  afterEach(async () => cleanup());

  it("explains its mistakes: --pkcs11 without --module and --token, token options without --pkcs11", async () => {
    const missing = await commandFailure(run(CLI, ["provision-hsm", "--pkcs11", "--token", "t", "--data", dir]));
    expect(missing.code).to.equal(2);
    expect(missing.stderr).to.contain("--pkcs11 needs --module LIB and --token LABEL");
    const stray = await commandFailure(run(CLI, ["provision-hsm", "--module", MODULE, "--data", dir]));
    expect(stray.code).to.equal(2);
    expect(stray.stderr).to.contain("--module is for --pkcs11 only");
    expect((await run(CLI, ["provision-hsm", "--help"])).stdout).to.contain("--pkcs11 --module LIB --token LABEL");
    const load = await run(process.execPath, ["--import", "tsx", join(ROOT, "services/load/main.ts"), "--help"], { cwd: ROOT });
    expect(load.stdout).to.contain('kind "pkcs11"').and.to.contain("NETPURSE_HSM_PIN").and.to.contain("SECURITY_MODULE_UNAVAILABLE");
  });

  describe("with SoftHSM2", () => {
    before(async function () {
      await requirePkcs11(this);
    });

    it("makes the token in DATA/hsm, generates the key there, and writes private files that hold neither PIN nor key", async () => {
      const out = await issuer("provision-hsm", "--pkcs11", "--module", MODULE, "--token", "netpurse-load");
      expect(out).to.contain("initialised token netpurse-load");
      expect(out).to.contain("generated the load master key of version 2 in token netpurse-load (sensitive, never extractable)");
      const hsm = JSON.parse(await readFile(join(dir, "load", "hsm.json"), "utf8")) as Record<string, unknown>;
      expect(hsm).to.deep.include({
        format: 1,
        kind: "pkcs11",
        module: MODULE,
        tokenLabel: "netpurse-load",
        pinFile: join(dir, "hsm", "user.pin"),
        softhsm2Conf: join(dir, "hsm", "softhsm2.conf"),
        loadKeys: { "2": "netpurse-load-mk-v2" },
        counter: 0,
      });
      // Version 2 is complete: its load key in the token, the others in the file; create-keys adds no file load key to it.
      expect(await issuer("create-keys", "--key-version", "2")).to.contain("master keys of version 2 exist already");
      expect(await readFile(join(dir, "hsm", "softhsm2.conf"), "utf8")).to.contain(`directories.tokendir = ${join(dir, "hsm", "tokens")}`);
      const keys = JSON.parse(await readFile(join(dir, "issuer", "keys.json"), "utf8")) as {
        master: Record<string, Record<string, string>>;
        token: { load: Record<string, string> };
      };
      expect(Object.keys(keys.master.load!)).to.deep.equal(["1"]);
      expect(Object.keys(keys.master.purchase!)).to.deep.equal(["1", "2"]);
      expect(keys.token.load).to.deep.equal({ "2": "netpurse-load-mk-v2" });
      for (const f of ["load/hsm.json", "hsm/user.pin", "hsm/so.pin", "hsm/softhsm2.conf", "issuer/keys.json"])
        expect((await stat(join(dir, f))).mode & 0o777, f).to.equal(0o600);
      expect((await stat(join(dir, "hsm", "tokens"))).mode & 0o777).to.equal(0o700);

      // Again: the same key, the same module id and counter; a card of that version; clearing's keys by reference.
      expect(await issuer("provision-hsm", "--pkcs11", "--module", MODULE, "--token", "netpurse-load")).to.contain(
        "token netpurse-load holds the load master key of version 2 already",
      );
      expect(JSON.parse(await readFile(join(dir, "load", "hsm.json"), "utf8"))).to.deep.include({ hsmId: hsm.hsmId, counter: 0 });
      expect(await issuer("personalise-card", "--out", join(dir, "cards", "c.card.json"), "--key-version", "2")).to.contain("(key version 2)");
      expect(await issuer("export-clearing-keys", "--out", join(dir, "clearing", "keys.json"))).to.contain(
        "load key versions 1 and 2 in token netpurse-load (by reference)",
      );
      const clearing = JSON.parse(await readFile(join(dir, "clearing", "keys.json"), "utf8")) as { loadKeys: object; tokenLoadKeys: { labels: object } };
      expect(Object.keys(clearing.loadKeys)).to.deep.equal(["1"]);
      expect(clearing.tokenLoadKeys.labels).to.deep.equal({ "2": "netpurse-load-mk-v2" });

      const pins = await Promise.all(["user.pin", "so.pin"].map(async (f) => (await readFile(join(dir, "hsm", f), "utf8")).trim()));
      const fileKeys = Object.values(keys.master).flatMap((v) => Object.values(v));
      for (const o of outputs) for (const secret of [...pins, ...fileKeys]) expect(o).to.not.contain(secret);
    });

    it("refuses a version whose load key is in the keys file, and a PIN the token refuses, without printing it", async () => {
      const taken = await commandFailure(
        run(CLI, ["provision-hsm", "--pkcs11", "--module", MODULE, "--token", "netpurse-load", "--key-version", "1", "--data", dir]),
      );
      expect(taken.code).to.equal(2);
      expect(taken.stderr).to.contain("the load master key of version 1 is in the keys file");
      await issuer("provision-hsm", "--pkcs11", "--module", MODULE, "--token", "netpurse-load");
      const wrongPin = join(dir, "wrong.pin");
      await writeFile(wrongPin, "987654321\n", { mode: 0o600 });
      const refused = await commandFailure(
        run(CLI, ["provision-hsm", "--pkcs11", "--module", MODULE, "--token", "netpurse-load", "--pin-file", wrongPin, "--data", dir]),
      );
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.contain("token netpurse-load refused the PIN (CKR_PIN_INCORRECT)");
      expect(refused.stderr + refused.stdout).to.not.contain("987654321");
    });
  });
});
