// The issuer's commands through their real entry point: files private,
// key material never printed.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
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
