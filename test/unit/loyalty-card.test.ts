// The card's authentication application and points purses, and the PSAMs
// that serve them (docs/loyalty.md), at the APDU level: real software cards
// and PSAMs in files of their own, their keys diversified here from random
// masters, as the issuer would.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { encodeCommand, decodeResponse, SW } from "../../lib/apdu/apdu.js";
import { readState } from "../../lib/apdu/state-log.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { deriveSessionKey, diversifyCardKey } from "../../lib/crypto/keys.js";
import { psamId as toPsamId, txnId } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, money } from "../../lib/money.js";
import { Security } from "../../lib/pki/security.js";
import { DebitVerdict, type PsamJob, type PsamJobResult } from "../../gen/netpurse/terminal/v1/terminal.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import type { TerminalStore } from "../../services/terminal/store.js";
import { InitializeForLoadResponse, LoadCommand, LoadResult, loadS2, type LoadInitCommand } from "../../lib/protocol/load.js";
import { Verdict, verdictMac } from "../../lib/protocol/psam.js";
import {
  DebitCommand,
  DebitResult,
  InitializeForPurchaseResponse,
  LogKind,
  PURSE_CLA,
  PurseIns,
  psamSignature,
  type InitializeForPurchase,
} from "../../lib/protocol/purse.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { pointsPurse } from "../../client/card/purse-state.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { HsmRefused, SoftwareHsm } from "../../services/load/hsm.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam, type PsamFile } from "../../services/terminal/psam/software-psam.js";
import { EUR, swOf, tempDir } from "../support/fixtures.js";

const SKYWAYS = 1001;
const OTHER_PROGRAMME = 1002;
const KEY_VERSION = 1;

const key = () => randomBytes(16);
const hex = (b: Buffer) => b.toString("hex");

/** The issuer's master keys of one key version, as the tests need them. */
interface Masters {
  purchase: Buffer;
  load: Buffer;
  authentication: Buffer;
  redeem: Record<number, Buffer>;
  earn: Record<number, Buffer>;
}

