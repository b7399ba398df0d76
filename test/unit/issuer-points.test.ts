// The issuer's loyalty programmes (docs/loyalty.md): master keys per
// programme and key version, points purses on cards, authentication and
// points PSAMs, the programme's security module, clearing's keys.

import { expect } from "chai";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { diversifyCardKey } from "../../lib/crypto/keys.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { SoftwareHsm, type HsmFile } from "../../services/load/hsm.js";
import type { ClearingKeysFile } from "../../services/clearing/security-module.js";
import type { PsamFile } from "../../services/terminal/psam/software-psam.js";
import { Issuer, type IssuerKeys } from "../../services/issuer/issuer.js";
import { EUR, makeCard, makeIssuer, makeProgramme, makeProgrammeHsm, makePsam, SKYWAYS, tempDir } from "../support/fixtures.js";

const json = async <T>(path: string) => JSON.parse(await readFile(path, "utf8")) as T;

describe("issuer: loyalty programmes and authentication", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  const keysFile = () => json<IssuerKeys>(join(dir, "issuer", "keys.json"));

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
  });
  afterEach(async () => {
    await issuer.close();
    await cleanup();
  });

  it("creates a programme with distinct 16-byte redeem and earn master keys, and a new key version adds its keys to it", async () => {
    expect(await makeProgramme(issuer)).to.equal(SKYWAYS);
    let p = (await keysFile()).programmes![String(SKYWAYS)]!;
    expect(p.name).to.equal("Skyways Miles");
    expect(Object.keys(p.redeem)).to.deep.equal(["1"]);
    expect(Object.keys(p.earn)).to.deep.equal(["1"]);
    expect(p.redeem["1"]).to.match(/^[0-9a-f]{32}$/);
    expect(p.earn["1"]).to.match(/^[0-9a-f]{32}$/);
    const keys = await keysFile();
    const all = [p.redeem["1"], p.earn["1"], ...Object.values(keys.master).map((v) => v["1"])];
    expect(new Set(all).size, "every master key is its own").to.equal(all.length);
    expect((await stat(join(dir, "issuer", "keys.json"))).mode & 0o777).to.equal(0o600);

    await issuer.close();
    expect(await Issuer.createKeys(join(dir, "issuer"), 2)).to.deep.equal({ created: true });
    issuer = await Issuer.open(join(dir, "issuer"));
    p = (await keysFile()).programmes![String(SKYWAYS)]!;
    expect(Object.keys(p.redeem).sort()).to.deep.equal(["1", "2"]);
    expect(Object.keys(p.earn).sort()).to.deep.equal(["1", "2"]);
    expect(issuer.programmes()).to.deep.equal([{ code: SKYWAYS, name: "Skyways Miles", keyVersions: [1, 2] }]);

    // A card of version 2 holds keys of the version-2 masters.
    const card = await json<CardFile>(await makeCard(issuer, dir, { keyVersion: 2, points: [{ programme: SKYWAYS, value: 10 }] }));
    const id = Buffer.from(card.purseId, "hex");
    expect(card.points![0]!.keys.redeem).to.equal(diversifyCardKey(Buffer.from(p.redeem["2"]!, "hex"), id).toString("hex"));
    expect(card.points![0]!.keys.earn).to.equal(diversifyCardKey(Buffer.from(p.earn["2"]!, "hex"), id).toString("hex"));
  });

  it("refuses a programme code that is money, authentication, out of range or in use, and an empty name", async () => {
    for (const code of [500, 999, 0, 65536, 1000.5]) {
      const e = await issuer.createProgramme(code, "X").catch((x: unknown) => x);
      expect(e, String(code)).to.be.instanceOf(RangeError);
      expect((e as Error).message).to.contain("1000..65535");
    }
    await makeProgramme(issuer);
    const dup = await issuer.createProgramme(SKYWAYS, "Other Miles").catch((x: unknown) => x);
    expect(dup).to.be.instanceOf(RangeError);
    expect((dup as Error).message).to.contain(`programme ${SKYWAYS} exists already ("Skyways Miles")`);
    expect(await issuer.createProgramme(1002, "   ").catch((x: unknown) => (x as Error).message)).to.contain("1..64 characters");
    // Nothing refused reached the keys file.
    expect(Object.keys((await keysFile()).programmes!)).to.deep.equal([String(SKYWAYS)]);
  });

  it("personalises a card with points purses whose keys are the programmes' masters diversified by the purse id", async () => {
    await makeProgramme(issuer);
    await makeProgramme(issuer, 2002, "Rail Points");
    const path = await makeCard(issuer, dir, {
      value: 2_500,
      points: [
        { programme: SKYWAYS, value: 750 },
        { programme: 2002, value: 0, maxBalance: 5_000 },
      ],
    });
    const card = await json<CardFile>(path);
    const id = Buffer.from(card.purseId, "hex");
    const programmes = (await keysFile()).programmes!;
    const key = (code: number, role: "redeem" | "earn") => diversifyCardKey(Buffer.from(programmes[String(code)]![role]["1"]!, "hex"), id).toString("hex");
    expect(card.points).to.deep.equal([
      { programme: SKYWAYS, balance: 750, maxBalance: 1_000_000, keys: { redeem: key(SKYWAYS, "redeem"), earn: key(SKYWAYS, "earn") } },
      { programme: 2002, balance: 0, maxBalance: 5_000, keys: { redeem: key(2002, "redeem"), earn: key(2002, "earn") } },
    ]);
    expect(card.balance).to.equal(2_500);
    expect((await stat(path)).mode & 0o777).to.equal(0o600);
    // The card opens, and its money opening value is money only: the points are credited in their own unit.
    expect(await SoftwareCard.open(path)).to.be.instanceOf(SoftwareCard);
    expect(await issuer.openingValue(card.purseId)).to.deep.equal({ amountMinor: 2_500, currency: EUR, exponent: 2 });
    expect((await issuer.listCards()).map((c) => c.credited)).to.deep.equal([2_500]);
    const credits = await issuer.db.all<{ currency: number; amount_minor: number }>(
      "SELECT currency, amount_minor FROM issuer_credits WHERE purse_id = ? ORDER BY currency",
      [card.purseId],
    );
    expect(credits).to.deep.equal([
      { currency: EUR, amount_minor: 2_500 },
      { currency: SKYWAYS, amount_minor: 750 },
    ]);
    // A card without points has no points field at all (cards made before programmes look the same).
    expect(await json<CardFile>(await makeCard(issuer, dir, { name: "plain" }))).to.not.have.property("points");
  });

  it("refuses points of an unknown programme (naming create-programme), twice the same programme, and points beyond the maximum", async () => {
    const unknown = await makeCard(issuer, dir, { points: [{ programme: SKYWAYS, value: 1 }] }).catch((x: unknown) => (x as Error).message);
    expect(unknown).to.contain(`no loyalty programme ${SKYWAYS}`).and.contain("netpurse-issuer create-programme --code 1001");
    await makeProgramme(issuer);
    const twice = await makeCard(issuer, dir, {
      points: [
        { programme: SKYWAYS, value: 1 },
        { programme: SKYWAYS, value: 2 },
      ],
    }).catch((x: unknown) => (x as Error).message);
    expect(twice).to.contain("one points purse per programme");
    const over = await makeCard(issuer, dir, { points: [{ programme: SKYWAYS, value: 11, maxBalance: 10 }] }).catch((x: unknown) => (x as Error).message);
    expect(over).to.contain("between 0 and the maximum (10)");
    const fraction = await makeCard(issuer, dir, { points: [{ programme: SKYWAYS, value: 1.5 }] }).catch((x: unknown) => (x as Error).message);
    expect(fraction).to.contain("whole");
    // A money purse in 999 would hide the authentication application; in a programme's code, its points purse.
    for (const currency of [999, SKYWAYS, 0]) {
      const notMoney = await makeCard(issuer, dir, { currency }).catch((x: unknown) => (x as Error).message);
      expect(notMoney, `money purse in ${currency}`).to.contain(`an ISO 4217 money code 1..998, not ${currency}`);
    }
    expect(await issuer.listCards(), "no refused card was recorded").to.deep.equal([]);
  });

  it("provisions authentication PSAMs with the authentication masters and points PSAMs with the programme's redeem masters", async () => {
    await makeProgramme(issuer);
    const keys = await keysFile();
    const money = await json<PsamFile>(await makePsam(issuer, dir, { name: "money" }));
    const auth = await json<PsamFile>(await makePsam(issuer, dir, { name: "auth", currency: 999 }));
    const points = await json<PsamFile>(await makePsam(issuer, dir, { name: "points", currency: SKYWAYS }));
    expect(money.purchaseKeys).to.deep.equal(keys.master.purchase);
    expect(auth.purchaseKeys).to.deep.equal(keys.master.authentication);
    expect(auth.currency).to.equal(999);
    expect(points.purchaseKeys).to.deep.equal(keys.programmes![String(SKYWAYS)]!.redeem);
    expect(points.currency).to.equal(SKYWAYS);
    // Each PSAM still has its own batch and verdict keys.
    expect(new Set([money.batchKey, auth.batchKey, points.batchKey]).size).to.equal(3);
    expect(points.batchKey).to.equal(issuer.psamBatchKey(points.psamId).toString("hex"));
    expect(auth.verdictKey).to.equal(issuer.psamVerdictKey(auth.psamId).toString("hex"));

    const unknown = await makePsam(issuer, dir, { name: "x", currency: 2002 }).catch((x: unknown) => (x as Error).message);
    expect(unknown).to.contain("no loyalty programme 2002").and.contain("create-programme");
    for (const currency of [0, 65536]) {
      const e = await makePsam(issuer, dir, { name: "x", currency }).catch((x: unknown) => x);
      expect(e).to.be.instanceOf(RangeError);
      expect((e as Error).message).to.contain("999 (authentication)");
    }
    const rows = await issuer.db.all<{ currency: number }>("SELECT currency FROM psams ORDER BY currency");
    expect(rows.map((r) => r.currency)).to.deep.equal([EUR, 999, SKYWAYS]);
  });

  it("lists authentication and points PSAMs in the concentrator's registry like any PSAM", async () => {
    await makeProgramme(issuer);
    await issuer.provisionPsam({ path: join(dir, "a.psam.json"), currency: 999, psamId: "000000a1", terminalId: "t1" });
    await issuer.provisionPsam({ path: join(dir, "p.psam.json"), currency: SKYWAYS, psamId: "000000b1", terminalId: "t1" });
    await issuer.provisionPsam({ path: join(dir, "m.psam.json"), currency: EUR, psamId: "000000c1", terminalId: "t2" });
    const out = join(dir, "concentrator", "psams.json");
    await issuer.exportPsamRegistry(out);
    expect(await json(out)).to.deep.equal({
      psams: [
        { psamId: "000000a1", terminalId: "t1" },
        { psamId: "000000b1", terminalId: "t1" },
        { psamId: "000000c1", terminalId: "t2" },
      ],
    });
  });

  it("provisions the programme's security module with its EARN masters, private, and keeps the counter of the same module", async () => {
    await makeProgramme(issuer);
    const path = await makeProgrammeHsm(issuer, dir, SKYWAYS, { hsmId: "0badcafe" });
    const file = await json<HsmFile>(path);
    const earn = (await keysFile()).programmes![String(SKYWAYS)]!.earn;
    expect(file).to.deep.equal({ format: 1, kind: "software", hsmId: "0badcafe", loadKeys: earn, counter: 0 });
    expect((await stat(path)).mode & 0o777).to.equal(0o600);
    expect((await SoftwareHsm.open(path)).id).to.equal("0badcafe");

    // The module signed some credits: provisioning it again (a new key version) must not reuse its counters.
    await SoftwareHsm.write(path, { ...file, counter: 41 });
    await issuer.close();
    await Issuer.createKeys(join(dir, "issuer"), 2);
    issuer = await Issuer.open(join(dir, "issuer"));
    const again = await json<HsmFile>(await makeProgrammeHsm(issuer, dir, SKYWAYS));
    expect(again.hsmId).to.equal("0badcafe");
    expect(again.counter).to.equal(41);
    expect(Object.keys(again.loadKeys).sort()).to.deep.equal(["1", "2"]);
    // Another module id starts at 0.
    const other = await json<HsmFile>(await makeProgrammeHsm(issuer, join(dir, "other"), SKYWAYS));
    expect(other.hsmId)
      .to.match(/^[0-9a-f]{8}$/)
      .and.not.equal("0badcafe");
    expect(other.counter).to.equal(0);

    const unknown = await makeProgrammeHsm(issuer, dir, 2002).catch((x: unknown) => (x as Error).message);
    expect(unknown).to.contain("no loyalty programme 2002").and.contain("create-programme");
    const badId = await makeProgrammeHsm(issuer, dir, SKYWAYS, { hsmId: "xyz" }).catch((x: unknown) => (x as Error).message);
    expect(badId).to.contain("8 hex digits");
  });

  it("exports each programme's redeem masters (never its earn masters) in clearing's keys", async () => {
    const path = join(dir, "clearing", "keys.json");
    expect(await issuer.exportClearingKeys(path), "no programme, no field: files as before").to.not.have.property("programmeKeys");
    await makeProgramme(issuer);
    await makeProgramme(issuer, 2002, "Rail Points");
    await issuer.exportClearingKeys(path);
    const file = await json<ClearingKeysFile>(path);
    const programmes = (await keysFile()).programmes!;
    expect(file.programmeKeys).to.deep.equal({ [String(SKYWAYS)]: programmes[String(SKYWAYS)]!.redeem, "2002": programmes["2002"]!.redeem });
    const text = await readFile(path, "utf8");
    for (const p of Object.values(programmes)) expect(text).to.not.contain(p.earn["1"]);
    expect((await stat(path)).mode & 0o777).to.equal(0o600);
  });
});
