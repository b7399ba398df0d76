// What the issuer and the operator hand clearing, through their real
// commands: the keys clearing checks with (private, never printed, the ones
// that verify the PSAMs' MACs), its merchant registry (demo shops, older
// data folders, add-merchant's acquirer), the cards the audit reads without
// touching them, and the settlement CSV.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile, rm, stat, writeFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { PartyKind, QuarantineReason, type BatchRecord, type QuarantineEntry, type Settlement } from "../../gen/netpurse/clearing/v1/clearing.js";
import { csv, csvField } from "../../lib/csv.js";
import { money } from "../../lib/money.js";
import { pkiPaths } from "../../lib/pki/authority.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import { batchMac } from "../../lib/protocol/psam.js";
import { readClearingMerchants } from "../../services/clearing/merchants.js";
import { SoftwareClearingModule, type ClearingKeysFile } from "../../services/clearing/security-module.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { DEMO_SHOPS, ensureDemoData, paths } from "../../services/network/layout.js";
import { quarantineReport, readCardsAtHand, recordedBeforeClearing, settlementCsv } from "../../services/operator/clearing-report.js";
import { commandFailure, makeCard, makeIssuer, tempDir } from "../support/fixtures.js";

const run = promisify(execFile);
const ISSUER = new URL("../../bin/netpurse-issuer", import.meta.url).pathname;
const OPERATOR = new URL("../../bin/netpurse-operator", import.meta.url).pathname;

