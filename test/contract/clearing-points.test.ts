// Contract test of ClearingService for loyalty points and authentications
// (issue #14, docs/loyalty.md "Clearing"): the real server on loopback with
// mutual TLS, every RPC through the generated client. Points batches are made
// by a real software card holding a points purse of programme 1001 and a real
// points PSAM of that programme (its purchase keys the programme's redeem
// master keys), authentications by an authentication PSAM (currency 999).
// Forgeries are made the way a holder of a PSAM's batch key would make them.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { BatchStatus, LoadOutcome, LoadProof, QuarantineReason, type Settlement } from "../../gen/netpurse/clearing/v1/clearing.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { merchantId, psamId as toPsamId, purseId as toPurseId, txnId } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, money } from "../../lib/money.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import { batchMac, batchRecordMac, Verdict, type PsamBatchRecord } from "../../lib/protocol/psam.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { addClearingMerchant } from "../../services/clearing/merchants.js";
import { pointsRedeemedCsvRows, pointsRedeemedReport } from "../../services/clearing/points-report.js";
import type { ClearingKeysFile } from "../../services/clearing/security-module.js";
import { startClearing } from "../../services/clearing/server.js";
import type { Issuer } from "../../services/issuer/issuer.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { clearingClient, refusal, stream, submission, unmaced, type ClearingClient, type ClosedBatch } from "../support/clearing-bench.js";
import { EUR, makeCard, makeIssuer, makeProgramme, makePsam, SKYWAYS, tempDir } from "../support/fixtures.js";
import { testSecurity, type TestSecurity } from "../support/network.js";

const MONEY_PSAM = "c1ea0001";
const POINTS_PSAM = "c1ea1001";
const AUTH_PSAM = "c1ea0999";
const SHOP = "clear-shop";
/** The programme's benefits site, registered with clearing in EUR like any merchant. */
const SITE = "skyways";
const POINTS = 5_000;

