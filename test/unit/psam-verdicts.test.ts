// The PSAM's verdict MACs (docs/protocol.md, "PSAM verdicts"): the PSAM's
// MAC over the DEBIT command it issued, over its verdict on the card's answer
// and over a reversal verify with the payment operator's derivation of its
// key, and with nothing else: not another PSAM's key, counter, amount,
// transaction, verdict or tag. The keys: the issuer's verdict master key, a
// keys file made before it, the PSAM file and the payment server's copy.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { readState } from "../../lib/apdu/state-log.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { diversifyPsamKey, Verdict, type IssuedMacFields, type ReversalMacFields, type VerdictMacFields } from "../../lib/protocol/psam.js";
import { DebitCommand, DebitResponse, DebitResult } from "../../lib/protocol/purse.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { SoftwareSecurityModule, VERDICT_KEY_FILE } from "../../services/payment/security-module.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam, type PsamFile } from "../../services/terminal/psam/software-psam.js";
import { cardPurchaseKey, resignedInit } from "../support/card-client.js";
import { EUR, makeCard, makeIssuer, makePsam, tempDir } from "../support/fixtures.js";

const flip = (b: Uint8Array): Buffer => {
  const c = Buffer.from(b);
  c.writeUInt8(c.readUInt8(0) ^ 0x01, 0);
  return c;
};

