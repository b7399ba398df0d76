// The issuer's commands through their real entry point: files private,
// key material never printed.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { diversifyCardKey } from "../../lib/crypto/keys.js";
import { commandFailure, tempDir } from "../support/fixtures.js";

const run = promisify(execFile);
const CLI = new URL("../../bin/netpurse-issuer", import.meta.url).pathname;

describe("netpurse-issuer", function () {
  this.timeout(60_000);

  it("creates keys, personalises a card and provisions a PSAM, keeping keys private and out of its output", async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const outputs: string[] = [];
      const issuer = async (...args: string[]) => {
        const r = await run(CLI, [...args, "--data", dir]);
        outputs.push(r.stdout, r.stderr);
        return r.stdout;
      };
      expect(await issuer("create-keys")).to.contain("created master keys of version 1");
      expect(await issuer("create-keys")).to.contain("exist already");
      const card = join(dir, "cards", "alice.card.json");
      expect(await issuer("personalise-card", "--out", card, "--value", "25.00", "--expiry", "2030-06-30")).to.match(
        /personalised card [0-9a-f]{16} .* with 25\.00, expires 2030-06-30/,
      );
      const psam = join(dir, "psams", "p.psam.json");
      expect(await issuer("provision-psam", "--out", psam, "--psam-id", "0a0b0c0d")).to.contain("provisioned PSAM 0a0b0c0d");
      expect(await issuer("list-cards")).to.contain("25.00");

      for (const f of [join(dir, "issuer", "keys.json"), card, psam]) expect((await stat(f)).mode & 0o777, f).to.equal(0o600);
      const keys = JSON.parse(await readFile(join(dir, "issuer", "keys.json"), "utf8")) as {
        master: Record<string, Record<string, string>>;
        batchMaster: string;
      };
      const secrets = [...Object.values(keys.master).flatMap((v) => Object.values(v)), keys.batchMaster];
      const cardKeys = Object.values((JSON.parse(await readFile(card, "utf8")) as { keys: Record<string, string> }).keys);
      for (const secret of [...secrets, ...cardKeys]) for (const o of outputs) expect(o).to.not.contain(secret);
    } finally {
      await cleanup();
    }
  });

  it("creates a loyalty programme, cards with its points, authentication and points PSAMs and the programme's security module", async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const outputs: string[] = [];
      const issuer = async (...args: string[]) => {
        const r = await run(CLI, [...args, "--data", dir]);
        outputs.push(r.stdout, r.stderr);
        return r.stdout;
      };
      await issuer("create-keys");
      expect(await issuer("create-programme", "--code", "1001", "--name", "Skyways Miles")).to.contain(
        'created loyalty programme 1001 "Skyways Miles" (redeem and earn master keys of versions 1)',
      );
      await issuer("create-programme", "--code", "2002", "--name", "Rail Points");
      const keys = JSON.parse(await readFile(join(dir, "issuer", "keys.json"), "utf8")) as {
        master: Record<string, Record<string, string>>;
        programmes: Record<string, { name: string; redeem: Record<string, string>; earn: Record<string, string> }>;
      };
      const skyways = keys.programmes["1001"]!;
      expect(skyways.name).to.equal("Skyways Miles");

      const card = join(dir, "cards", "alice.card.json");
      expect(await issuer("personalise-card", "--out", card, "--value", "5.00", "--points", "1001:1500", "--points", "2002:0:9000")).to.match(
        /personalised card [0-9a-f]{16} .* with 5\.00, 1500 points of programme 1001, 0 points of programme 2002, expires/,
      );
      const file = JSON.parse(await readFile(card, "utf8")) as {
        purseId: string;
        balance: number;
        points: { programme: number; balance: number; maxBalance: number; keys: { redeem: string; earn: string } }[];
      };
      const id = Buffer.from(file.purseId, "hex");
      const diversified = (hex: string) => diversifyCardKey(Buffer.from(hex, "hex"), id).toString("hex");
      expect(file.balance).to.equal(500);
      expect(file.points).to.deep.equal([
        { programme: 1001, balance: 1500, maxBalance: 1_000_000, keys: { redeem: diversified(skyways.redeem["1"]!), earn: diversified(skyways.earn["1"]!) } },
        {
          programme: 2002,
          balance: 0,
          maxBalance: 9000,
          keys: { redeem: diversified(keys.programmes["2002"]!.redeem["1"]!), earn: diversified(keys.programmes["2002"]!.earn["1"]!) },
        },
      ]);

      const auth = join(dir, "psams", "auth.psam.json");
      expect(await issuer("provision-psam", "--out", auth, "--currency", "999", "--psam-id", "000000a1", "--terminal", "t1")).to.contain(
        "provisioned authentication PSAM 000000a1 (key versions 1, currency 999)",
      );
      const points = join(dir, "psams", "points.psam.json");
      expect(await issuer("provision-psam", "--out", points, "--currency", "1001", "--psam-id", "000000b1", "--terminal", "t1")).to.contain(
        "provisioned points PSAM of programme 1001 000000b1",
      );
      const alias = join(dir, "psams", "rail.psam.json");
      expect(await issuer("provision-psam", "--out", alias, "--programme", "2002", "--psam-id", "000000c1")).to.contain(
        "points PSAM of programme 2002 000000c1",
      );
      const psamKeys = async (f: string) => JSON.parse(await readFile(f, "utf8")) as { currency: number; purchaseKeys: Record<string, string> };
      expect(await psamKeys(auth))
        .to.include({ currency: 999 })
        .and.to.have.deep.property("purchaseKeys", keys.master.authentication);
      expect(await psamKeys(points))
        .to.include({ currency: 1001 })
        .and.to.have.deep.property("purchaseKeys", skyways.redeem);
      expect(await psamKeys(alias))
        .to.include({ currency: 2002 })
        .and.to.have.deep.property("purchaseKeys", keys.programmes["2002"]!.redeem);

      const hsm = join(dir, "benefits", "hsm.json");
      expect(await issuer("provision-programme-hsm", "--programme", "1001", "--out", hsm, "--hsm-id", "0badcafe")).to.contain(
        "provisioned security module 0badcafe of programme 1001 (earn key versions 1, counter 0)",
      );
      expect(JSON.parse(await readFile(hsm, "utf8"))).to.deep.equal({ format: 1, kind: "software", hsmId: "0badcafe", loadKeys: skyways.earn, counter: 0 });

      const clearing = join(dir, "clearing", "keys.json");
      await issuer("export-clearing-keys", "--out", clearing);
      expect((JSON.parse(await readFile(clearing, "utf8")) as { programmeKeys: unknown }).programmeKeys).to.deep.equal({
        "1001": skyways.redeem,
        "2002": keys.programmes["2002"]!.redeem,
      });
      await issuer("export-psam-registry");
      expect(JSON.parse(await readFile(join(dir, "concentrator", "psams.json"), "utf8"))).to.deep.equal({
        psams: [
          { psamId: "000000a1", terminalId: "t1" },
          { psamId: "000000b1", terminalId: "t1" },
        ],
      });

      for (const f of [join(dir, "issuer", "keys.json"), card, auth, points, alias, hsm, clearing]) expect((await stat(f)).mode & 0o777, f).to.equal(0o600);
      const secrets = [
        ...Object.values(keys.master).flatMap((v) => Object.values(v)),
        ...Object.values(keys.programmes).flatMap((p) => [...Object.values(p.redeem), ...Object.values(p.earn)]),
        ...file.points.flatMap((p) => [p.keys.redeem, p.keys.earn]),
      ];
      for (const secret of secrets) for (const o of outputs) expect(o).to.not.contain(secret);
    } finally {
      await cleanup();
    }
  });

  it("refuses programme mistakes clearly: a money or authentication code, a duplicate, an unknown programme, a bad --points", async () => {
    const { dir, cleanup } = await tempDir();
    try {
      const issuer = (...args: string[]) => run(CLI, [...args, "--data", dir]);
      await issuer("create-keys");
      const keysBefore = await readFile(join(dir, "issuer", "keys.json"), "utf8");
      for (const code of ["999", "500", "65536"]) {
        const f = await commandFailure(issuer("create-programme", "--code", code, "--name", "X"));
        expect(f.code, code).to.equal(2);
        expect(f.stderr, code).to.contain(`a programme code is 1000..65535 (1..998 are money currencies, 999 is authentication), not ${code}`);
      }
      const noName = await commandFailure(issuer("create-programme", "--code", "1001"));
      expect(noName.code).to.equal(2);
      expect(noName.stderr).to.contain("--code N and --name TEXT are required");
      expect(await readFile(join(dir, "issuer", "keys.json"), "utf8"), "a refused programme changes nothing").to.equal(keysBefore);

      await issuer("create-programme", "--code", "1001", "--name", "Skyways Miles");
      const dup = await commandFailure(issuer("create-programme", "--code", "1001", "--name", "Other"));
      expect(dup.code).to.equal(2);
      expect(dup.stderr).to.contain('programme 1001 exists already ("Skyways Miles")');

      const card = join(dir, "c.card.json");
      const unknown = await commandFailure(issuer("personalise-card", "--out", card, "--points", "2002:10"));
      expect(unknown.code).to.equal(1);
      expect(unknown.stderr).to.contain(
        "no loyalty programme 2002 at this issuer: create it first with 'netpurse-issuer create-programme --code 2002 --name NAME'",
      );
      for (const [form, why] of [
        ["1001", "write PROGRAMME:POINTS or PROGRAMME:POINTS:MAX"],
        ["1001:1.5", "is not a whole number of points"],
        ["1001:-3", "is not a whole number of points"],
        ["skyways:10", "write PROGRAMME:POINTS"],
        ["1001:10:5", "10 points are more than the maximum 5"],
        ["1001:1:2:3", "write PROGRAMME:POINTS"],
      ] as const) {
        const f = await commandFailure(issuer("personalise-card", "--out", card, "--points", form));
        expect(f.code, form).to.equal(2);
        expect(f.stderr, form).to.contain(why);
      }
      const twice = await commandFailure(issuer("personalise-card", "--out", card, "--points", "1001:1", "--points", "1001:2"));
      expect(twice.code).to.equal(1);
      expect(twice.stderr).to.contain("one points purse per programme");
      expect((await issuer("list-cards")).stdout.trim().split("\n"), "no refused card was made").to.have.length(1);

      const psam = join(dir, "p.psam.json");
      const unknownPsam = await commandFailure(issuer("provision-psam", "--out", psam, "--currency", "2002"));
      expect(unknownPsam.code).to.equal(1);
      expect(unknownPsam.stderr).to.contain("no loyalty programme 2002").and.contain("create-programme --code 2002");
      const notProgramme = await commandFailure(issuer("provision-psam", "--out", psam, "--programme", "999"));
      expect(notProgramme.code).to.equal(2);
      expect(notProgramme.stderr).to.contain("--programme: a programme code is 1000..65535, not 999");
      const both = await commandFailure(issuer("provision-psam", "--out", psam, "--programme", "1001", "--currency", "1001"));
      expect(both.code).to.equal(2);
      expect(both.stderr).to.contain("give one of them");
      const badCurrency = await commandFailure(issuer("provision-psam", "--out", psam, "--currency", "70000"));
      expect(badCurrency.code).to.equal(2);
      expect(badCurrency.stderr).to.contain("currency must be 1..998 (money), 999 (authentication) or a programme code 1000..65535, not 70000");

      const hsm = join(dir, "hsm.json");
      const unknownHsm = await commandFailure(issuer("provision-programme-hsm", "--programme", "2002", "--out", hsm));
      expect(unknownHsm.code).to.equal(1);
      expect(unknownHsm.stderr).to.contain("create-programme --code 2002");
      const moneyHsm = await commandFailure(issuer("provision-programme-hsm", "--programme", "978", "--out", hsm));
      expect(moneyHsm.code).to.equal(2);
      expect(moneyHsm.stderr).to.contain("a programme code is 1000..65535, not 978");
      const badId = await commandFailure(issuer("provision-programme-hsm", "--programme", "1001", "--out", hsm, "--hsm-id", "nothex"));
      expect(badId.code).to.equal(2);
      expect(badId.stderr).to.contain("8 hex digits");
      const missing = await commandFailure(issuer("provision-programme-hsm", "--out", hsm));
      expect(missing.code).to.equal(2);
      expect(missing.stderr).to.contain("--programme CODE and --out FILE are required");
      for (const f of [psam, hsm])
        expect(
          await stat(f).then(
            () => "exists",
            () => "absent",
          ),
          f,
        ).to.equal("absent");
    } finally {
      await cleanup();
    }
  });

  it("explains its mistakes: --help, a missing option, an unknown command, a bad amount", async () => {
    expect((await run(CLI, ["--help"])).stdout).to.contain("personalise-card");
    expect((await run(CLI, ["personalise-card", "--help"])).stdout).to.contain("--out FILE");
    const missing = await commandFailure(run(CLI, ["personalise-card"]));
    expect(missing.code).to.equal(2);
    expect(missing.stderr).to.contain("--out FILE is required");
    const unknown = await commandFailure(run(CLI, ["mint-money"]));
    expect(unknown.code).to.equal(2);
    expect(unknown.stderr).to.contain("unknown command");
    const { dir, cleanup } = await tempDir();
    try {
      await run(CLI, ["create-keys", "--data", dir]);
      const bad = await commandFailure(run(CLI, ["personalise-card", "--out", join(dir, "c.json"), "--value", "12.345", "--data", dir]));
      expect(bad.code).to.equal(1);
      expect(bad.stderr).to.contain("more than 2 decimals");
    } finally {
      await cleanup();
    }
  });
});