describe("authentication and points on the card and the PSAM (APDU level)", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let masters: Masters;
  const opened: { close(): Promise<void> }[] = [];

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    masters = {
      purchase: key(),
      load: key(),
      authentication: key(),
      redeem: { [SKYWAYS]: key(), [OTHER_PROGRAMME]: key() },
      earn: { [SKYWAYS]: key(), [OTHER_PROGRAMME]: key() },
    };
  });
  afterEach(async () => {
    for (const o of opened.splice(0)) await o.close();
    await cleanup();
  });

  /** Personalises a card: 100.00 EUR and the points purses asked for, every key diversified by its purse id. */
  async function makeCard(points: { programme: number; balance: number; maxBalance?: number }[] = [{ programme: SKYWAYS, balance: 500 }]) {
    const purseId = randomBytes(8);
    const file: CardFile = {
      format: 1,
      providerId: "0000beef",
      purseId: hex(purseId),
      currency: EUR,
      exponent: 2,
      balance: 10_000,
      maxBalance: 50_000,
      expiry: "2099-12-31",
      counter: 0,
      keyVersion: KEY_VERSION,
      status: "active",
      keys: {
        purchase: hex(diversifyCardKey(masters.purchase, purseId)),
        load: hex(diversifyCardKey(masters.load, purseId)),
        authentication: hex(diversifyCardKey(masters.authentication, purseId)),
      },
      log: [],
      points: points.map((p) => ({
        programme: p.programme,
        balance: p.balance,
        maxBalance: p.maxBalance ?? 10_000,
        keys: { redeem: hex(diversifyCardKey(masters.redeem[p.programme]!, purseId)), earn: hex(diversifyCardKey(masters.earn[p.programme]!, purseId)) },
      })),
    };
    const path = join(dir, `card-${hex(purseId)}.json`);
    await SoftwareCard.write(path, file);
    const card = await SoftwareCard.open(path);
    opened.push(card);
    const reader = new PurseReader(new InProcessTransport(card));
    const atr = await reader.connect();
    return { path, purseId, reader, atr, card };
  }
  type Card = Awaited<ReturnType<typeof makeCard>>;

  /** A PSAM of one currency holding `master` as its purchase master key: money, authentication (999) or a programme's points. */
  async function writePsam(currency: number, master: Buffer, folder = dir) {
    const psamId = randomBytes(4);
    const verdictKey = key();
    const file: PsamFile = {
      format: 1,
      psamId: hex(psamId),
      currency,
      purchaseKeys: { [KEY_VERSION]: hex(master) },
      batchKey: hex(key()),
      verdictKey: hex(verdictKey),
      batchCapacity: 100,
      counter: 0,
      batchNumber: 1,
      batch: [],
      pending: [],
      blockedPurses: [],
      settled: [],
    };
    const path = join(folder, `psam-${hex(psamId)}.psam.json`);
    await SoftwarePsam.write(path, file);
    return { psamId, verdictKey, path };
  }

  async function makePsam(currency: number, master: Buffer) {
    const { psamId, verdictKey, path } = await writePsam(currency, master);
    const psam = await SoftwarePsam.open(path);
    opened.push(psam);
    const driver = new PsamDriver(new InProcessTransport(psam));
    await driver.connect();
    return { psamId, verdictKey, driver };
  }
  type Psam = Awaited<ReturnType<typeof makePsam>>;

  /** INITIALIZE FOR PURCHASE on the purse of `currency`, then the PSAM's DEBIT command for `amount`. */
  async function draw(card: Card, psam: Psam, amount: number, currency: number) {
    const init = await card.reader.initializeForPurchase(currency);
    const transactionRef = randomUUID();
    const issued = await psam.driver.issueDebitCommand({
      cardAtr: card.atr,
      initializeResponse: init.raw,
      draw: { amount, currency, transactionRef, merchantId: "skyways" },
      returnExpectedSignature: true,
    });
    return { init, transactionRef, ...issued };
  }

  /** A DEBIT command signed as a PSAM holding `master` would sign it, for whatever amount: what a PSAM would never issue. */
  function forgedDebit(master: Buffer, init: InitializeForPurchase, f: { amount: number; currency: number }): Buffer {
    const session = { purseId: init.purseId, cardCounter: init.counter, challenge: init.challenge };
    const fields = { ...f, psamId: Buffer.from("0badf00d", "hex"), psamCounter: 7, dateTime: Math.floor(Date.now() / 1000), transactionRef: randomUUID() };
    const sk = deriveSessionKey(diversifyCardKey(master, init.purseId), {
      cardCounter: init.counter,
      securityModuleId: fields.psamId,
      securityModuleCounter: fields.psamCounter,
      challenge: init.challenge,
    });
    return DebitCommand.encode({ ...fields, psamSignature: psamSignature(sk, session, fields) });
  }

  async function points(card: Card, programme = SKYWAYS): Promise<number | undefined> {
    return (await card.reader.readPointsPurses()).find((p) => p.currency === programme)?.balance;
  }

  it("authenticates: a draw of 0 in 999, the card signs and logs, the PSAM answers AUTHENTICATED under its verdict MAC and records nothing", async () => {
    const card = await makeCard();
    const psam = await makePsam(AUTHENTICATION_CURRENCY, masters.authentication);
    const d = await draw(card, psam, 0, AUTHENTICATION_CURRENCY);
    expect(d.init.parsed).to.include({ currency: AUTHENTICATION_CURRENCY, exponent: 0, balance: 0, counter: 0 });

    const debit = await card.reader.debit(d.debitCommand);
    expect(debit.sw).to.equal(SW.OK);
    expect(debit.parsed).to.include({ result: DebitResult.DEBITED, counter: 1, balance: 0 });
    expect(debit.parsed!.cardSignature.equals(d.expectedCardSignature!)).to.equal(true);

    const v = await psam.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(v.verdict).to.equal(Verdict.AUTHENTICATED);
    expect(v.batchNumber).to.equal(1);
    expect(v.recordMac.equals(Buffer.alloc(8))).to.equal(true);
    const bound = {
      psamId: psam.psamId,
      psamCounter: d.psamCounter,
      transactionRef: d.transactionRef,
      amount: 0,
      currency: AUTHENTICATION_CURRENCY,
      cardResult: DebitResult.DEBITED,
      batchNumber: 1,
      cardSignature: debit.parsed!.cardSignature,
    };
    expect(verdictMac(psam.verdictKey, { ...bound, verdict: Verdict.AUTHENTICATED }).equals(v.verdictMac)).to.equal(true);
    expect(verdictMac(psam.verdictKey, { ...bound, verdict: Verdict.RECORDED }).equals(v.verdictMac)).to.equal(false);
    expect(await psam.driver.readStatus()).to.include({ psamCounter: 1, batchCount: 0, batchTotal: 0, pendingCount: 0 });
    expect(await psam.driver.readBatch()).to.have.length(0);

    // a retry gets the same answer; it cannot be reversed
    const again = await psam.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(again.verdict).to.equal(Verdict.AUTHENTICATED);
    expect(again.verdictMac.equals(v.verdictMac)).to.equal(true);
    expect(await swOf(psam.driver.reverseDebit(d.psamCounter))).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    expect(await psam.driver.closeBatch()).to.include({ count: 0, total: 0, currency: AUTHENTICATION_CURRENCY });

    // nothing moved but the counter, and the card's log says what happened
    const money = await card.reader.readPurse();
    expect(money).to.include({ balance: 10_000, counter: 1 });
    expect(await points(card)).to.equal(500);
    const [entry, ...older] = await card.reader.readLog();
    expect(older).to.have.length(0);
    expect(entry).to.include({ kind: LogKind.AUTHENTICATION, counter: 1, amount: 0, currency: AUTHENTICATION_CURRENCY, balance: 0, moduleCounter: 1 });
    expect(entry!.transactionRef).to.equal(d.transactionRef);
    const file = await readState<CardFile>(card.path);
    expect(file).to.include({ counter: 1, balance: 10_000 });
    expect(file.points![0]!.balance).to.equal(500);
  });

  it("refuses an authentication of more than 0 at the PSAM (9405) and at the card (6A80), and a money draw of 0 (9405)", async () => {
    const card = await makeCard();
    const auth = await makePsam(AUTHENTICATION_CURRENCY, masters.authentication);
    expect(await swOf(draw(card, auth, 1, AUTHENTICATION_CURRENCY))).to.equal(SW.AMOUNT_OUT_OF_RANGE);
    expect(await auth.driver.readStatus()).to.include({ psamCounter: 0, pendingCount: 0 });

    // a DEBIT of 1 in 999 carrying a valid PSAM signature: the card still will not sign it
    const init = await card.reader.initializeForPurchase(AUTHENTICATION_CURRENCY);
    const answer = await card.reader.debit(forgedDebit(masters.authentication, init.parsed, { amount: 1, currency: AUTHENTICATION_CURRENCY }));
    expect(answer.sw).to.equal(SW.WRONG_DATA);

    const money = await makePsam(EUR, masters.purchase);
    expect(await swOf(draw(card, money, 0, EUR))).to.equal(SW.AMOUNT_OUT_OF_RANGE);
    // a money card session is not an authentication: 999 on it is another currency
    const moneyInit = await card.reader.initializeForPurchase();
    const zero999 = money.driver.issueDebitCommand({
      cardAtr: card.atr,
      initializeResponse: moneyInit.raw,
      draw: { amount: 0, currency: AUTHENTICATION_CURRENCY, transactionRef: randomUUID(), merchantId: "shop-1" },
      returnExpectedSignature: false,
    });
    expect(await swOf(zero999)).to.equal(SW.CURRENCY_NOT_ACCEPTED);
    // and the authentication application's answer is signed under a key a money PSAM does not hold
    expect(await swOf(draw(card, money, 0, AUTHENTICATION_CURRENCY))).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await money.driver.readStatus()).to.include({ psamCounter: 0, pendingCount: 0 });

    expect(await card.reader.readPurse()).to.include({ balance: 10_000, counter: 0 });
    expect(await card.reader.readLog()).to.have.length(0);
  });

  it("refuses a replayed authentication DEBIT: in a new session it does not verify (6982), without one there is none (6985)", async () => {
    const card = await makeCard();
    const psam = await makePsam(AUTHENTICATION_CURRENCY, masters.authentication);
    const d = await draw(card, psam, 0, AUTHENTICATION_CURRENCY);
    expect((await card.reader.debit(d.debitCommand)).sw).to.equal(SW.OK);
    expect((await card.reader.debit(d.debitCommand)).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    await card.reader.initializeForPurchase(AUTHENTICATION_CURRENCY);
    expect((await card.reader.debit(d.debitCommand)).sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await card.reader.readPurse()).to.include({ counter: 1 });
    expect(await card.reader.readLog()).to.have.length(1);
  });

  it("an authentication signed under another key is refused: a money PSAM's DEBIT (6982), a money card response at an authentication PSAM (6982)", async () => {
    const card = await makeCard();
    const init = await card.reader.initializeForPurchase(AUTHENTICATION_CURRENCY);
    const answer = await card.reader.debit(forgedDebit(masters.purchase, init.parsed, { amount: 0, currency: AUTHENTICATION_CURRENCY }));
    expect(answer.sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);

    // the money purse's answer relabelled 999 does not carry a cryptogram under the authentication key
    const psam = await makePsam(AUTHENTICATION_CURRENCY, masters.authentication);
    const money = await card.reader.initializeForPurchase();
    const relabelled = Buffer.from(money.raw);
    relabelled.writeUInt16BE(AUTHENTICATION_CURRENCY, InitializeForPurchaseResponse.offset("currency"));
    relabelled.writeUInt32BE(0, InitializeForPurchaseResponse.offset("balance"));
    const refused = psam.driver.issueDebitCommand({
      cardAtr: card.atr,
      initializeResponse: relabelled,
      draw: { amount: 0, currency: AUTHENTICATION_CURRENCY, transactionRef: randomUUID(), merchantId: "skyways" },
      returnExpectedSignature: false,
    });
    expect(await swOf(refused)).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await card.reader.readPurse()).to.include({ counter: 0 });
  });

  it("redeems points: the points purse goes down, the money purse stays, the points PSAM records in the programme's code", async () => {
    const card = await makeCard();
    const psam = await makePsam(SKYWAYS, masters.redeem[SKYWAYS]!);
    const d = await draw(card, psam, 200, SKYWAYS);
    expect(d.init.parsed).to.include({ currency: SKYWAYS, exponent: 0, balance: 500 });
    const debit = await card.reader.debit(d.debitCommand);
    expect(debit.parsed).to.include({ result: DebitResult.DEBITED, counter: 1, balance: 300 });
    expect(debit.parsed!.cardSignature.equals(d.expectedCardSignature!)).to.equal(true);

    const v = await psam.driver.verifyDebit(d.psamCounter, debit.raw);
    expect(v.verdict).to.equal(Verdict.RECORDED);
    const [record, ...more] = await psam.driver.readBatch();
    expect(more).to.have.length(0);
    expect(record).to.include({ amount: 200, currency: SKYWAYS, balanceAfter: 300, cardCounter: 1, sessionCounter: 0 });
    expect(await psam.driver.readStatus()).to.include({ batchCount: 1, batchTotal: 200, currency: SKYWAYS });
    expect(await psam.driver.closeBatch()).to.include({ count: 1, total: 200, currency: SKYWAYS });

    const [held, ...others] = await card.reader.readPointsPurses();
    expect(others).to.have.length(0);
    expect(held).to.include({ currency: SKYWAYS, exponent: 0, balance: 300, maxBalance: 10_000, counter: 1 });
    expect(held!.purseId.equals(card.purseId)).to.equal(true);
    expect(pointsPurse(held!)).to.deep.equal({
      programme: SKYWAYS,
      balance: { amountMinor: 300n, currency: SKYWAYS, exponent: 0 },
      maxBalance: { amountMinor: 10_000n, currency: SKYWAYS, exponent: 0 },
    });
    expect(await card.reader.readPurse()).to.include({ currency: EUR, balance: 10_000, counter: 1 });
    const [entry] = await card.reader.readLog();
    expect(entry).to.include({ kind: LogKind.POINTS_REDEMPTION, amount: 200, currency: SKYWAYS, balance: 300, counter: 1 });
    expect((await readState<CardFile>(card.path)).points![0]!.balance).to.equal(300);
  });

  it("refuses a redemption beyond the points held: the PSAM (9404), the card (signed result 01, nothing changed), and a client raising its balance (6982)", async () => {
    const card = await makeCard();
    const psam = await makePsam(SKYWAYS, masters.redeem[SKYWAYS]!);
    expect(await swOf(draw(card, psam, 501, SKYWAYS))).to.equal(SW.INSUFFICIENT_BALANCE);

    // the card's cryptogram fixes the balance it reported: a raised one does not verify
    const init = await card.reader.initializeForPurchase(SKYWAYS);
    const raised = Buffer.from(init.raw);
    raised.writeUInt32BE(5_000, InitializeForPurchaseResponse.offset("balance"));
    const lying = psam.driver.issueDebitCommand({
      cardAtr: card.atr,
      initializeResponse: raised,
      draw: { amount: 501, currency: SKYWAYS, transactionRef: randomUUID(), merchantId: "skyways" },
      returnExpectedSignature: false,
    });
    expect(await swOf(lying)).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await psam.driver.readStatus()).to.include({ psamCounter: 0, pendingCount: 0 });

    // a DEBIT beyond the points, validly signed, gets the card's signed refusal
    const again = await card.reader.initializeForPurchase(SKYWAYS);
    const answer = await card.reader.debit(forgedDebit(masters.redeem[SKYWAYS]!, again.parsed, { amount: 501, currency: SKYWAYS }));
    expect(answer.sw).to.equal(SW.OK);
    expect(answer.parsed).to.include({ result: DebitResult.INSUFFICIENT_BALANCE, counter: 0, balance: 500 });
    expect(await points(card)).to.equal(500);
    expect(await card.reader.readPurse()).to.include({ balance: 10_000, counter: 0 });
    expect(await card.reader.readLog()).to.have.length(0);
  });

  it("a points DEBIT in another unit than the session's purse is a signed CURRENCY_MISMATCH, and a money PSAM's key does not open a points purse", async () => {
    const card = await makeCard();
    const init = await card.reader.initializeForPurchase(SKYWAYS);
    const answer = await card.reader.debit(forgedDebit(masters.redeem[SKYWAYS]!, init.parsed, { amount: 100, currency: EUR }));
    expect(answer.parsed).to.include({ result: DebitResult.CURRENCY_MISMATCH, balance: 500, counter: 0 });

    const next = await card.reader.initializeForPurchase(SKYWAYS);
    expect((await card.reader.debit(forgedDebit(masters.purchase, next.parsed, { amount: 100, currency: SKYWAYS }))).sw).to.equal(
      SW.SECURITY_STATUS_NOT_SATISFIED,
    );
    const money = await makePsam(EUR, masters.purchase);
    const points = await card.reader.initializeForPurchase(SKYWAYS);
    const refused = money.driver.issueDebitCommand({
      cardAtr: card.atr,
      initializeResponse: points.raw,
      draw: { amount: 100, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" },
      returnExpectedSignature: false,
    });
    expect(await swOf(refused)).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await card.reader.readPurse()).to.include({ balance: 10_000, counter: 0 });
  });

  it("credits points through INITIALIZE FOR LOAD and LOAD signed by the programme's security module", async () => {
    const card = await makeCard();
    const hsmPath = join(dir, "skyways-hsm.json");
    await SoftwareHsm.write(hsmPath, { format: 1, hsmId: "5c1e0001", loadKeys: { [KEY_VERSION]: hex(masters.earn[SKYWAYS]!) }, counter: 0 });
    const hsm = await SoftwareHsm.open(hsmPath);
    const grant: LoadInitCommand = { amount: 150, currency: SKYWAYS, bankId: "skyways", dateTime: Math.floor(Date.now() / 1000), transactionRef: randomUUID() };

    const init = await card.reader.initializeForLoad(grant);
    expect(init.parsed).to.include({ currency: SKYWAYS, exponent: 0, balance: 500, maxBalance: 10_000, counter: 0 });
    const issued = await hsm.issueLoad(grant, 0, init.parsed);
    const loaded = await card.reader.load(issued.command);
    expect(loaded.sw).to.equal(SW.OK);
    expect(loaded.parsed).to.include({ result: LoadResult.LOADED, counter: 1, balance: 650 });
    expect(hsm.verifyLoadAnswer(grant, init.parsed, issued, loaded.parsed!)).to.equal(true);

    expect(await points(card)).to.equal(650);
    expect(await card.reader.readPurse()).to.include({ balance: 10_000, counter: 1 });
    const [entry] = await card.reader.readLog();
    expect(entry).to.include({ kind: LogKind.POINTS_CREDIT, amount: 150, currency: SKYWAYS, balance: 650, counter: 1, moduleCounter: 1 });
    expect(entry!.transactionRef).to.equal(grant.transactionRef);
    expect((await readState<CardFile>(card.path)).points![0]!.balance).to.equal(650);

    // beyond the points purse's maximum: a signed negative result, nothing credited
    const big = { ...grant, amount: 10_000 - 650 + 1, transactionRef: randomUUID() };
    const bigInit = await card.reader.initializeForLoad(big);
    const bigLoad = await card.reader.load(Buffer.from(LoadCommand.encode(signLoad(masters.earn[SKYWAYS]!, bigInit.parsed, big))));
    expect(bigLoad.parsed).to.include({ result: LoadResult.MAX_BALANCE_EXCEEDED, balance: 650, counter: 1 });
    expect(await points(card)).to.equal(650);
  });

  /** A LOAD command's fields signed with S2 under a session key from `master`, as a security module holding it would. */
  function signLoad(master: Buffer, init: ReturnType<typeof InitializeForLoadResponse.decode>, grant: LoadInitCommand) {
    const load = {
      amount: grant.amount,
      currency: grant.currency,
      dateTime: grant.dateTime,
      transactionRef: grant.transactionRef,
      hsmId: Buffer.from("0badcafe", "hex"),
      hsmCounter: 9,
    };
    const sk = deriveSessionKey(diversifyCardKey(master, init.purseId), {
      cardCounter: init.counter,
      securityModuleId: load.hsmId,
      securityModuleCounter: load.hsmCounter,
      challenge: init.challenge,
    });
    return { ...load, s2: loadS2(sk, init, load) };
  }

  it("refuses a points LOAD no programme module signed (6982), so a client cannot mint points; a money module does not sign for a points purse", async () => {
    const card = await makeCard();
    const grant: LoadInitCommand = {
      amount: 1_000,
      currency: SKYWAYS,
      bankId: "skyways",
      dateTime: Math.floor(Date.now() / 1000),
      transactionRef: randomUUID(),
    };
    for (const master of [key(), masters.load, masters.redeem[SKYWAYS]!, masters.earn[OTHER_PROGRAMME]!]) {
      const init = await card.reader.initializeForLoad(grant);
      const answer = await card.reader.load(LoadCommand.encode(signLoad(master, init.parsed, grant)));
      expect(answer.sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    }
    // the money purse's security module cannot even read the points purse's S1
    const moneyHsmPath = join(dir, "money-hsm.json");
    await SoftwareHsm.write(moneyHsmPath, { format: 1, hsmId: "10ad0001", loadKeys: { [KEY_VERSION]: hex(masters.load) }, counter: 0 });
    const init = await card.reader.initializeForLoad(grant);
    const refusal = await (await SoftwareHsm.open(moneyHsmPath)).issueLoad(grant, 0, init.parsed).catch((e: unknown) => e);
    expect(refusal).to.be.instanceOf(HsmRefused);
    expect((refusal as HsmRefused).refusal).to.equal("BAD_S1");

    expect(await points(card)).to.equal(500);
    expect(await card.reader.readPurse()).to.include({ balance: 10_000, counter: 0 });
    expect(await card.reader.readLog()).to.have.length(0);
  });

  it("moves one transaction counter for every purse: an authentication, a redemption, a credit and a purchase count 1, 2, 3, 4", async () => {
    const card = await makeCard();
    const auth = await makePsam(AUTHENTICATION_CURRENCY, masters.authentication);
    const redeem = await makePsam(SKYWAYS, masters.redeem[SKYWAYS]!);
    const money = await makePsam(EUR, masters.purchase);

    const a = await draw(card, auth, 0, AUTHENTICATION_CURRENCY);
    expect((await card.reader.debit(a.debitCommand)).parsed).to.include({ counter: 1 });
    const r = await draw(card, redeem, 50, SKYWAYS);
    expect(r.init.parsed.counter).to.equal(1);
    expect((await card.reader.debit(r.debitCommand)).parsed).to.include({ counter: 2, balance: 450 });
    const grant: LoadInitCommand = { amount: 25, currency: SKYWAYS, bankId: "skyways", dateTime: Math.floor(Date.now() / 1000), transactionRef: randomUUID() };
    const init = await card.reader.initializeForLoad(grant);
    expect(init.parsed.counter).to.equal(2);
    expect((await card.reader.load(LoadCommand.encode(signLoad(masters.earn[SKYWAYS]!, init.parsed, grant)))).parsed).to.include({ counter: 3, balance: 475 });
    const m = await draw(card, money, 1_250, EUR);
    expect((await card.reader.debit(m.debitCommand)).parsed).to.include({ counter: 4, balance: 8_750 });

    expect((await card.reader.readLog()).map((e) => e.kind)).to.deep.equal([
      LogKind.PURCHASE,
      LogKind.POINTS_CREDIT,
      LogKind.POINTS_REDEMPTION,
      LogKind.AUTHENTICATION,
    ]);
    expect(await card.reader.readPurse()).to.include({ balance: 8_750, counter: 4 });
    expect(await points(card)).to.equal(475);
  });

  it("selects purses by currency: 6A88 for a code it holds no purse of, the money currency or none for the money purse; READ PURSE P1 = n until 6A83", async () => {
    const card = await makeCard([
      { programme: SKYWAYS, balance: 500 },
      { programme: OTHER_PROGRAMME, balance: 7, maxBalance: 99 },
    ]);
    for (const currency of [1003, 840, 0, 65535]) {
      expect(await swOf(card.reader.initializeForPurchase(currency)), `currency ${currency}`).to.equal(SW.REFERENCED_DATA_NOT_FOUND);
    }
    expect((await card.reader.initializeForPurchase(EUR)).parsed).to.include({ currency: EUR, exponent: 2, balance: 10_000 });
    expect((await card.reader.initializeForPurchase()).parsed).to.include({ currency: EUR, balance: 10_000 });
    expect((await card.reader.initializeForPurchase(OTHER_PROGRAMME)).parsed).to.include({ currency: OTHER_PROGRAMME, exponent: 0, balance: 7 });

    const held = await card.reader.readPointsPurses();
    expect(held.map((p) => [p.currency, p.balance, p.maxBalance])).to.deep.equal([
      [SKYWAYS, 500, 10_000],
      [OTHER_PROGRAMME, 7, 99],
    ]);
    const readPurse3 = await card.card.process(encodeCommand({ cla: PURSE_CLA, ins: PurseIns.READ_PURSE, p1: 3, p2: 0, data: Buffer.alloc(0), le: 256 }));
    expect(decodeResponse(readPurse3).sw).to.equal(SW.RECORD_NOT_FOUND);
    const wrongLength = await card.card.process(
      encodeCommand({ cla: PURSE_CLA, ins: PurseIns.INITIALIZE_FOR_PURCHASE, p1: 0, p2: 0, data: Buffer.from([0x03, 0xe9, 0x00]), le: 256 }),
    );
    expect(decodeResponse(wrongLength).sw).to.equal(SW.WRONG_LENGTH);

    // a card without points purses has none to read
    const plain = await makeCard([]);
    expect(await plain.reader.readPointsPurses()).to.deep.equal([]);
    expect(await swOf(plain.reader.initializeForPurchase(SKYWAYS))).to.equal(SW.REFERENCED_DATA_NOT_FOUND);
  });

  it("a points INITIALIZE FOR LOAD for a programme the card does not hold opens the money purse, whose LOAD then says CURRENCY_MISMATCH", async () => {
    const card = await makeCard();
    const grant: LoadInitCommand = {
      amount: 10,
      currency: OTHER_PROGRAMME,
      bankId: "skyways",
      dateTime: Math.floor(Date.now() / 1000),
      transactionRef: randomUUID(),
    };
    const init = await card.reader.initializeForLoad(grant);
    expect(init.parsed).to.include({ currency: EUR, exponent: 2, balance: 10_000 });
    const answer = await card.reader.load(LoadCommand.encode(signLoad(masters.load, init.parsed, grant)));
    expect(answer.parsed).to.include({ result: LoadResult.CURRENCY_MISMATCH, balance: 10_000, counter: 0 });
    expect(await points(card)).to.equal(500);
  });

  it("refuses to open a card file whose points purse is not a programme's, or holds one programme twice", async () => {
    const card = await makeCard();
    const file = await readState<CardFile>(card.path);
    for (const [name, points] of [
      ["999", [{ ...file.points![0]!, programme: AUTHENTICATION_CURRENCY }]],
      ["twice", [file.points![0]!, file.points![0]!]],
    ] as const) {
      const path = join(dir, `bad-${name}.json`);
      await SoftwareCard.write(path, { ...file, points: [...points] });
      const refusal = await SoftwareCard.open(path).catch((e: unknown) => e);
      expect(refusal, name).to.be.instanceOf(Error);
      expect((refusal as Error).message).to.match(name === "999" ? /not a programme code/ : /two points purses/);
    }
  });

  it("the terminal host answers an authentication DEBIT_VERDICT_AUTHENTICATED, and keeps no transaction and no reversal for it", async () => {
    const card = await makeCard();
    const hostDir = join(dir, "terminal");
    await mkdir(join(hostDir, "psams"), { recursive: true });
    const psam = await writePsam(AUTHENTICATION_CURRENCY, masters.authentication, join(hostDir, "psams"));
    // No concentrator listens: the host's jobs are handed to it directly.
    const terminal = await startTerminalHost({ security: Security.insecure(), terminalId: "terminal-1", concentrator: "127.0.0.1:1", dir: hostDir });
    opened.push(terminal);
    const transactionRef = randomUUID();
    const handle = (job: Partial<PsamJob>): Promise<PsamJobResult> =>
      (terminal.host as unknown as { handle(j: PsamJob): Promise<PsamJobResult> }).handle({
        jobId: randomUUID(),
        terminalId: "terminal-1",
        psamId: toPsamId(hex(psam.psamId)),
        transactionId: txnId(transactionRef),
        paymentServerId: "",
        task: undefined,
        ...job,
      });
    const store = (terminal.host as unknown as { store: TerminalStore }).store;

    const init = await card.reader.initializeForPurchase(AUTHENTICATION_CURRENCY);
    const issued = await handle({
      task: {
        $case: "issueDebitCommand",
        value: {
          cardAtr: card.atr,
          initializeResponse: init.raw,
          amount: money(0, AUTHENTICATION_CURRENCY, 0),
          merchantId: { value: "skyways" },
          returnExpectedSignature: false,
        },
      },
    });
    expect(issued.outcome?.$case).to.equal("debitCommandIssued");
    if (issued.outcome?.$case !== "debitCommandIssued") return;
    const debit = await card.reader.debit(Buffer.from(issued.outcome.value.debitCommand));
    expect(debit.parsed).to.include({ result: DebitResult.DEBITED, counter: 1 });
    const verified = await handle({
      task: { $case: "verifyDebit", value: { psamCounter: issued.outcome.value.psamCounter, cardStatusWord: 0x9000, debitResponse: debit.raw } },
    });
    expect(verified.outcome?.$case).to.equal("debitVerified");
    if (verified.outcome?.$case !== "debitVerified") return;
    expect(verified.outcome.value.verdict).to.equal(DebitVerdict.DEBIT_VERDICT_AUTHENTICATED);
    expect(Buffer.from(verified.outcome.value.recordMac).equals(Buffer.alloc(8))).to.equal(true);
    expect(await store.batchTally(hex(psam.psamId), verified.outcome.value.batchNumber)).to.deep.equal({ count: 0, total: 0 });
    expect(await store.reversals()).to.deep.equal([]);
    expect(verified.slot).to.include({ batchCount: 0, psamCounter: 1 });
    expect(verified.slot?.pendingDebits).to.deep.equal([]);
  });
});
