import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { stat } from "node:fs/promises";
import { join } from "node:path";
import { encodeCommand, decodeResponse, selectCommand, SW } from "../../lib/apdu/apdu.js";
import { readState } from "../../lib/apdu/state-log.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { batchMac, batchRecordMac } from "../../lib/protocol/psam.js";
import { DebitCommand, DebitResponse, DebitResult, InitializeForPurchaseResponse, PURSE_AID, PurseStatusByte } from "../../lib/protocol/purse.js";
import { PurseReader, withOriginalAmount } from "../../client/card/purse-reader.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { MAX_OPEN_DEBITS, SoftwarePsam, type PsamFile } from "../../services/terminal/psam/software-psam.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { cardPurchaseKey, resignedInit } from "../support/card-client.js";
import { EUR, makeCard, makeIssuer, makePsam, swOf, tempDir } from "../support/fixtures.js";

describe("software card and software PSAM (APDU level)", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
  });
  afterEach(async () => {
    await issuer.close();
    await cleanup();
  });

  async function setup(card: Parameters<typeof makeCard>[2] = {}, psam: Parameters<typeof makePsam>[2] = {}) {
    const cardPath = await makeCard(issuer, dir, card);
    const psamPath = await makePsam(issuer, dir, psam);
    const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(cardPath)));
    const atr = await reader.connect();
    const softPsam = await SoftwarePsam.open(psamPath);
    const driver = new PsamDriver(new InProcessTransport(softPsam));
    await driver.connect();
    return { cardPath, psamPath, reader, atr, driver, softPsam };
  }

  async function drawDebit(s: Awaited<ReturnType<typeof setup>>, amount: number, opts: { expected?: boolean } = {}) {
    const init = await s.reader.initializeForPurchase();
    const transactionRef = randomUUID();
    const issued = await s.driver.issueDebitCommand({
      cardAtr: s.atr,
      initializeResponse: init.raw,
      draw: { amount, currency: EUR, transactionRef, merchantId: "shop-1" },
      returnExpectedSignature: opts.expected ?? false,
    });
    return { init, transactionRef, ...issued };
  }

  it("needs the purse selected and answers an unknown AID with 6A82", async () => {
    const card = await SoftwareCard.open(await makeCard(issuer, dir));
    card.reset();
    const readPurse = encodeCommand({ cla: 0x80, ins: 0x5c, p1: 0, p2: 0, data: Buffer.alloc(0), le: 256 });
    expect(decodeResponse(await card.process(readPurse)).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    const wrong = encodeCommand(selectCommand(Buffer.from("F000000001", "hex")));
    expect(decodeResponse(await card.process(wrong)).sw).to.equal(SW.FILE_NOT_FOUND);
    expect(decodeResponse(await card.process(encodeCommand(selectCommand(PURSE_AID)))).sw).to.equal(SW.OK);
    expect(decodeResponse(await card.process(readPurse)).sw).to.equal(SW.OK);
    expect(decodeResponse(await card.process(Buffer.from([0x80, 0x5c]))).sw).to.equal(SW.WRONG_LENGTH);
  });

  it("reads the purse as personalised, and keeps its file private", async () => {
    const s = await setup({ value: 12_345 });
    const p = await s.reader.readPurse();
    expect(p.balance).to.equal(12_345);
    expect(p.maxBalance).to.equal(50_000);
    expect(p.currency).to.equal(EUR);
    expect(p.exponent).to.equal(2);
    expect(p.expiry).to.equal("2099-12-31");
    expect(p.counter).to.equal(0);
    expect((await stat(s.cardPath)).mode & 0o777).to.equal(0o600);
    expect((await stat(s.psamPath)).mode & 0o777).to.equal(0o600);
  });

  it("answers INITIALIZE FOR PURCHASE with its state and a fresh challenge each time", async () => {
    const s = await setup();
    const a = await s.reader.initializeForPurchase();
    const b = await s.reader.initializeForPurchase();
    expect(a.raw).to.have.length(InitializeForPurchaseResponse.size);
    expect(a.parsed.balance).to.equal(10_000);
    expect(a.parsed.challenge.equals(b.parsed.challenge)).to.equal(false);
  });

  it("purchases: the PSAM signs, the card debits and signs, the PSAM verifies and records", async () => {
    const s = await setup();
    const d = await drawDebit(s, 1_250, { expected: true });
    expect(d.psamCounter).to.equal(1);
    const debit = await s.reader.debit(d.debitCommand);
    expect(debit.sw).to.equal(SW.OK);
    expect(debit.parsed!.result).to.equal(DebitResult.DEBITED);
    expect(debit.parsed!.balance).to.equal(8_750);
    expect(debit.parsed!.counter).to.equal(1);
    expect(d.expectedCardSignature!.equals(debit.parsed!.cardSignature)).to.equal(true);

    const v = await s.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(v.verdict).to.equal(0);
    const st = await s.driver.readStatus();
    expect(st).to.include({ psamCounter: 1, batchCount: 1, batchTotal: 1_250, pendingCount: 0 });
    const rec = (await s.driver.readBatchRecord(0))!;
    expect(rec.amount).to.equal(1_250);
    expect(rec.merchantId).to.equal("shop-1");
    expect(rec.transactionRef).to.equal(d.transactionRef);
    expect(rec.cardSignature.equals(debit.parsed!.cardSignature)).to.equal(true);
    // the card's session, so that clearing can check the card's signature itself
    expect(rec).to.include({ keyVersion: d.init.parsed.keyVersion, sessionCounter: 0, cardCounter: 1, balanceAfter: 8_750 });
    expect(rec.challenge.equals(d.init.parsed.challenge)).to.equal(true);
    const { recordMac, ...fields } = rec;
    expect(batchRecordMac(issuer.psamBatchKey(s.softPsam.psamId), Buffer.from(s.softPsam.psamId, "hex"), 1, fields).equals(recordMac)).to.equal(true);

    // the card's log and file hold the debit; a reopened card still has it
    const log = await s.reader.readLog();
    expect(log).to.have.length(1);
    expect(log[0]).to.include({ amount: 1_250, balance: 8_750, counter: 1, transactionRef: d.transactionRef, moduleCounter: 1 });
    const reopened = new PurseReader(new InProcessTransport(await SoftwareCard.open(s.cardPath)));
    await reopened.connect();
    expect((await reopened.readPurse()).balance).to.equal(8_750);
    expect((await readState<PsamFile>(s.psamPath)).batch).to.have.length(1);
  });

  it("refuses a DEBIT command whose amount was changed (6982) and leaves the purse untouched", async () => {
    const s = await setup();
    const d = await drawDebit(s, 1_000);
    const debit = await s.reader.debit(withOriginalAmount(d.debitCommand, 10));
    expect(debit.sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect((await s.reader.readPurse()).balance).to.equal(10_000);
    expect((await s.driver.readStatus()).pendingCount).to.equal(1);
    await s.driver.reverseDebit(d.psamCounter);
    await s.driver.reverseDebit(d.psamCounter); // a retried reversal is answered alike
    expect((await s.driver.readStatus()).pendingCount).to.equal(0);
    expect((await s.driver.readStatus()).batchCount).to.equal(0);
    expect(await swOf(s.driver.reverseDebit(d.psamCounter + 1))).to.equal(SW.REFERENCED_DATA_NOT_FOUND);
  });

  it("refuses a replayed DEBIT command (6985) and one made for another session (6982)", async () => {
    const s = await setup();
    const d = await drawDebit(s, 500);
    expect((await s.reader.debit(d.debitCommand)).sw).to.equal(SW.OK);
    expect((await s.reader.debit(d.debitCommand)).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    await s.reader.initializeForPurchase(); // a new session with a new challenge
    expect((await s.reader.debit(d.debitCommand)).sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect((await s.reader.readPurse()).balance).to.equal(9_500);
  });

  it("signs a refusal when its balance is short, and the PSAM cancels the debit", async () => {
    const s = await setup({ value: 1_000 });
    // The client lies: it shows the PSAM an INITIALIZE response with a higher balance, signed again with the card's
    // own key (without it the PSAM refuses the response: see the cryptogram tests). The card's own check stops it.
    const init = await s.reader.initializeForPurchase();
    const forged = resignedInit(await cardPurchaseKey(s.cardPath), init.raw, { balance: 9_999 });
    const issued = await s.driver.issueDebitCommand({
      cardAtr: s.atr,
      initializeResponse: forged,
      draw: { amount: 5_000, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" },
      returnExpectedSignature: false,
    });
    const debit = await s.reader.debit(issued.debitCommand);
    expect(debit.parsed!.result).to.equal(DebitResult.INSUFFICIENT_BALANCE);
    expect(debit.parsed!.balance).to.equal(1_000);
    const v = await s.driver.verifyDebit(issued.psamCounter, debit.raw);
    expect(v.verdict).to.equal(1); // declined by card
    const st = await s.driver.readStatus();
    expect(st.pendingCount).to.equal(0);
    expect(st.batchCount).to.equal(0);
  });

  it("PSAM refuses an expired card, a wrong currency, an unknown key version, a blocked card and a short balance", async () => {
    // Each a genuine card with that property, personalised by the issuer: its cryptogram verifies, and the PSAM's own check refuses it.
    const expired = await setup({ expiry: "2020-01-31", name: "expired" });
    expect(await swOf(drawDebit(expired, 100))).to.equal(SW.CARD_EXPIRED);

    const usd = await setup({ currency: 840, name: "usd" }, { name: "eur-psam" });
    expect(await swOf(drawDebit(usd, 100))).to.equal(SW.CURRENCY_NOT_ACCEPTED);

    // A card of key version 2, which the issuer created after this PSAM was provisioned with version 1 only.
    const s = await setup({ name: "ok" }, { name: "psam2" });
    await Issuer.createKeys(join(dir, "issuer"), 2);
    const issuer2 = await Issuer.open(join(dir, "issuer"));
    try {
      const v2 = new PurseReader(new InProcessTransport(await SoftwareCard.open(await makeCard(issuer2, dir, { name: "v2", keyVersion: 2 }))));
      const v2Atr = await v2.connect();
      const v2Init = await v2.initializeForPurchase();
      expect(v2Init.parsed.keyVersion).to.equal(2);
      const draw = { amount: 100, currency: EUR, transactionRef: randomUUID(), merchantId: "m" };
      expect(await swOf(s.driver.issueDebitCommand({ cardAtr: v2Atr, initializeResponse: v2Init.raw, draw, returnExpectedSignature: false }))).to.equal(
        SW.REFERENCED_DATA_NOT_FOUND,
      );
    } finally {
      await issuer2.close();
    }

    // A card blocked in its own file (it says so in its answer, under its cryptogram), and a card on the PSAM's blocked list.
    const blockedPath = await makeCard(issuer, dir, { name: "blocked" });
    await SoftwareCard.write(blockedPath, { ...(await readState<CardFile>(blockedPath)), status: "blocked" });
    const blockedCard = new PurseReader(new InProcessTransport(await SoftwareCard.open(blockedPath)));
    const blockedAtr = await blockedCard.connect();
    const draw = { amount: 100, currency: EUR, transactionRef: randomUUID(), merchantId: "m" };
    const blockedInit = await blockedCard.initializeForPurchase();
    expect(blockedInit.parsed.status).to.equal(PurseStatusByte.BLOCKED);
    expect(await swOf(s.driver.issueDebitCommand({ cardAtr: blockedAtr, initializeResponse: blockedInit.raw, draw, returnExpectedSignature: false }))).to.equal(
      SW.CARD_BLOCKED,
    );
    const listed = await setup({ name: "listed" }, { name: "psam-with-list" });
    const listedInit = await listed.reader.initializeForPurchase();
    const psamFile = await readState<PsamFile>(listed.psamPath);
    await SoftwarePsam.write(listed.psamPath, { ...psamFile, blockedPurses: [listedInit.parsed.purseId.toString("hex")] });
    const listingPsam = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(listed.psamPath)));
    await listingPsam.connect();
    expect(
      await swOf(listingPsam.issueDebitCommand({ cardAtr: listed.atr, initializeResponse: listedInit.raw, draw, returnExpectedSignature: false })),
    ).to.equal(SW.CARD_BLOCKED);
    expect((await listingPsam.readStatus()).psamCounter).to.equal(0);

    const init = await s.reader.initializeForPurchase();
    expect(
      await swOf(
        s.driver.issueDebitCommand({ cardAtr: s.atr, initializeResponse: init.raw, draw: { ...draw, amount: 10_001 }, returnExpectedSignature: false }),
      ),
    ).to.equal(SW.INSUFFICIENT_BALANCE);
    expect(await swOf(s.driver.issueDebitCommand({ cardAtr: s.atr, initializeResponse: init.raw.subarray(1), draw, returnExpectedSignature: false }))).to.equal(
      SW.WRONG_LENGTH,
    );
    expect(
      await swOf(s.driver.issueDebitCommand({ cardAtr: Buffer.from("00", "hex"), initializeResponse: init.raw, draw, returnExpectedSignature: false })),
    ).to.equal(SW.WRONG_LENGTH);
    expect((await s.driver.readStatus()).psamCounter).to.equal(0); // nothing signed
  });

  it("keeps a debit open when the card signature does not verify, never reverses a recorded one, and answers a retried VERIFY alike", async () => {
    const s = await setup();
    const d = await drawDebit(s, 700);
    const debit = await s.reader.debit(d.debitCommand);
    const tampered = Buffer.from(debit.raw);
    tampered[DebitResponse.offset("cardSignature")]! ^= 0x01;
    expect(await swOf(s.driver.verifyDebit(d.psamCounter, tampered))).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect((await s.driver.readStatus()).pendingCount).to.equal(1);
    const forgedBalance = DebitResponse.encode({ ...debit.parsed!, balance: 9_999 });
    expect(await swOf(s.driver.verifyDebit(d.psamCounter, forgedBalance))).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    const first = await s.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(await swOf(s.driver.reverseDebit(d.psamCounter))).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    const again = await s.driver.verifyDebit(d.psamCounter, debit.raw); // a retry gets the same answer
    expect(again.recordMac.equals(first.recordMac)).to.equal(true);
    expect(await swOf(s.driver.verifyDebit(d.psamCounter, tampered))).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED); // settled with another signature
    expect(await swOf(s.driver.verifyDebit(d.psamCounter + 7, debit.raw))).to.equal(SW.REFERENCED_DATA_NOT_FOUND);
    expect((await s.driver.readStatus()).batchCount).to.equal(1);
  });

  it("closes a batch with a MAC over its count and total, and refuses debits when full", async () => {
    const s = await setup({}, { batchCapacity: 2 });
    for (const amount of [100, 250]) {
      const d = await drawDebit(s, amount);
      await s.driver.verifyDebit(d.psamCounter, (await s.reader.debit(d.debitCommand)).raw);
    }
    expect(await swOf(drawDebit(s, 10))).to.equal(SW.BATCH_FULL);
    const closed = await s.driver.closeBatch();
    expect(closed).to.include({ batchNumber: 1, count: 2, total: 350, currency: EUR });
    const expected = batchMac(issuer.psamBatchKey(s.softPsam.psamId), { psamId: closed.psamId, batchNumber: 1, count: 2, total: 350, currency: EUR });
    expect(closed.batchMac.equals(expected)).to.equal(true);
    const st = await s.driver.readStatus();
    expect(st).to.include({ batchNumber: 2, batchCount: 0, psamCounter: 2 });
    const d = await drawDebit(s, 10);
    expect(d.psamCounter).to.equal(3);
  });

  it("reads a record of a PSAM file from before records carried the card's session with zeros there", async () => {
    const s = await setup();
    const d = await drawDebit(s, 400);
    await s.driver.verifyDebit(d.psamCounter, (await s.reader.debit(d.debitCommand)).raw);
    const file = await readState<PsamFile>(s.psamPath);
    const old = { ...file.batch[0]! };
    delete old.keyVersion;
    delete old.sessionCounter;
    delete old.challenge;
    delete old.balanceAfter;
    await SoftwarePsam.write(s.psamPath, { ...file, batch: [old] });
    const driver = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(s.psamPath)));
    await driver.connect();
    const rec = (await driver.readBatchRecord(0))!;
    expect(rec).to.include({ psamCounter: d.psamCounter, amount: 400, keyVersion: 0, sessionCounter: 0, balanceAfter: 0, cardCounter: 1 });
    expect(rec.challenge.equals(Buffer.alloc(8))).to.equal(true);
    // its MAC was made over other fields: clearing quarantines it
    const { recordMac, ...fields } = rec;
    expect(batchRecordMac(issuer.psamBatchKey(s.softPsam.psamId), Buffer.from(s.softPsam.psamId, "hex"), 1, fields).equals(recordMac)).to.equal(false);
  });

  it("answers a retried VERIFY DEBIT alike after the batch was closed, and a retried decline alike", async () => {
    const s = await setup({ value: 1_000 });
    const d = await drawDebit(s, 300);
    const debit = await s.reader.debit(d.debitCommand);
    const first = await s.driver.verifyDebit(d.psamCounter, debit.raw);
    const closed = await s.driver.closeBatch();
    expect(closed.count).to.equal(1);
    const again = await s.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(again).to.deep.equal(first);
    expect(await s.driver.lastClosedBatch()).to.deep.equal(closed); // readable again, in case its answer was lost

    const init = await s.reader.initializeForPurchase();
    const forged = resignedInit(await cardPurchaseKey(s.cardPath), init.raw, { balance: 9_999 }); // as above: reaches the card's own check
    const big = await s.driver.issueDebitCommand({
      cardAtr: s.atr,
      initializeResponse: forged,
      draw: { amount: 5_000, currency: EUR, transactionRef: randomUUID(), merchantId: "m" },
      returnExpectedSignature: false,
    });
    const declined = await s.reader.debit(big.debitCommand);
    expect((await s.driver.verifyDebit(big.psamCounter, declined.raw)).verdict).to.equal(1);
    expect((await s.driver.verifyDebit(big.psamCounter, declined.raw)).verdict).to.equal(1);
    await s.driver.reverseDebit(big.psamCounter); // cancelled already: answered alike
    expect((await s.driver.readStatus()).batchCount).to.equal(0);
  });

  it("keeps open debits within their own bound, so abandoned ones never fill the batch", async () => {
    const s = await setup({}, { batchCapacity: 2 });
    const open: number[] = [];
    for (let i = 0; i < MAX_OPEN_DEBITS; i++) open.push((await drawDebit(s, 1)).psamCounter); // never answered
    expect(await swOf(drawDebit(s, 1))).to.equal(SW.TOO_MANY_OPEN_DEBITS);
    await s.driver.reverseDebit(open[0]!);
    const d = await drawDebit(s, 10);
    await s.driver.verifyDebit(d.psamCounter, (await s.reader.debit(d.debitCommand)).raw);
    expect((await s.driver.readStatus()).batchCount).to.equal(1);
  });

  it("refuses DEBIT without a session and of the wrong length", async () => {
    const s = await setup();
    const fake = DebitCommand.encode({
      amount: 1,
      currency: EUR,
      psamId: Buffer.alloc(4),
      psamCounter: 1,
      dateTime: 0,
      transactionRef: randomUUID(),
      psamSignature: Buffer.alloc(8),
    });
    expect((await s.reader.debit(fake)).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    await s.reader.initializeForPurchase();
    expect((await s.reader.debit(fake.subarray(1))).sw).to.equal(SW.WRONG_LENGTH);
  });
});
