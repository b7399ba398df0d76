// Contract test of netpurse.clearing.v1.ClearingService: the real server on
// loopback with mutual TLS, every RPC through the generated client. Batches
// are made by a real software card and a real software PSAM (the DEBIT
// protocol in-process), loads by a real card and the load server's real
// security module; forgeries are made the way an attacker holding some key
// would make them.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { BatchStatus, LoadStatus, PartyKind, QuarantineReason, type LoadRecord, type SubmitBatchRequest } from "../../gen/netpurse/clearing/v1/clearing.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { psamId as toPsamId, purseId as toPurseId, txnId, merchantId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import { InitializeForLoadResponse, LoadResponse } from "../../lib/protocol/load.js";
import { batchMac, batchRecordMac } from "../../lib/protocol/psam.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { SoftwareHsm } from "../../services/load/hsm.js";
import { addClearingMerchant } from "../../services/clearing/merchants.js";
import { startClearing } from "../../services/clearing/server.js";
import type { Issuer } from "../../services/issuer/issuer.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { EUR, makeCard, makeIssuer, makePsam, tempDir } from "../support/fixtures.js";
import { testSecurity, type TestSecurity } from "../support/network.js";
import {
  asMessage,
  clearingClient,
  OTHER_PSAM,
  PSAM,
  refusal,
  SHOP,
  stream,
  submission,
  type ClearingClient,
  type ClosedBatch,
  genuineLoadRecord,
} from "../support/clearing-bench.js";