describe("clearing's keys, merchants and reports", function () {
  this.timeout(60_000);
  let dir = "";
  let cleanup = async () => {};
  beforeEach(async () => ({ dir, cleanup } = await tempDir()));
  afterEach(async () => cleanup());

  it("export-clearing-keys writes keys that verify a PSAM's batch MAC, mode 0600, and prints none of them", async () => {
    const out: string[] = [];
    const issuer = async (...args: string[]) => {
      const r = await run(ISSUER, [...args, "--data", dir]);
      out.push(r.stdout, r.stderr);
      return r.stdout;
    };
    await issuer("create-keys");
    await issuer("provision-psam", "--out", join(dir, "p.psam.json"), "--psam-id", "0a0b0c0d", "--terminal", "terminal-1");
    const file = join(dir, "clearing", "keys.json");
    expect(await issuer("export-clearing-keys", "--out", file)).to.match(
      /wrote clearing's keys for issuer demo-issuer .*purchase key versions 1.*load key versions 1/,
    );
    expect((await stat(file)).mode & 0o777).to.equal(0o600);

    const keys = JSON.parse(await readFile(file, "utf8")) as ClearingKeysFile;
    const issuerKeys = JSON.parse(await readFile(join(dir, "issuer", "keys.json"), "utf8")) as {
      master: Record<string, Record<string, string>>;
      batchMaster: string;
    };
    expect(keys).to.deep.include({ format: 1, issuerId: "demo-issuer", batchMaster: issuerKeys.batchMaster });
    expect(keys.purchaseKeys).to.deep.equal(issuerKeys.master.purchase);
    expect(keys.loadKeys).to.deep.equal(issuerKeys.master.load);
    // No authentication or verdict key leaves the issuer for clearing.
    expect(Object.keys(keys).sort()).to.deep.equal(["batchMaster", "format", "issuerId", "loadKeys", "purchaseKeys"]);
    for (const secret of [keys.batchMaster, ...Object.values(keys.purchaseKeys), ...Object.values(keys.loadKeys)]) {
      for (const o of out) expect(o).to.not.contain(secret);
    }

    // The PSAM's batch MAC, made with the batch key the issuer provisioned it with, verifies in clearing's module; a changed total does not.
    const opened = await Issuer.open(join(dir, "issuer"));
    const psamId = Buffer.from("0a0b0c0d", "hex");
    const summary = { psamId, batchNumber: 1, count: 2, total: 1089, currency: 978 };
    const mac = batchMac(opened.psamBatchKey("0a0b0c0d"), summary);
    await opened.close();
    const module = await SoftwareClearingModule.open(file);
    expect(module.verifyBatchMac(summary, mac)).to.equal(true);
    expect(module.verifyBatchMac({ ...summary, total: 1090 }, mac)).to.equal(false);

    expect(await issuer("export-clearing-keys", "--out", file, "--issuer-id", "issuer-7")).to.contain("for issuer issuer-7");
    expect((JSON.parse(await readFile(file, "utf8")) as ClearingKeysFile).issuerId).to.equal("issuer-7");
  });

  it("export-clearing-keys explains its mistakes: no --out, a bad issuer id", async () => {
    await run(ISSUER, ["create-keys", "--data", dir]);
    const noOut = await commandFailure(run(ISSUER, ["export-clearing-keys", "--data", dir]));
    expect(noOut.code).to.equal(2);
    expect(noOut.stderr).to.contain("--out FILE is required");
    const badId = await commandFailure(run(ISSUER, ["export-clearing-keys", "--out", join(dir, "k.json"), "--issuer-id", "no spaces", "--data", dir]));
    expect(badId.code).to.equal(2);
    expect(badId.stderr).to.contain("issuer id must be 1..64 characters");
    expect(existsSync(join(dir, "k.json"))).to.equal(false);
  });

  it("the demo data gives clearing its keys, its identity and every demo shop; an older data folder gains them and keeps its merchant keys", async () => {
    const demo = { terminals: [], shops: DEMO_SHOPS.map((d) => d.shop), card: { name: "demo", value: 0, maxBalance: 50_000, expiry: "2031-12-31" } };
    await ensureDemoData(dir, demo);
    const p = paths(dir);
    const expectClearingReady = async () => {
      expect((await stat(join(p.clearing, "keys.json"))).mode & 0o777).to.equal(0o600);
      expect((await stat(join(p.clearing, "merchants.json"))).mode & 0o777).to.equal(0o600);
      const merchants = await readClearingMerchants(join(p.clearing, "merchants.json"));
      expect([...merchants.keys()].sort()).to.deep.equal(["client-shop", "demo-shop", "merchant-shop", "server-shop"]);
      for (const m of merchants.values()) expect(m).to.deep.include({ acquirerId: "demo-acquirer", currency: 978, exponent: 2 });
      expect(merchants.get("demo-shop")!.name).to.equal("Netpurse Demo Bookshop");
    };
    await expectClearingReady();
    expect(existsSync(pkiPaths(pkiDirOf(dir)).cert({ kind: "clearing", id: "clearing-1" }))).to.equal(true);

    // A data folder from before clearing: no clearing folder, no clearing certificate.
    const merchantKeys = await readFile(join(p.payment, "merchants.json"), "utf8");
    await rm(p.clearing, { recursive: true });
    await rm(pkiPaths(pkiDirOf(dir)).cert({ kind: "clearing", id: "clearing-1" }));
    const said: string[] = [];
    await ensureDemoData(dir, demo, (l) => said.push(l));
    await expectClearingReady();
    expect(existsSync(pkiPaths(pkiDirOf(dir)).cert({ kind: "clearing", id: "clearing-1" }))).to.equal(true);
    expect(said.filter((l) => l.includes("entered merchant"))).to.have.length(4);
    expect(said.some((l) => l.includes("registered merchant"))).to.equal(false);
    expect(await readFile(join(p.payment, "merchants.json"), "utf8")).to.equal(merchantKeys);

    // A third run changes nothing.
    const again: string[] = [];
    await ensureDemoData(dir, demo, (l) => again.push(l));
    expect(again).to.deep.equal([]);
  });

  it("add-merchant enters the merchant in clearing's registry with its acquirer and currency, and refuses a bad acquirer", async () => {
    const operator = (...args: string[]) => run(OPERATOR, ["add-merchant", ...args, "--data", dir]);
    expect((await operator("--id", "books-1", "--name", "Books, One", "--acquirer", "acq-2", "--currency", "840")).stdout).to.contain(
      "paid through acquirer acq-2",
    );
    await operator("--id", "books-2", "--name", "Books Two", "--mode", "merchant-compares");
    const merchants = await readClearingMerchants(join(dir, "clearing", "merchants.json"));
    expect(merchants.get("books-1")).to.deep.equal({ merchantId: "books-1", name: "Books, One", acquirerId: "acq-2", currency: 840, exponent: 2 });
    expect(merchants.get("books-2")).to.deep.equal({ merchantId: "books-2", name: "Books Two", acquirerId: "demo-acquirer", currency: 978, exponent: 2 });

    const bad = await commandFailure(operator("--id", "books-3", "--name", "Three", "--acquirer", "an acquirer"));
    expect(bad.code).to.equal(1);
    expect(bad.stderr).to.contain("acquirer id must be 1..64 characters");
    const badCurrency = await commandFailure(operator("--id", "books-3", "--name", "Three", "--currency", "1000"));
    expect(badCurrency.stderr).to.contain("currency must be an ISO 4217 numeric code");
    // Nothing of a refused merchant is written anywhere.
    expect((await readClearingMerchants(join(dir, "clearing", "merchants.json"))).has("books-3")).to.equal(false);
    expect(await readFile(join(dir, "payment", "merchants.json"), "utf8")).to.not.contain("books-3");
  });

  it("the audit reads a card's balance without changing its file, and its opening value from the issuer", async () => {
    const issuer = await makeIssuer(dir);
    const card = await makeCard(issuer, dir, { value: 4_250, name: "alice" });
    await issuer.close();
    const before = await readFile(card, "utf8");
    const mtime = (await stat(card)).mtimeMs;
    const [read] = await readCardsAtHand([card], join(dir, "issuer"));
    expect(read!.balance).to.deep.equal(money(4_250, 978, 2));
    expect(read!.openingValue).to.deep.equal(money(4_250, 978, 2));
    expect(read!.purseId).to.equal((JSON.parse(before) as { purseId: string }).purseId);
    expect(await readFile(card, "utf8")).to.equal(before);
    expect((await stat(card)).mtimeMs).to.equal(mtime);

    // A card another issuer made is named, not guessed at.
    const { dir: other, cleanup: cleanupOther } = await tempDir();
    try {
      const stranger = await makeIssuer(other);
      const foreign = await makeCard(stranger, other, { name: "bob" });
      await stranger.close();
      let error: Error | undefined;
      await readCardsAtHand([card, foreign], join(dir, "issuer")).catch((e: Error) => (error = e));
      expect(error?.message).to.match(/card [0-9a-f]{16} \(.*bob\.card\.json\) was not personalised by the issuer/);
      const junk = join(dir, "junk.card.json");
      await writeFile(junk, JSON.stringify({ format: 1, purseId: "zz" }));
      await readCardsAtHand([junk], join(dir, "issuer")).catch((e: Error) => (error = e));
      expect(error?.message).to.contain("not a software card file");
    } finally {
      await cleanupOther();
    }
  });

  it("lists each quarantined record with its reason, and tells records from PSAMs older than clearing by their empty session", () => {
    const record = (keyVersion: number, psamCounter: number): QuarantineEntry => ({
      entry: {
        $case: "record",
        value: {
          psamId: { value: Buffer.from("0a0b0c0d", "hex") },
          batchNumber: 1,
          reason: QuarantineReason.QUARANTINE_REASON_BAD_RECORD_MAC,
          quarantinedAt: new Date("2031-01-02T03:04:05Z"),
          record: { keyVersion, psamCounter, amount: money(250, 978, 0), merchantId: { value: "demo-shop" }, transactionId: { value: "t-1" } } as BatchRecord,
        },
      },
    });
    const entries = [record(0, 1), record(1, 2), record(0, 3)];
    expect(recordedBeforeClearing(entries)).to.equal(2);
    const report = quarantineReport(entries);
    expect(report.split("\n")[0]).to.equal("3 quarantined:");
    expect(report).to.contain("BAD_RECORD_MAC").and.to.contain("PSAM 0a0b0c0d batch 1 counter 3: EUR 250 (minor units) to demo-shop, transaction t-1");
    expect(quarantineReport([])).to.equal("nothing quarantined");
  });

  it("writes CSV as RFC 4180 has it: a header row, CRLF, quotes only where needed and doubled inside", () => {
    expect(csvField("plain")).to.equal("plain");
    expect(csvField("a,b")).to.equal('"a,b"');
    expect(csvField('say "hi"')).to.equal('"say ""hi"""');
    expect(csvField("two\nlines")).to.equal('"two\nlines"');
    expect(
      csv(
        ["a", "b"],
        [
          ["1", 'x"y'],
          ["2", "p,q"],
        ],
      ),
    ).to.equal('a,b\r\n1,"x""y"\r\n2,"p,q"\r\n');

    const eur = (minor: number) => money(minor, 978, 2);
    const s: Settlement = {
      day: "2031-01-02",
      closed: true,
      closedAt: new Date("2031-01-03T00:00:00Z"),
      purchases: 2,
      loads: 1,
      pointsRedeemed: [],
      redemptions: 0,
      positions: [
        { kind: PartyKind.PARTY_KIND_ISSUER, partyId: "demo-issuer", receivable: eur(2_000), payable: eur(1_089), net: eur(911), transactions: 3 },
        { kind: PartyKind.PARTY_KIND_MERCHANT, partyId: "demo-shop", receivable: eur(1_089), payable: eur(0), net: eur(1_089), transactions: 2 },
      ],
      payouts: [
        {
          payerKind: PartyKind.PARTY_KIND_ISSUER,
          payerId: "demo-issuer",
          payeeKind: PartyKind.PARTY_KIND_ACQUIRER,
          payeeId: "demo-acquirer",
          amount: eur(1_089),
        },
      ],
    };
    const lines = settlementCsv(s).split("\r\n");
    expect(lines).to.have.length(5); // header, two positions, one payout, and the empty string after the last CRLF
    expect(lines[0]).to.equal("day,record,party_kind,party_id,counterparty_kind,counterparty_id,currency,receivable,payable,net,transactions,amount,points");
    expect(lines[1]).to.equal("2031-01-02,position,issuer,demo-issuer,,,978,20.00,10.89,9.11,3,,");
    expect(lines[2]).to.equal("2031-01-02,position,merchant,demo-shop,,,978,10.89,0.00,10.89,2,,");
    expect(lines[3]).to.equal("2031-01-02,payout,issuer,demo-issuer,acquirer,demo-acquirer,978,,,,,10.89,");
    expect(lines[4]).to.equal("");
  });
});