describe("ClearingService: loyalty points and authentications (contract)", function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  let security: TestSecurity;
  let server: Awaited<ReturnType<typeof startClearing>>;
  let clients: ClearingClient[];
  let terminal: ClearingClient;
  let operator: ClearingClient;
  let reader: PurseReader;
  const psams = new Map<string, PsamDriver>();
  const now = new Date("2026-11-29T12:00:00Z");
  const DAY = "2026-11-29";
  const keysPath = () => join(dir, "clearing", "keys.json");

  const as = async (kind: Kind, id: string) => {
    const c = clearingClient(server.address, await security.of(kind, id));
    clients.push(c);
    return c;
  };

  async function startServer() {
    server = await startClearing({
      security: await security.of("clearing", "clearing-1"),
      listen: "127.0.0.1:0",
      dir: join(dir, "clearing"),
      psamRegistry: join(dir, "psams.json"),
      clock: () => now,
    });
    terminal = await as("terminal", "terminal-1");
    operator = await as("operator", "operator");
  }

  /** Clearing restarted with its keys file changed by `edit` (its security module reads the file when it starts). */
  async function restartWithKeys(edit: (k: ClearingKeysFile) => void) {
    const keys = await readJson<ClearingKeysFile>(keysPath());
    edit(keys);
    await writeJsonAtomic(keysPath(), keys, { private: true });
    for (const c of clients.splice(0)) c.close();
    await server.close();
    await startServer();
  }

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-clearing-points-"));
    issuer = await makeIssuer(dir);
    await makeProgramme(issuer, SKYWAYS);
    await CertificateAuthority.init(pkiDirOf(dir));
    security = await testSecurity(dir);
    const cardPath = await makeCard(issuer, dir, { value: 10_000, points: [{ programme: SKYWAYS, value: POINTS }] });
    const files = {
      [MONEY_PSAM]: await makePsam(issuer, dir, { psamId: MONEY_PSAM, name: "money" }),
      [POINTS_PSAM]: await makePsam(issuer, dir, { psamId: POINTS_PSAM, name: "points", currency: SKYWAYS }),
      [AUTH_PSAM]: await makePsam(issuer, dir, { psamId: AUTH_PSAM, name: "authentication", currency: AUTHENTICATION_CURRENCY }),
    };
    for (const id of Object.keys(files)) await issuer.assignPsam(id, "terminal-1");
    await issuer.exportPsamRegistry(join(dir, "psams.json"));
    await issuer.exportClearingKeys(keysPath());
    for (const m of [SHOP, SITE]) {
      await addClearingMerchant(join(dir, "clearing", "merchants.json"), { merchantId: m, name: m, acquirerId: "acq-1", currency: EUR, exponent: 2 });
    }
    clients = [];
    await startServer();
    reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(cardPath)));
    await reader.connect();
    psams.clear();
    for (const [id, path] of Object.entries(files)) {
      const d = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(path)));
      await d.connect();
      psams.set(id, d);
    }
  });

  afterEach(async () => {
    for (const c of clients) c.close();
    await server.close();
    await issuer.close();
    await cleanup();
  });

  /** One genuine debit between the card and a PSAM, in the PSAM's currency: money, a programme's points, or an authentication (0 in 999). */
  async function debit(psamHex: string, currency: number, amount: number, merchant: string): Promise<number> {
    const psam = psams.get(psamHex)!;
    const atr = await reader.connect();
    const init = await reader.initializeForPurchase(currency === EUR ? undefined : currency);
    const issued = await psam.issueDebitCommand({
      cardAtr: atr,
      initializeResponse: init.raw,
      draw: { amount, currency, transactionRef: randomUUID(), merchantId: merchant },
      returnExpectedSignature: false,
    });
    const answer = await reader.debit(issued.debitCommand);
    return (await psam.verifyDebit(issued.psamCounter, answer.raw)).verdict;
  }
  const redeem = (points: number, merchant = SITE) => debit(POINTS_PSAM, SKYWAYS, points, merchant);
  const purchase = (amount: number, merchant = SHOP) => debit(MONEY_PSAM, EUR, amount, merchant);

  /** Reads a PSAM's batch and closes it: what its terminal host sends. */
  async function closeBatch(psamHex: string): Promise<ClosedBatch> {
    const psam = psams.get(psamHex)!;
    const records = await psam.readBatch();
    const c = await psam.closeBatch();
    return {
      records,
      trailer: {
        psamId: toPsamId(psamHex),
        batchNumber: c.batchNumber,
        count: c.count,
        total: money(c.total, c.currency, 0),
        batchMac: c.batchMac,
        closedAt: now,
      },
    };
  }

  /** A batch made with a PSAM's batch key (whoever holds it): records re-MACed, a trailer whose MAC verifies. The card signatures stay as given. */
  function forge(psamHex: string, batchNumber: number, currency: number, records: Omit<PsamBatchRecord, "recordMac">[]): ClosedBatch {
    const key = issuer.psamBatchKey(psamHex);
    const psamId = Buffer.from(psamHex, "hex");
    const total = records.reduce((s, r) => s + r.amount, 0);
    return {
      records: records.map((r) => ({ ...r, recordMac: batchRecordMac(key, psamId, batchNumber, r) })),
      trailer: {
        psamId: toPsamId(psamHex),
        batchNumber,
        count: records.length,
        total: money(total, currency, 0),
        batchMac: batchMac(key, { psamId, batchNumber, count: records.length, total, currency }),
        closedAt: now,
      },
    };
  }

  const settlement = async (): Promise<Settlement> => (await operator.getSettlement({ day: DAY, pageSize: 0, pageToken: "" })).settlement!;
  const moneyOf = (s: Settlement) => ({ positions: s.positions, payouts: s.payouts, purchases: s.purchases, loads: s.loads });
  const pointsBalance = async () => (await reader.readPointsPurses()).find((p) => p.currency === SKYWAYS)!.balance;
  const moneyBalance = async () => (await reader.readPurse()).balance;

  /** The ledgers as the database holds them: money per currency, points per programme, and each points account's balance. */
  async function ledgers() {
    const db = server.store.db;
    return {
      money: await db.all<{ currency: number; s: number }>("SELECT currency, SUM(amount_minor) AS s FROM ledger_entries GROUP BY currency ORDER BY currency"),
      moneyAccounts: (await db.all<{ account: string }>("SELECT DISTINCT account FROM ledger_entries ORDER BY account")).map((a) => a.account),
      points: await db.all<{ programme: number; s: number }>("SELECT programme, SUM(points) AS s FROM points_entries GROUP BY programme ORDER BY programme"),
      pointsAccounts: await db.all<{ account: string; s: number }>("SELECT account, SUM(points) AS s FROM points_entries GROUP BY account ORDER BY account"),
    };
  }

  async function audit() {
    const p = await reader.readPurse();
    return operator.runAudit({
      cards: [{ purseId: toPurseId(p.purseId.toString("hex")), balance: money(p.balance, EUR, 2), openingValue: money(10_000, EUR, 2) }],
    });
  }

  it("posts a points batch to the programme's own points ledger: money positions, payouts and the money invariant unchanged", async () => {
    expect(await purchase(250)).to.equal(Verdict.RECORDED);
    expect(await terminal.submitBatch(stream(submission(await closeBatch(MONEY_PSAM))))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
    const before = await settlement();
    const moneyLedgerBefore = (await ledgers()).money;

    expect(await redeem(300)).to.equal(Verdict.RECORDED);
    expect(await redeem(200)).to.equal(Verdict.RECORDED);
    const batch = await closeBatch(POINTS_PSAM);
    expect(batch.trailer.total).to.deep.include({ amountMinor: 500n, currency: SKYWAYS });
    const ack = await terminal.submitBatch(stream(submission(batch)));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 2, quarantined: 0, duplicate: false, batchNumber: 1, settlementDay: DAY });

    // The card gave up 500 points and no money.
    expect(await pointsBalance()).to.equal(POINTS - 500);
    expect(await moneyBalance()).to.equal(10_000 - 250);

    // Money: the same positions, payouts and counts as before the points came; points apart, labelled by programme.
    const after = await settlement();
    expect(moneyOf(after)).to.deep.equal(moneyOf(before));
    expect(after.purchases).to.equal(1);
    expect(after.redemptions).to.equal(2);
    expect(after.pointsRedeemed).to.deep.equal([{ programme: SKYWAYS, merchantId: SITE, points: 500n, redemptions: 2 }]);
    expect(after.positions.some((p) => p.partyId === SITE)).to.equal(false);
    expect(after.positions.every((p) => p.net!.currency === EUR)).to.equal(true);
    expect(after.payouts.every((p) => p.amount!.currency === EUR)).to.equal(true);
    // The operator's report says points, by programme and merchant, never a currency.
    const report = pointsRedeemedReport(after);
    expect(report.split("\n")).to.deep.equal([
      "points redeemed (loyalty programmes: points, not money; 2 redemptions):",
      "programme  merchant  points      redemptions",
      "---------  --------  ----------  -----------",
      "1001       skyways   500 points  2",
    ]);
    expect(pointsRedeemedCsvRows(after)).to.deep.equal([[DAY, "points_redeemed", "merchant", SITE, "", "", "1001", "", "", "", "2", "", "500"]]);

    // Each ledger sums to zero on its own; no account is in both.
    const l = await ledgers();
    expect(l.money).to.deep.equal(moneyLedgerBefore);
    expect(l.money).to.deep.equal([{ currency: EUR, s: 0 }]);
    expect(l.moneyAccounts).to.deep.equal(["issuer:demo-issuer:float", `merchant:${SHOP}:payable`]);
    expect(l.points).to.deep.equal([{ programme: SKYWAYS, s: 0 }]);
    expect(l.pointsAccounts).to.deep.equal([
      { account: `points:${SKYWAYS}:cards`, s: 500 },
      { account: `points:${SKYWAYS}:redeemed:${SITE}`, s: -500 },
    ]);

    // The site's money statement has no points in it; the batch reads in points (exponent 0).
    const statement = await operator.getMerchantStatement({ merchantId: merchantId(SITE), day: "", pageSize: 0, pageToken: "" });
    expect(statement).to.deep.include({ purchases: 0, total: [], lines: [] });
    const got = await operator.getBatch({ psamId: toPsamId(POINTS_PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(got.batch).to.deep.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 2, posted: 2, total: money(500, SKYWAYS, 0) });

    const a = await audit();
    expect(a.checks.filter((c) => !c.ok)).to.deep.equal([]);
    expect(a.ok).to.equal(true);
    expect(a.checks.find((c) => c.name.startsWith("the card debits proven"))?.detail).to.equal("card debits proven 250, merchant credits 250");
    expect(a.checks.find((c) => c.name.startsWith("every points redemption"))?.detail).to.equal(`programme ${SKYWAYS}: 2 redemptions, 500 points`);
    expect(a.transactions).to.equal(1); // money transactions: the purchase
  });

  it("counts a points batch sent twice once", async () => {
    await redeem(120);
    await redeem(80);
    const batch = await closeBatch(POINTS_PSAM);
    expect(await terminal.submitBatch(stream(submission(batch)))).to.include({ posted: 2, duplicate: false });
    const again = await terminal.submitBatch(stream(submission(batch)));
    expect(again).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 2, quarantined: 0, duplicate: true });
    const s = await settlement();
    expect(s.redemptions).to.equal(2);
    expect(s.pointsRedeemed).to.deep.equal([{ programme: SKYWAYS, merchantId: SITE, points: 200n, redemptions: 2 }]);
    expect((await ledgers()).pointsAccounts).to.deep.equal([
      { account: `points:${SKYWAYS}:cards`, s: 200 },
      { account: `points:${SKYWAYS}:redeemed:${SITE}`, s: -200 },
    ]);
    const got = await operator.getBatch({ psamId: toPsamId(POINTS_PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(got.batch).to.include({ resubmissions: 1, posted: 2 });
    expect((await audit()).ok).to.equal(true);
  });

  it("quarantines a points record whose card signature is forged, and a money debit relabelled as points; posts the genuine ones", async () => {
    await redeem(300);
    await redeem(50);
    const genuine = await psams.get(POINTS_PSAM)!.readBatch();
    const [first, second] = genuine.map(unmaced);
    const forged = forge(POINTS_PSAM, 1, SKYWAYS, [first!, { ...second!, cardSignature: randomBytes(8) }]);
    const ack = await terminal.submitBatch(stream(submission(forged)));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1, quarantined: 1 });
    const got = await operator.getBatch({ psamId: toPsamId(POINTS_PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(got.quarantinedRecords.map((q) => [q.record!.amount!.amountMinor, q.reason])).to.deep.equal([
      [50n, QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE],
    ]);

    // A genuine money debit, MACed again by the money PSAM's key into a batch in the programme's currency: the card signed EUR,
    // and its signature does not verify under the programme's redemption keys.
    await purchase(400);
    const [moneyRecord] = (await psams.get(MONEY_PSAM)!.readBatch()).map(unmaced);
    const relabelled = forge(MONEY_PSAM, 1, SKYWAYS, [{ ...moneyRecord!, currency: SKYWAYS }]);
    expect(await terminal.submitBatch(stream(submission(relabelled)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 1 });

    const s = await settlement();
    expect(s.pointsRedeemed).to.deep.equal([{ programme: SKYWAYS, merchantId: SITE, points: 300n, redemptions: 1 }]);
    expect(s.positions).to.deep.equal([]);
    expect((await ledgers()).points).to.deep.equal([{ programme: SKYWAYS, s: 0 }]);
    const reasons = (await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries.map((e) =>
      e.entry?.$case === "record" ? e.entry.value.reason : -1,
    );
    expect(reasons).to.deep.equal([QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE, QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE]);
  });

  it("quarantines points of a programme or key version clearing holds no keys for, and posts them once the keys are there", async () => {
    await redeem(70);
    const firstBatch = await closeBatch(POINTS_PSAM);
    await redeem(30);
    const secondBatch = await closeBatch(POINTS_PSAM);

    await restartWithKeys((k) => (k.programmeKeys = { [String(SKYWAYS)]: {} }));
    expect(await terminal.submitBatch(stream(submission(firstBatch)))).to.include({ posted: 0, quarantined: 1 });
    await restartWithKeys((k) => delete k.programmeKeys);
    expect(await terminal.submitBatch(stream(submission(secondBatch)))).to.include({ posted: 0, quarantined: 1 });

    const listed = (await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries.map((e) =>
      e.entry?.$case === "record" ? [e.entry.value.batchNumber, e.entry.value.reason] : [],
    );
    expect(listed).to.deep.equal([
      [1, QuarantineReason.QUARANTINE_REASON_KEY_VERSION_UNKNOWN],
      [2, QuarantineReason.QUARANTINE_REASON_PROGRAMME_UNKNOWN],
    ]);
    expect((await settlement()).pointsRedeemed).to.deep.equal([]);
    expect((await ledgers()).pointsAccounts).to.deep.equal([]);

    // The issuer's export with the programme: the same batches sent again are posted, once, and no longer listed.
    await issuer.exportClearingKeys(keysPath());
    await restartWithKeys(() => undefined);
    expect(await terminal.submitBatch(stream(submission(firstBatch)))).to.include({ posted: 1, quarantined: 0, duplicate: true });
    expect(await terminal.submitBatch(stream(submission(secondBatch)))).to.include({ posted: 1, quarantined: 0, duplicate: true });
    expect((await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries).to.deep.equal([]);
    expect((await settlement()).pointsRedeemed).to.deep.equal([{ programme: SKYWAYS, merchantId: SITE, points: 100n, redemptions: 2 }]);
  });

  it("lets a merchant registered in EUR take points; a points record to an unregistered merchant is quarantined", async () => {
    await redeem(40);
    await redeem(60, "nobody-shop");
    const ack = await terminal.submitBatch(stream(submission(await closeBatch(POINTS_PSAM))));
    expect(ack).to.include({ posted: 1, quarantined: 1 });
    const got = await operator.getBatch({ psamId: toPsamId(POINTS_PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(got.quarantinedRecords.map((q) => q.reason)).to.deep.equal([QuarantineReason.QUARANTINE_REASON_UNKNOWN_MERCHANT]);
    expect((await settlement()).pointsRedeemed).to.deep.equal([{ programme: SKYWAYS, merchantId: SITE, points: 40n, redemptions: 1 }]);
  });

  it("acknowledges an authentication PSAM's empty batch and posts nothing; rejects one holding a record as a forgery", async () => {
    expect(await debit(AUTH_PSAM, AUTHENTICATION_CURRENCY, 0, SITE)).to.equal(Verdict.AUTHENTICATED);
    const empty = await closeBatch(AUTH_PSAM);
    expect(empty.trailer).to.deep.include({ count: 0, total: money(0, AUTHENTICATION_CURRENCY, 0) });
    const ack = await terminal.submitBatch(stream(submission(empty)));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 0, duplicate: false, batchNumber: 1 });
    const got = await operator.getBatch({ psamId: toPsamId(AUTH_PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(got.batch).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 0, posted: 0 });

    // A genuine money debit, MACed again under the authentication PSAM's batch key into its batch 2 as an authentication.
    await purchase(500);
    const [moneyRecord] = (await psams.get(MONEY_PSAM)!.readBatch()).map(unmaced);
    const forged = forge(AUTH_PSAM, 2, AUTHENTICATION_CURRENCY, [{ ...moneyRecord!, amount: 0, currency: AUTHENTICATION_CURRENCY }]);
    const refused = await terminal.submitBatch(stream(submission(forged)));
    expect(refused).to.include({
      status: BatchStatus.BATCH_STATUS_REJECTED,
      rejectedBecause: QuarantineReason.QUARANTINE_REASON_AUTHENTICATION_RECORDS,
      posted: 0,
      batchNumber: 2,
    });
    const listed = (await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries;
    expect(listed.map((e) => (e.entry?.$case === "rejectedBatch" ? e.entry.value.rejectedBecause : -1))).to.deep.equal([
      QuarantineReason.QUARANTINE_REASON_AUTHENTICATION_RECORDS,
    ]);

    const s = await settlement();
    expect(s).to.deep.include({ purchases: 0, redemptions: 0, positions: [], payouts: [], pointsRedeemed: [] });
    const a = await audit();
    expect(a.transactions).to.equal(0);
    // The money debit is not in the ledger yet (its genuine batch was not sent), so the card shows it as a difference; nothing else fails.
    expect(a.checks.filter((c) => !c.ok).map((c) => c.detail)).to.deep.equal([
      `card says ${10_000 - 500}; ledger: opening 10000 + loads 0 - purchases 0 = 10000`,
    ]);
    expect(await terminal.submitBatch(stream(submission(await closeBatch(MONEY_PSAM))))).to.include({ posted: 1 });
    expect((await audit()).ok).to.equal(true);
  });

  it("audits the points ledger apart: an unbalanced redemption and points in a money account fail it", async () => {
    await redeem(90);
    await terminal.submitBatch(stream(submission(await closeBatch(POINTS_PSAM))));
    expect((await audit()).ok).to.equal(true);
    // What a write around clearing would leave: one more entry on a redemption, and points booked in the money ledger.
    const db = server.store.db;
    await db.run(
      "INSERT INTO points_entries (redemption_seq, account, programme, points, settlement_day) SELECT seq, ?, programme, 5, settlement_day FROM redemptions",
      [`points:${SKYWAYS}:cards`],
    );
    await db.run("INSERT INTO postings (transaction_id, kind, settlement_day, posted_at) VALUES ('tampered', 'load', ?, ?)", [DAY, now.toISOString()]);
    await db.run(
      `INSERT INTO ledger_entries (posting_seq, account, amount_minor, currency, settlement_day)
       SELECT seq, ?, 90, ?, ? FROM postings WHERE transaction_id = 'tampered' UNION ALL SELECT seq, ?, -90, ?, ? FROM postings WHERE transaction_id = 'tampered'`,
      [`points:${SKYWAYS}:cards`, SKYWAYS, DAY, "bank:bank-1:settlement", SKYWAYS, DAY],
    );
    const a = await audit();
    expect(a.ok).to.equal(false);
    const redemptionId = (await db.get<{ transaction_id: string }>("SELECT transaction_id FROM redemptions"))!.transaction_id;
    expect(a.checks.filter((c) => !c.ok).map((c) => [c.name, c.detail])).to.deep.equal([
      [
        "every points redemption balances in its programme's own points ledger, once",
        `not posted exactly once with two balancing entries of its programme: ${redemptionId}`,
      ],
      ["no points in a money account, no money in a points account", `mixed: bank:bank-1:settlement, points:${SKYWAYS}:cards`],
    ]);
  });

  it("refuses currencies no batch, record or load can carry, naming the field", async () => {
    await purchase(100);
    const b = await closeBatch(MONEY_PSAM);
    for (const currency of [0, 65_536]) {
      const bad = { ...b, trailer: { ...b.trailer, total: money(100, currency, 0) } };
      expect(await refusal(terminal.submitBatch(stream(submission(bad))))).to.include({
        code: Status.INVALID_ARGUMENT,
        reason: ErrorReason.ERROR_REASON_INVALID_FIELD,
        field: "trailer.total.currency",
      });
    }
    const badRecord = submission(b);
    const first = badRecord[0]!.item!;
    if (first.$case !== "record") throw new Error("the first message is a record");
    first.value.amount = money(100, 70_000, 0);
    expect(await refusal(terminal.submitBatch(stream(badRecord)))).to.include({ code: Status.INVALID_ARGUMENT, field: "records[0].amount.currency" });
    // Only an authentication PSAM's batch may be empty.
    const empty = { records: [], trailer: { ...b.trailer, count: 0, total: money(0, EUR, 0) } };
    expect(await refusal(terminal.submitBatch(stream(submission(empty))))).to.include({ code: Status.INVALID_ARGUMENT, field: "trailer.count" });

    // Points never come as a load: a programme's own security module credits them at its site.
    const load = await as("load", "load-1");
    const points = {
      transactionId: txnId(randomUUID()),
      bankId: "bank-1",
      purseId: toPurseId("0102030405060708"),
      amount: money(100, SKYWAYS, 0),
      outcome: LoadOutcome.LOAD_OUTCOME_LOADED,
      proof: LoadProof.LOAD_PROOF_S3,
      authorised: Buffer.alloc(0),
      initializeResponse: Buffer.alloc(0),
      loadCommand: Buffer.alloc(0),
      loadAnswer: Buffer.alloc(0),
      settledAt: now,
    };
    expect(await refusal(load.submitLoads({ loads: [points] }))).to.include({ code: Status.INVALID_ARGUMENT, field: "loads[0].amount" });
    expect(await refusal(load.submitLoads({ loads: [{ ...points, amount: money(100, AUTHENTICATION_CURRENCY, 0) }] }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "loads[0].amount",
    });

    // Nothing of any of them was counted; the genuine batch still is.
    expect(await terminal.submitBatch(stream(submission(b)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
  });
});