describe("ClearingService (contract)", function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  let security: TestSecurity;
  let server: Awaited<ReturnType<typeof startClearing>>;
  let clients: ClearingClient[];
  let terminal: ClearingClient;
  let operator: ClearingClient;
  let cardPath: string;
  let reader: PurseReader;
  let psam: PsamDriver;
  let now: Date;

  const as = async (kind: Kind, id: string) => {
    const c = clearingClient(server.address, await security.of(kind, id));
    clients.push(c);
    return c;
  };

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-clearing-"));
    issuer = await makeIssuer(dir);
    await CertificateAuthority.init(pkiDirOf(dir));
    security = await testSecurity(dir);
    cardPath = await makeCard(issuer, dir, { value: 10_000 });
    const psamPath = await makePsam(issuer, dir, { psamId: PSAM });
    await makePsam(issuer, dir, { psamId: OTHER_PSAM, name: "other" });
    await issuer.assignPsam(PSAM, "terminal-1");
    await issuer.assignPsam(OTHER_PSAM, "terminal-2");
    await issuer.exportPsamRegistry(join(dir, "psams.json"));
    await issuer.exportClearingKeys(join(dir, "clearing", "keys.json"));
    for (const [merchantId, acquirerId] of [
      [SHOP, "acq-1"],
      ["shop-b", "acq-1"],
      ["shop-c", "acq-2"],
    ] as const) {
      await addClearingMerchant(join(dir, "clearing", "merchants.json"), { merchantId, name: merchantId, acquirerId, currency: EUR, exponent: 2 });
    }
    now = new Date("2026-11-29T12:00:00Z");
    server = await startClearing({
      security: await security.of("clearing", "clearing-1"),
      listen: "127.0.0.1:0",
      dir: join(dir, "clearing"),
      psamRegistry: join(dir, "psams.json"),
      clock: () => now,
    });
    clients = [];
    terminal = await as("terminal", "terminal-1");
    operator = await as("operator", "operator");
    reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(cardPath)));
    await reader.connect();
    psam = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(psamPath)));
    await psam.connect();
  });

  afterEach(async () => {
    for (const c of clients) c.close();
    await server.close();
    await issuer.close();
    await cleanup();
  });

  /** One genuine purchase between the card and the PSAM: the debit ends in the PSAM's batch. */
  async function purchase(amount: number, merchant = SHOP): Promise<void> {
    const atr = await reader.connect();
    const init = await reader.initializeForPurchase();
    const issued = await psam.issueDebitCommand({
      cardAtr: atr,
      initializeResponse: init.raw,
      draw: { amount, currency: EUR, transactionRef: randomUUID(), merchantId: merchant },
      returnExpectedSignature: false,
    });
    const debit = await reader.debit(issued.debitCommand);
    await psam.verifyDebit(issued.psamCounter, debit.raw);
  }

  /** Reads the PSAM's batch and closes it: what a terminal host sends. */
  async function closeBatch(): Promise<ClosedBatch> {
    const records = await psam.readBatch();
    const c = await psam.closeBatch();
    return {
      records,
      trailer: {
        psamId: toPsamId(PSAM),
        batchNumber: c.batchNumber,
        count: c.count,
        total: money(c.total, c.currency, 0),
        batchMac: c.batchMac,
        closedAt: now,
      },
    };
  }

  const balance = async () => (await reader.readPurse()).balance;

  it("accepts a genuine batch, pays the merchant and shows it in every report", async () => {
    await purchase(250);
    await purchase(990);
    await purchase(99);
    const ack = await terminal.submitBatch(stream(submission(await closeBatch())));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 3, quarantined: 0, duplicate: false, batchNumber: 1 });
    expect(ack.settlementDay).to.equal("2026-11-29");
    expect(ack.missingBatchNumbers).to.deep.equal([]);

    const { settlement } = await operator.getSettlement({ day: "2026-11-29" });
    const of = (kind: PartyKind, id: string) => settlement!.positions.find((p) => p.kind === kind && p.partyId === id);
    expect(of(PartyKind.PARTY_KIND_MERCHANT, SHOP)?.receivable?.amountMinor).to.equal(1339n);
    expect(of(PartyKind.PARTY_KIND_ACQUIRER, "acq-1")?.receivable?.amountMinor).to.equal(1339n);
    expect(of(PartyKind.PARTY_KIND_ISSUER, "demo-issuer")?.payable?.amountMinor).to.equal(1339n);
    expect(settlement!.purchases).to.equal(3);
    expect(settlement!.payouts.map((p) => [p.payerId, p.payeeId, p.amount!.amountMinor])).to.deep.equal([
      ["demo-issuer", "acq-1", 1339n],
      ["acq-1", SHOP, 1339n],
    ]);

    const statement = await operator.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 2, pageToken: "" });
    expect(statement.total.map((t) => t.amountMinor)).to.deep.equal([1339n]);
    expect(statement.purchases).to.equal(3);
    expect(statement.lines).to.have.length(2);
    const next = await operator.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 2, pageToken: statement.nextPageToken });
    expect(next.lines.map((l) => l.amount!.amountMinor)).to.deep.equal([250n]);
    expect(next.nextPageToken).to.equal("");

    const batch = await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(batch.batch).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 3, posted: 3, quarantined: 0, terminalId: "terminal-1" });

    const audit = await operator.runAudit({
      cards: [
        {
          purseId: toPurseId((await reader.readPurse()).purseId.toString("hex")),
          balance: money(await balance(), EUR, 2),
          openingValue: money(10_000, EUR, 2),
        },
      ],
    });
    expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
    expect(audit.ok).to.equal(true);
    expect(audit.transactions).to.equal(3);
    expect(await balance()).to.equal(10_000 - 1339);
  });

  it("pages a settlement day by merchant: the issuers, acquirers and banks whole on the first page", async () => {
    await purchase(100, "shop-c");
    await purchase(200, SHOP);
    await purchase(300, "shop-b");
    await terminal.submitBatch(stream(submission(await closeBatch())));
    const first = await operator.getSettlement({ day: "2026-11-29", pageSize: 2, pageToken: "" });
    const parties = (s: typeof first.settlement) => s!.positions.map((p) => `${p.kind}/${p.partyId}`);
    expect(parties(first.settlement)).to.deep.equal([
      `${PartyKind.PARTY_KIND_ISSUER}/demo-issuer`,
      `${PartyKind.PARTY_KIND_ACQUIRER}/acq-1`,
      `${PartyKind.PARTY_KIND_ACQUIRER}/acq-2`,
      `${PartyKind.PARTY_KIND_MERCHANT}/${SHOP}`,
      `${PartyKind.PARTY_KIND_MERCHANT}/shop-b`,
    ]);
    expect(first.settlement!.purchases).to.equal(3);
    expect(first.nextPageToken).to.not.equal("");
    const second = await operator.getSettlement({ day: "2026-11-29", pageSize: 2, pageToken: first.nextPageToken });
    expect(parties(second.settlement)).to.deep.equal([`${PartyKind.PARTY_KIND_MERCHANT}/shop-c`]);
    expect(second.settlement!.payouts.map((p) => [p.payerId, p.payeeId, p.amount!.amountMinor])).to.deep.equal([["acq-2", "shop-c", 100n]]);
    expect(second.nextPageToken).to.equal("");
    expect(first.settlement!.payouts.map((p) => [p.payerId, p.payeeId, p.amount!.amountMinor])).to.deep.equal([
      ["demo-issuer", "acq-1", 500n],
      ["demo-issuer", "acq-2", 100n],
      ["acq-1", SHOP, 200n],
      ["acq-1", "shop-b", 300n],
    ]);
    expect(await refusal(operator.getSettlement({ day: "2026-11-28", pageSize: 2, pageToken: first.nextPageToken }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "page_token",
    });
  });

  it("counts a batch sent twice once, and batches out of order each once, reporting the gap", async () => {
    await purchase(100);
    const first = await closeBatch();
    await purchase(200);
    const second = await closeBatch();
    await purchase(300);
    const third = await closeBatch();

    const a3 = await terminal.submitBatch(stream(submission(third)));
    expect(a3.missingBatchNumbers).to.deep.equal([1, 2]);
    const a1 = await terminal.submitBatch(stream(submission(first)));
    expect(a1.posted).to.equal(1);
    const again = await terminal.submitBatch(stream(submission(first)));
    expect(again).to.include({ duplicate: true, posted: 1, status: BatchStatus.BATCH_STATUS_ACCEPTED });
    const a2 = await terminal.submitBatch(stream(submission(second)));
    expect(a2.missingBatchNumbers).to.deep.equal([]);
    const batch = await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(batch.batch?.resubmissions).to.equal(1);

    const { settlement } = await operator.getSettlement({ day: "" });
    expect(settlement!.purchases).to.equal(3);
    expect(settlement!.positions.find((p) => p.kind === PartyKind.PARTY_KIND_MERCHANT)?.receivable?.amountMinor).to.equal(600n);
    const audit = await operator.runAudit({ cards: [] });
    expect(audit.ok).to.equal(true);
  });

  it("quarantines a tampered record, pays the rest, and lists it with its reason", async () => {
    await purchase(100);
    await purchase(200);
    const b = await closeBatch();
    // Moved to another merchant on the way: the amounts still add up, the record MAC does not.
    b.records[1] = { ...b.records[1]!, merchantId: "thief" };
    const ack = await terminal.submitBatch(stream(submission(b)));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1, quarantined: 1 });
    const batch = await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(batch.quarantinedRecords.map((q) => [q.reason, q.record?.merchantId?.value])).to.deep.equal([
      [QuarantineReason.QUARANTINE_REASON_BAD_RECORD_MAC, "thief"],
    ]);
    const { settlement } = await operator.getSettlement({ day: "" });
    expect(settlement!.positions.find((p) => p.partyId === "thief")).to.equal(undefined);
    expect(settlement!.positions.find((p) => p.partyId === SHOP)?.receivable?.amountMinor).to.equal(100n);
    const listed = await operator.listQuarantined({ pageSize: 0, pageToken: "" });
    expect(listed.entries.map((e) => e.entry?.$case)).to.deep.equal(["record"]);
    const audit = await operator.runAudit({ cards: [] });
    expect(audit.ok).to.equal(true);
    expect(audit.quarantined).to.equal(1);
  });

  it("rejects a batch whose MAC is tampered (nothing paid), then accepts the genuine one", async () => {
    await purchase(500);
    const genuine = await closeBatch();
    const forged: ClosedBatch = { ...genuine, trailer: { ...genuine.trailer, batchMac: randomBytes(8) } };
    const rejected = await terminal.submitBatch(stream(submission(forged)));
    expect(rejected).to.include({ status: BatchStatus.BATCH_STATUS_REJECTED, rejectedBecause: QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC, posted: 0 });
    expect((await operator.getSettlement({ day: "" })).settlement!.purchases).to.equal(0);
    const seen = await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(seen.batch?.status).to.equal(BatchStatus.BATCH_STATUS_REJECTED);

    // Records that do not add up to the trailer are rejected the same way.
    const short = await terminal.submitBatch(stream(submission({ ...genuine, records: [] })));
    expect(short.rejectedBecause).to.equal(QuarantineReason.QUARANTINE_REASON_BATCH_INCOMPLETE);

    const ok = await terminal.submitBatch(stream(submission(genuine)));
    expect(ok).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
    const listed = await operator.listQuarantined({ pageSize: 0, pageToken: "" });
    expect(listed.entries.map((e) => (e.entry?.$case === "rejectedBatch" ? e.entry.value.rejectedBecause : undefined))).to.deep.equal([
      QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC,
      QuarantineReason.QUARANTINE_REASON_BATCH_INCOMPLETE,
    ]);
  });

  it("never pays a debit without the card's own signature, even with the PSAM's batch key", async () => {
    // Whoever holds the batch key (a stolen PSAM) can MAC any record and batch; only the card can sign.
    const key = issuer.psamBatchKey(PSAM);
    const psamId = Buffer.from(PSAM, "hex");
    const fields = {
      psamCounter: 77,
      purseId: (await reader.readPurse()).purseId,
      keyVersion: 1,
      sessionCounter: 5,
      challenge: randomBytes(8),
      cardCounter: 6,
      balanceAfter: 1,
      amount: 4_000,
      currency: EUR,
      dateTime: Math.floor(now.getTime() / 1000),
      transactionRef: randomUUID(),
      merchantId: SHOP,
      cardSignature: randomBytes(8),
    };
    const record = { ...fields, recordMac: batchRecordMac(key, psamId, 1, fields) };
    const trailer = {
      psamId: toPsamId(PSAM),
      batchNumber: 1,
      count: 1,
      total: money(4_000, EUR, 0),
      batchMac: batchMac(key, { psamId, batchNumber: 1, count: 1, total: 4_000, currency: EUR }),
      closedAt: now,
    };
    const ack = await terminal.submitBatch(stream(submission({ records: [record], trailer })));
    expect(ack).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 1 });
    const batch = await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" });
    expect(batch.quarantinedRecords.map((q) => q.reason)).to.deep.equal([QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE]);
    expect((await operator.getSettlement({ day: "" })).settlement!.positions).to.deep.equal([]);
  });

  it("refuses a batch of an unknown PSAM, of another terminal's PSAM, and from anyone but a terminal host", async () => {
    await purchase(100);
    const b = await closeBatch();
    const unknown = { ...b, trailer: { ...b.trailer, psamId: toPsamId("0badbad0") } };
    expect(await refusal(terminal.submitBatch(stream(submission(unknown))))).to.include({
      code: Status.PERMISSION_DENIED,
      reason: ErrorReason.ERROR_REASON_UNKNOWN_PSAM,
    });
    const other = await as("terminal", "terminal-2");
    expect(await refusal(other.submitBatch(stream(submission(b))))).to.include({
      code: Status.PERMISSION_DENIED,
      reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
    });
    const merchant = await as("merchant", SHOP);
    expect(await refusal(merchant.submitBatch(stream(submission(b))))).to.include({
      code: Status.PERMISSION_DENIED,
      reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
    });
    expect(await refusal(terminal.getSettlement({ day: "" }))).to.include({ code: Status.PERMISSION_DENIED });
    expect(await refusal(terminal.closeSettlementDay({ day: "2026-11-29" }))).to.include({ code: Status.PERMISSION_DENIED });
    expect(await refusal(terminal.runAudit({ cards: [] }))).to.include({ code: Status.PERMISSION_DENIED });
    expect(await refusal(terminal.listQuarantined({ pageSize: 0, pageToken: "" }))).to.include({ code: Status.PERMISSION_DENIED });
    expect(await refusal(other.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" }))).to.include({
      code: Status.PERMISSION_DENIED,
    });
    expect((await operator.getSettlement({ day: "" })).settlement!.purchases).to.equal(0);
    expect(await refusal(operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 99, pageSize: 0, pageToken: "" }))).to.include({
      code: Status.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_NOT_FOUND,
    });
  });

  it("counts a second batch under a taken number record by record and lists the conflict; refuses malformed submissions, naming the field", async () => {
    // Whoever holds the PSAM's batch key can MAC another batch under number 1: it must not keep the genuine one out, whichever comes first.
    await purchase(100);
    await purchase(50);
    const b = await closeBatch();
    // A batch the PSAM never closed: its first record alone, MACed under number 1.
    const key = issuer.psamBatchKey(PSAM);
    const first = b.records[0]!;
    const altered = { ...b.trailer, count: 1, total: money(first.amount, EUR, 0) };
    altered.batchMac = batchMac(key, { psamId: Buffer.from(PSAM, "hex"), batchNumber: 1, count: 1, total: first.amount, currency: EUR });
    expect(await terminal.submitBatch(stream(submission({ records: [first], trailer: altered })))).to.include({
      status: BatchStatus.BATCH_STATUS_ACCEPTED,
      posted: 1,
    });
    const genuine = await terminal.submitBatch(stream(submission(b)));
    expect(genuine).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 2, duplicate: false });
    expect((await operator.getSettlement({ day: "" })).settlement).to.include({ purchases: 2 });
    const listed = await operator.listQuarantined({ pageSize: 0, pageToken: "" });
    expect(listed.entries.map((e) => (e.entry?.$case === "conflictingBatch" ? e.entry.value.rejectedBecause : e.entry?.$case))).to.deep.equal([
      QuarantineReason.QUARANTINE_REASON_BATCH_NUMBER_CONFLICT,
    ]);
    expect(await refusal(terminal.submitBatch(stream(submission(b).slice(0, -1))))).to.include({ code: Status.INVALID_ARGUMENT, field: "trailer" });
    expect(await refusal(terminal.submitBatch(stream([...submission(b), ...submission(b).slice(0, 1)])))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "trailer",
    });
    const bad = submission(b);
    bad[0] = { item: { $case: "record", value: { ...asMessage(b.records[0]!), challenge: Buffer.alloc(3) } } };
    expect(await refusal(terminal.submitBatch(stream(bad)))).to.include({ code: Status.INVALID_ARGUMENT, field: "records[0].challenge" });
    expect((await operator.getSettlement({ day: "" })).settlement!.purchases).to.equal(2);
  });

  /** A genuine load made by the card and the load server's security module. */
  async function genuineLoad(amount: number): Promise<LoadRecord> {
    const hsmPath = join(dir, "hsm.json");
    await issuer.provisionHsm({ path: hsmPath });
    const hsm = await SoftwareHsm.open(hsmPath);
    return genuineLoadRecord(reader, hsm, { amount, bankId: "bank-1", at: now });
  }

  it("posts a load once its S3 verifies, once however often it is sent, and quarantines a forged S3", async () => {
    const load = await genuineLoad(2_000);
    const loadServer = await as("load", "load-1");
    const [ack] = (await loadServer.submitLoads({ loads: [load] })).acknowledgements;
    expect(ack).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: false, settlementDay: "2026-11-29" });
    const [again] = (await loadServer.submitLoads({ loads: [load] })).acknowledgements;
    expect(again).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: true });

    const { settlement } = await operator.getSettlement({ day: "" });
    expect(settlement!.loads).to.equal(1);
    expect(settlement!.positions.find((p) => p.kind === PartyKind.PARTY_KIND_BANK)?.payable?.amountMinor).to.equal(2_000n);
    expect(settlement!.payouts.map((p) => [p.payerId, p.payeeId, p.amount!.amountMinor])).to.deep.equal([["bank-1", "demo-issuer", 2_000n]]);

    const answer = LoadResponse.decode(Buffer.from(load.loadAnswer));
    const forged = { ...load, transactionId: txnId(randomUUID()), loadAnswer: LoadResponse.encode({ ...answer, s3: randomBytes(8) }) };
    const [q] = (await loadServer.submitLoads({ loads: [forged] })).acknowledgements;
    expect(q).to.include({ status: LoadStatus.LOAD_STATUS_QUARANTINED, quarantinedBecause: QuarantineReason.QUARANTINE_REASON_BAD_S3 });
    // The forged record does not keep the genuine load of its id out.
    const genuineAfterForgery = await genuineLoad(300);
    const forgedFirst = {
      ...genuineAfterForgery,
      loadAnswer: LoadResponse.encode({ ...LoadResponse.decode(Buffer.from(genuineAfterForgery.loadAnswer)), s3: randomBytes(8) }),
    };
    expect((await loadServer.submitLoads({ loads: [forgedFirst] })).acknowledgements[0]?.status).to.equal(LoadStatus.LOAD_STATUS_QUARANTINED);
    expect((await loadServer.submitLoads({ loads: [genuineAfterForgery] })).acknowledgements[0]).to.include({
      status: LoadStatus.LOAD_STATUS_POSTED,
      duplicate: false,
    });
    const reused = { ...load, amount: money(1, EUR, 2) };
    expect(await refusal(loadServer.submitLoads({ loads: [reused] }))).to.include({
      code: Status.ALREADY_EXISTS,
      reason: ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
    });
    expect(await refusal(terminal.submitLoads({ loads: [load] }))).to.include({ code: Status.PERMISSION_DENIED });
    expect(await refusal(loadServer.submitLoads({ loads: [] }))).to.include({ code: Status.INVALID_ARGUMENT, field: "loads" });

    const audit = await operator.runAudit({
      cards: [
        {
          purseId: toPurseId((await reader.readPurse()).purseId.toString("hex")),
          balance: money(await balance(), EUR, 2),
          openingValue: money(10_000, EUR, 2),
        },
      ],
    });
    expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
    expect(await balance()).to.equal(12_300);
  });

  it("posts what arrives after a day closed to the next day, and the closed day's figures stay", async () => {
    await purchase(100);
    await terminal.submitBatch(stream(submission(await closeBatch())));
    const closed = await operator.closeSettlementDay({ day: "2026-11-29" });
    expect(closed.settlement).to.include({ closed: true, purchases: 1 });
    const again = await operator.closeSettlementDay({ day: "2026-11-29" });
    expect(again.settlement?.closedAt?.getTime()).to.equal(closed.settlement?.closedAt?.getTime());

    await purchase(200);
    const ack = await terminal.submitBatch(stream(submission(await closeBatch())));
    expect(ack.settlementDay).to.equal("2026-11-30");
    const [load] = (await (await as("load", "load-1")).submitLoads({ loads: [await genuineLoad(700)] })).acknowledgements;
    expect(load!.settlementDay).to.equal("2026-11-30");

    expect((await operator.getSettlement({ day: "2026-11-29" })).settlement).to.include({ purchases: 1, loads: 0, closed: true });
    expect((await operator.getSettlement({ day: "" })).settlement).to.include({ day: "2026-11-30", purchases: 1, loads: 1, closed: false });
    expect(await refusal(operator.closeSettlementDay({ day: "2026-12-01" }))).to.include({ code: Status.INVALID_ARGUMENT, field: "day" });
    expect(await refusal(operator.getSettlement({ day: "29/11/2026" }))).to.include({ code: Status.INVALID_ARGUMENT, field: "day" });
  });

  it("shows a merchant its own statement only, and finds a balance that does not add up", async () => {
    await purchase(300);
    await terminal.submitBatch(stream(submission(await closeBatch())));
    const shop = await as("merchant", SHOP);
    const own = await shop.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "" });
    expect(own).to.include({ acquirerId: "acq-1", purchases: 1 });
    expect(await refusal(shop.getMerchantStatement({ merchantId: merchantId("someone-else"), day: "", pageSize: 0, pageToken: "" }))).to.include({
      code: Status.PERMISSION_DENIED,
    });
    expect(await refusal(operator.getMerchantStatement({ merchantId: merchantId("nobody"), day: "", pageSize: 0, pageToken: "" }))).to.include({
      code: Status.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_UNKNOWN_MERCHANT,
    });
    expect(await refusal(operator.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "garbage" }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "page_token",
    });
    const purse = toPurseId((await reader.readPurse()).purseId.toString("hex"));
    const audit = await operator.runAudit({ cards: [{ purseId: purse, balance: money(9_800, EUR, 2), openingValue: money(10_000, EUR, 2) }] });
    expect(audit.ok).to.equal(false);
    const failed = audit.checks.filter((c) => !c.ok);
    expect(failed).to.have.length(1);
    expect(failed[0]!.detail).to.contain("card says 9800").and.contain("= 9700");
  });

  it("ends a submission that stalls (DEADLINE_EXCEEDED) and frees its place; refuses an empty batch and a load answer that does not decode", async () => {
    await server.close();
    server = await startClearing({
      security: await security.of("clearing", "clearing-1"),
      listen: "127.0.0.1:0",
      dir: join(dir, "clearing"),
      psamRegistry: join(dir, "psams.json"),
      clock: () => now,
      submissionLimits: { perTerminal: 1, idleMs: 300 },
    });
    const host = await as("terminal", "terminal-1");
    await purchase(100);
    const b = await closeBatch();
    // One record, then nothing: the host's one place is taken until clearing gives up on it.
    let release!: () => void;
    const held = new Promise<void>((r) => (release = r));
    async function* stalled(): AsyncIterable<SubmitBatchRequest> {
      yield submission(b)[0]!;
      await held;
    }
    const started = Date.now();
    const stalledCall = refusal(host.submitBatch(stalled()));
    await new Promise((r) => setTimeout(r, 50));
    expect(await refusal(host.submitBatch(stream(submission(b))))).to.include({ code: Status.RESOURCE_EXHAUSTED });
    expect(await stalledCall).to.include({ code: Status.DEADLINE_EXCEEDED });
    expect(Date.now() - started).to.be.below(5_000);
    release();
    expect(await host.submitBatch(stream(submission(b)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });

    const empty = { ...b.trailer, batchNumber: 2, count: 0, total: money(0, EUR, 0) };
    empty.batchMac = batchMac(issuer.psamBatchKey(PSAM), { psamId: Buffer.from(PSAM, "hex"), batchNumber: 2, count: 0, total: 0, currency: EUR });
    expect(await refusal(host.submitBatch(stream([{ item: { $case: "trailer", value: empty } }])))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "trailer.count",
    });

    const load = await genuineLoad(500);
    const garbled = Buffer.from(load.initializeResponse);
    garbled.fill(0xff, InitializeForLoadResponse.offset("expiry"), InitializeForLoadResponse.offset("expiry") + 4); // no longer a BCD date
    expect(await refusal((await as("load", "load-1")).submitLoads({ loads: [{ ...load, initializeResponse: garbled }] }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "loads[0].initialize_response",
    });
    expect((await (await as("operator", "operator")).getSettlement({ day: "" })).settlement).to.include({ purchases: 1, loads: 0 });
  });

  it("no longer lists a record as not paid once a resend has paid it", async () => {
    await purchase(100);
    const b = await closeBatch();
    const damaged = { ...b, records: [{ ...b.records[0]!, recordMac: randomBytes(8) }] };
    expect(await terminal.submitBatch(stream(submission(damaged)))).to.include({ posted: 0, quarantined: 1 });
    expect((await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries).to.have.length(1);
    expect(await terminal.submitBatch(stream(submission(b)))).to.include({ posted: 1, quarantined: 0, duplicate: true });
    expect((await operator.listQuarantined({ pageSize: 0, pageToken: "" })).entries).to.deep.equal([]);
    expect((await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" })).quarantinedRecords).to.deep.equal([]);
    expect((await operator.runAudit({ cards: [] })).quarantined).to.equal(0);
  });

  it("serves health and reflection", async () => {
    const { HealthDefinition } = await import("nice-grpc-server-health");
    const channel = openChannel(server.address, (await security.of("operator", "operator")).channel({ kind: "clearing" }));
    try {
      const health = clientFactory().create(HealthDefinition, channel);
      const r = await health.check({ service: "netpurse.clearing.v1.ClearingService" });
      expect(r.status).to.equal(1);
    } finally {
      channel.close();
    }
  });
});