describe("PSAM verdicts: the PSAM's MACs and the payment operator's check", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  let checker: SoftwareSecurityModule;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
    await issuer.exportVerdictKey(join(dir, "payment", VERDICT_KEY_FILE));
    checker = await SoftwareSecurityModule.open(join(dir, "payment"));
  });
  afterEach(async () => {
    await issuer.close();
    await cleanup();
  });

  async function setup(card: Parameters<typeof makeCard>[2] = {}) {
    const cardPath = await makeCard(issuer, dir, card);
    const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(cardPath)));
    const atr = await reader.connect();
    const psam = await SoftwarePsam.open(await makePsam(issuer, dir, { name: "psam-a" }));
    const driver = new PsamDriver(new InProcessTransport(psam));
    await driver.connect();
    const other = await SoftwarePsam.open(await makePsam(issuer, dir, { name: "psam-b" }));
    return { cardPath, reader, atr, driver, psamId: psam.psamId, otherPsamId: other.psamId };
  }

  /** DRAW AMOUNT for a fresh transaction, and the fields the payment server's record gives for its MAC. */
  async function draw(s: Awaited<ReturnType<typeof setup>>, amount: number, expected: boolean) {
    const init = await s.reader.initializeForPurchase();
    const transactionRef = randomUUID();
    const issued = await s.driver.issueDebitCommand({
      cardAtr: s.atr,
      initializeResponse: init.raw,
      draw: { amount, currency: EUR, transactionRef, merchantId: "shop-1" },
      returnExpectedSignature: expected,
    });
    const command = DebitCommand.decode(issued.debitCommand);
    const fields: Omit<IssuedMacFields, "psamId"> = {
      psamCounter: issued.psamCounter,
      transactionRef,
      amount,
      currency: EUR,
      exponent: init.parsed.exponent,
      purseId: init.parsed.purseId,
      cardCounter: init.parsed.counter,
      dateTime: command.dateTime,
      psamSignature: command.psamSignature,
      expectedCardSignature: issued.expectedCardSignature ?? Buffer.alloc(8),
    };
    return { issued, fields, transactionRef };
  }

  it('holds in each PSAM the verdict key the operator derives: AES-ECB(MK_verdict, D(PSAM id || "PSAM")), not its batch key', async () => {
    const psamPath = await makePsam(issuer, dir);
    const file = JSON.parse(await readFile(psamPath, "utf8")) as { psamId: string; verdictKey: string; batchKey: string };
    const keys = JSON.parse(await readFile(Issuer.keysPath(join(dir, "issuer")), "utf8")) as { verdictMaster: string; batchMaster: string };
    const exported = JSON.parse(await readFile(join(dir, "payment", VERDICT_KEY_FILE), "utf8")) as { verdictMaster: string };
    expect(exported.verdictMaster).to.equal(keys.verdictMaster);
    expect(file.verdictKey).to.equal(diversifyPsamKey(Buffer.from(keys.verdictMaster, "hex"), Buffer.from(file.psamId, "hex")).toString("hex"));
    expect(file.verdictKey).to.equal(issuer.psamVerdictKey(file.psamId).toString("hex"));
    expect(file.verdictKey).to.not.equal(file.batchKey);
    expect((await stat(join(dir, "payment", VERDICT_KEY_FILE))).mode & 0o777).to.equal(0o600);
  });

  it("DEBIT command issued: the MAC verifies, with and without the expected signature, and fails for anything else", async () => {
    const s = await setup();
    for (const expected of [false, true]) {
      const { issued, fields } = await draw(s, 1_250, expected);
      expect(issued.issuedMac).to.have.length(8);
      expect(checker.issued(s.psamId, fields, issued.issuedMac), `P1 = 0${Number(expected)}`).to.equal(true);
      expect(checker.issued(s.otherPsamId, fields, issued.issuedMac), "another PSAM's key").to.equal(false);
      expect(checker.issued(s.psamId, { ...fields, psamCounter: fields.psamCounter + 1 }, issued.issuedMac), "another counter").to.equal(false);
      expect(checker.issued(s.psamId, { ...fields, amount: 1_251 }, issued.issuedMac), "another amount").to.equal(false);
      expect(checker.issued(s.psamId, { ...fields, transactionRef: randomUUID() }, issued.issuedMac), "another transaction").to.equal(false);
      expect(checker.issued(s.psamId, { ...fields, cardCounter: fields.cardCounter + 1 }, issued.issuedMac), "another card counter").to.equal(false);
      expect(
        checker.issued(s.psamId, { ...fields, expectedCardSignature: flip(fields.expectedCardSignature) }, issued.issuedMac),
        "another expected signature",
      ).to.equal(false);
      expect(checker.issued(s.psamId, fields, flip(issued.issuedMac)), "one bit flipped").to.equal(false);
      const asReversal: Omit<ReversalMacFields, "psamId"> = {
        psamCounter: fields.psamCounter,
        transactionRef: fields.transactionRef,
        amount: 1_250,
        currency: EUR,
      };
      expect(checker.reversed(s.psamId, asReversal, issued.issuedMac), "the same MAC under another tag").to.equal(false);
    }
  });

  it("the verdict: RECORDED and DECLINED verify, again on a retry, and fail for another verdict, PSAM, counter, amount or transaction", async () => {
    const s = await setup({ value: 1_000 });
    const { issued, transactionRef } = await draw(s, 300, false);
    const debit = await s.reader.debit(issued.debitCommand);
    const v = await s.driver.verifyDebit(issued.psamCounter, debit.raw);
    expect(v.verdict).to.equal(Verdict.RECORDED);
    const fields: Omit<VerdictMacFields, "psamId"> = {
      psamCounter: issued.psamCounter,
      transactionRef,
      amount: 300,
      currency: EUR,
      verdict: Verdict.RECORDED,
      cardResult: DebitResult.DEBITED,
      batchNumber: v.batchNumber,
      cardSignature: DebitResponse.decode(debit.raw).cardSignature,
    };
    expect(checker.verdict(s.psamId, fields, v.verdictMac)).to.equal(true);
    expect(checker.verdict(s.psamId, { ...fields, verdict: Verdict.DECLINED_BY_CARD }, v.verdictMac), "another verdict").to.equal(false);
    expect(checker.verdict(s.otherPsamId, fields, v.verdictMac), "another PSAM's key").to.equal(false);
    expect(checker.verdict(s.psamId, { ...fields, psamCounter: fields.psamCounter + 1 }, v.verdictMac), "another counter").to.equal(false);
    expect(checker.verdict(s.psamId, { ...fields, amount: 301 }, v.verdictMac), "another amount").to.equal(false);
    expect(checker.verdict(s.psamId, { ...fields, transactionRef: randomUUID() }, v.verdictMac), "another transaction").to.equal(false);
    expect(checker.verdict(s.psamId, { ...fields, batchNumber: fields.batchNumber + 1 }, v.verdictMac), "another batch").to.equal(false);
    expect(checker.verdict(s.psamId, { ...fields, cardSignature: flip(fields.cardSignature) }, v.verdictMac), "another card answer").to.equal(false);
    const again = await s.driver.verifyDebit(issued.psamCounter, debit.raw);
    expect(again.verdictMac.equals(v.verdictMac), "a retry gets the same MAC").to.equal(true);

    // A decline the card signs: the client showed the PSAM a higher balance than the card has, signed again with the
    // card's own key (without it, the PSAM refuses the response at INITIALIZE and there is nothing to decline).
    const init = await s.reader.initializeForPurchase();
    const forged = resignedInit(await cardPurchaseKey(s.cardPath), init.raw, { balance: 9_999 });
    const declinedRef = randomUUID();
    const big = await s.driver.issueDebitCommand({
      cardAtr: s.atr,
      initializeResponse: forged,
      draw: { amount: 5_000, currency: EUR, transactionRef: declinedRef, merchantId: "shop-1" },
      returnExpectedSignature: false,
    });
    const refusal = await s.reader.debit(big.debitCommand);
    const d = await s.driver.verifyDebit(big.psamCounter, refusal.raw);
    expect(d.verdict).to.equal(Verdict.DECLINED_BY_CARD);
    const declined = {
      psamCounter: big.psamCounter,
      transactionRef: declinedRef,
      amount: 5_000,
      currency: EUR,
      verdict: Verdict.DECLINED_BY_CARD,
      cardResult: DebitResult.INSUFFICIENT_BALANCE,
      batchNumber: d.batchNumber,
      cardSignature: DebitResponse.decode(refusal.raw).cardSignature,
    };
    expect(checker.verdict(s.psamId, declined, d.verdictMac)).to.equal(true);
    expect(checker.verdict(s.psamId, { ...declined, verdict: Verdict.RECORDED }, d.verdictMac), "a decline is not a record").to.equal(false);
    expect(checker.verdict(s.psamId, { ...declined, cardResult: DebitResult.DEBITED }, d.verdictMac), "another card result").to.equal(false);
  });

  it("the reversal: the MAC verifies, again on a retry, and fails for another PSAM, counter, amount, transaction or tag", async () => {
    const s = await setup();
    const { issued, transactionRef, fields: issuedFields } = await draw(s, 700, false);
    const mac = await s.driver.reverseDebit(issued.psamCounter);
    const fields: Omit<ReversalMacFields, "psamId"> = { psamCounter: issued.psamCounter, transactionRef, amount: 700, currency: EUR };
    expect(checker.reversed(s.psamId, fields, mac)).to.equal(true);
    expect(checker.reversed(s.otherPsamId, fields, mac), "another PSAM's key").to.equal(false);
    expect(checker.reversed(s.psamId, { ...fields, psamCounter: fields.psamCounter + 1 }, mac), "another counter").to.equal(false);
    expect(checker.reversed(s.psamId, { ...fields, amount: 70 }, mac), "another amount").to.equal(false);
    expect(checker.reversed(s.psamId, { ...fields, transactionRef: randomUUID() }, mac), "another transaction").to.equal(false);
    expect(checker.issued(s.psamId, issuedFields, mac), "the same MAC under another tag").to.equal(false);
    expect((await s.driver.reverseDebit(issued.psamCounter)).equals(mac), "a retry gets the same MAC").to.equal(true);
  });

  it("a keys file made before PSAM verdicts gets a verdict master key on open (mode 0600), kept from then on", async () => {
    const path = Issuer.keysPath(join(dir, "issuer"));
    const old = JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
    delete old.verdictMaster;
    await writeFile(path, JSON.stringify(old), { mode: 0o644 });
    const reopened = await Issuer.open(join(dir, "issuer"));
    await reopened.close();
    const now = JSON.parse(await readFile(path, "utf8")) as { verdictMaster?: string; batchMaster: string };
    expect(now.verdictMaster).to.match(/^[0-9a-f]{32}$/);
    expect(now.batchMaster).to.equal(old.batchMaster);
    expect((await stat(path)).mode & 0o777).to.equal(0o600);
    const again = await Issuer.open(join(dir, "issuer"));
    await again.close();
    expect((JSON.parse(await readFile(path, "utf8")) as { verdictMaster: string }).verdictMaster).to.equal(now.verdictMaster);
  });

  it("a PSAM file without a verdict key does not load, says what to do, and loads once the issuer adds it", async () => {
    const psamPath = await makePsam(issuer, dir, { name: "old" });
    const file = JSON.parse(await readFile(psamPath, "utf8")) as Record<string, unknown>;
    const key = file.verdictKey;
    delete file.verdictKey;
    await writeFile(psamPath, JSON.stringify({ ...file, counter: 41 }));
    let error: Error | undefined;
    await SoftwarePsam.open(psamPath).catch((e: Error) => (error = e));
    expect(error?.message)
      .to.match(/holds no verdict key/)
      .and.match(/netpurse-issuer add-verdict-key --psam/);
    expect(await issuer.addVerdictKey(psamPath)).to.include({ added: true });
    expect(await issuer.addVerdictKey(psamPath)).to.include({ added: false });
    const after = await readState<PsamFile>(psamPath);
    expect(after).to.include({ verdictKey: key, counter: 41 }); // nothing else changed
    expect((await stat(psamPath)).mode & 0o777).to.equal(0o600);
    await SoftwarePsam.open(psamPath);
  });

  it("the payment server's security module will not start without its key file, and says how to make it", async () => {
    let error: Error | undefined;
    await SoftwareSecurityModule.open(join(dir, "elsewhere")).catch((e: Error) => (error = e));
    expect(error?.message)
      .to.match(/no PSAM verdict key at .*psam-verdict-key\.json/)
      .and.match(/netpurse-issuer export-verdict-key --out/);
  });
});
