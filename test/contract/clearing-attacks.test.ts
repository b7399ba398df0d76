// Attacks on netpurse.clearing.v1.ClearingService (issue #11), each by a peer
// with what it could really hold: nothing but the network, a terminal host's
// certificate (its own PSAMs only), a PSAM's batch key (a stolen PSAM), the
// load server's certificate, a merchant's, an operator's. Each test says
// what clearing must answer and checks that no money was created or lost:
// the day's figures, and the audit with the card at hand.
//
// An attack that still succeeds is written as clearing should behave, marked
// it.skip with a comment saying what happens instead (one, the merchant a
// PSAM's key can change: docs/clearing.md, "Not done yet").

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import {
  BatchStatus,
  ClearingServiceDefinition,
  LoadOutcome,
  LoadProof,
  LoadStatus,
  PartyKind,
  QuarantineReason,
  type BatchRecord,
  type LoadRecord,
  type SubmitBatchRequest,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { PsamSlotState, TerminalConcentratorServiceDefinition, type AttachTerminalRequest } from "../../gen/netpurse/terminal/v1/terminal.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { merchantId, psamId as toPsamId, txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import { LoadResponse } from "../../lib/protocol/load.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import {
  ACQUIRER,
  BANK,
  OTHER_PSAM,
  PSAM,
  SHOP,
  THIEF,
  asMessage,
  clearingClient,
  forgeBatch,
  refusal,
  startClearingBench,
  stream,
  submission,
  type ClearingBench,
  type ClearingClient,
  unmaced,
  type ClosedBatch,
} from "../support/clearing-bench.js";
import { EUR, tempDir } from "../support/fixtures.js";
import { testSecurity, waitFor } from "../support/network.js";

/** A Date whose protobuf Timestamp is far beyond what a JavaScript Date holds (seconds = 10^15): what a hostile peer can put on the wire. */
const beyondDates = { getTime: () => 1e18 } as unknown as Date;

describe("ClearingService under attack (issue #11)", function () {
  this.timeout(60_000);
  let bench: ClearingBench;
  let terminal: ClearingClient;
  let operator: ClearingClient;

  beforeEach(async () => {
    bench = await startClearingBench();
    terminal = await bench.as("terminal", "terminal-1");
    operator = await bench.as("operator", "operator");
  });

  afterEach(async () => {
    await bench.close();
  });

  /** The open day's figures: purchases and loads posted, and what each party is owed or owes. */
  async function figures() {
    const { settlement } = await operator.getSettlement({ day: "" });
    const s = settlement!;
    const of = (kind: PartyKind, id: string) => s.positions.find((p) => p.kind === kind && p.partyId === id);
    return {
      purchases: s.purchases,
      loads: s.loads,
      paidTo: (merchant: string) => of(PartyKind.PARTY_KIND_MERCHANT, merchant)?.receivable?.amountMinor ?? 0n,
      owedBy: (bank: string) => of(PartyKind.PARTY_KIND_BANK, bank)?.payable?.amountMinor ?? 0n,
      parties: s.positions.map((p) => p.partyId),
    };
  }

  /** The audit with the card at hand: every ledger invariant holds, and the card's balance is its opening value plus its loads less its purchases. */
  async function expectAuditClean(): Promise<void> {
    const audit = await operator.runAudit({ cards: [await bench.cardAtHand()] });
    expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
    expect(audit.ok).to.equal(true);
  }

  const quarantineReasons = async () =>
    (await operator.listQuarantined({ pageSize: 500, pageToken: "" })).entries.map((e) =>
      e.entry?.$case === "rejectedBatch" || e.entry?.$case === "conflictingBatch"
        ? e.entry.value.rejectedBecause
        : e.entry?.$case === "record"
          ? e.entry.value.reason
          : e.entry?.value.reason,
    );

  const batchKey = () => bench.issuer.psamBatchKey(PSAM);

  describe("who may call: only what a certificate proves", () => {
    it("nothing but network access gets no connection: no certificate, or one of another authority", async () => {
      const none = clearingClient(bench.server.address, bench.security.cardholder);
      const { dir: foreignDir, cleanup } = await tempDir("netpurse-foreign-ca-");
      try {
        await CertificateAuthority.init(pkiDirOf(foreignDir));
        // A certificate of another authority that names an operator, offered to a client that trusts the real CA (so the server alone decides).
        const foreignOperator = (await (await testSecurity(foreignDir)).of("operator", "operator")).clientIdentity();
        const realCa = await readFile(join(bench.security.dir, "ca.crt"));
        const channel = openChannel(bench.server.address, { tls: { ca: realCa, identity: foreignOperator } });
        const foreign = clientFactory().create(ClearingServiceDefinition, channel);
        const forged: SubmitBatchRequest = {
          item: {
            $case: "trailer",
            value: { psamId: toPsamId(PSAM), batchNumber: 1, count: 0, total: money(0, EUR, 0), batchMac: randomBytes(8), closedAt: new Date() },
          },
        };
        try {
          for (const c of [none, foreign]) {
            expect((await refusal(c.getSettlement({ day: "" }, { deadline: 5_000 }))).code).to.equal(Status.UNAVAILABLE);
            expect((await refusal(c.submitBatch(stream([forged]), { deadline: 5_000 }))).code).to.equal(Status.UNAVAILABLE);
          }
        } finally {
          channel.close();
          none.close();
        }
      } finally {
        await cleanup();
      }
      expect(await figures()).to.include({ purchases: 0, loads: 0 });
    });

    it("each kind of peer is refused every RPC its kind does not serve, PERMISSION_DENIED NOT_ALLOWED", async () => {
      await bench.purchase(100);
      const batch = await bench.closeBatch();
      const load = await bench.genuineLoad(500);
      const denied = { code: Status.PERMISSION_DENIED, reason: ErrorReason.ERROR_REASON_NOT_ALLOWED };
      const loadServer = await bench.as("load", "load-1");
      const shop = await bench.as("merchant", SHOP);
      for (const [kind, id] of [
        ["load", "load-1"],
        ["merchant", SHOP],
        ["payment", "payment-1"],
        ["concentrator", "concentrator-1"],
        ["bank", BANK],
        ["operator", "operator"],
      ] as const) {
        const peer = await bench.as(kind, id);
        expect(await refusal(peer.submitBatch(stream(submission(batch)))), `${kind} SubmitBatch`).to.include(denied);
      }
      for (const [kind, id] of [
        ["terminal", "terminal-1"],
        ["merchant", SHOP],
        ["operator", "operator"],
      ] as const) {
        const peer = await bench.as(kind, id);
        expect(await refusal(peer.submitLoads({ loads: [load] })), `${kind} SubmitLoads`).to.include(denied);
      }
      for (const peer of [terminal, loadServer, shop]) {
        expect(await refusal(peer.getSettlement({ day: "" }))).to.include(denied);
        expect(await refusal(peer.closeSettlementDay({ day: "2026-11-29" }))).to.include(denied);
        expect(await refusal(peer.listQuarantined({ pageSize: 0, pageToken: "" }))).to.include(denied);
        expect(await refusal(peer.runAudit({ cards: [] }))).to.include(denied);
      }
      expect(await refusal(shop.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" }))).to.include(denied);
      expect(await refusal(loadServer.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" }))).to.include(denied);
      expect(await refusal(terminal.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "" }))).to.include(denied);
      expect(await refusal(loadServer.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "" }))).to.include(denied);
      expect(await figures()).to.include({ purchases: 0, loads: 0 });
      // Nothing refused was recorded: the genuine batch and load still count, once.
      expect((await terminal.submitBatch(stream(submission(batch)))).posted).to.equal(1);
      expect((await loadServer.submitLoads({ loads: [load] })).acknowledgements[0]).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: false });
      await expectAuditClean();
    });

    it("a merchant reads its own statement only, and cannot tell whether another merchant exists", async () => {
      await bench.purchase(300);
      await terminal.submitBatch(stream(submission(await bench.closeBatch())));
      const thief = await bench.as("merchant", THIEF);
      const denied = { code: Status.PERMISSION_DENIED, reason: ErrorReason.ERROR_REASON_NOT_ALLOWED };
      expect(await refusal(thief.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "" }))).to.include(denied);
      expect(await refusal(thief.getMerchantStatement({ merchantId: merchantId("no-such-shop"), day: "", pageSize: 0, pageToken: "" }))).to.include(denied);
      // A merchant certificate of an id clearing does not pay reads nothing either.
      const stranger = await bench.as("merchant", "stranger");
      expect(await refusal(stranger.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: "" }))).to.include(denied);
      const own = await thief.getMerchantStatement({ merchantId: merchantId(THIEF), day: "", pageSize: 0, pageToken: "" });
      expect(own).to.include({ purchases: 0, acquirerId: ACQUIRER });
      expect(own.lines).to.deep.equal([]);
      // The owner's token does not open another merchant's statement either (its scope names the merchant).
      const shop = await bench.as("merchant", SHOP);
      await bench.purchase(200);
      await terminal.submitBatch(stream(submission(await bench.closeBatch())));
      const first = await shop.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 1, pageToken: "" });
      expect(first.nextPageToken).to.not.equal("");
      expect(await refusal(thief.getMerchantStatement({ merchantId: merchantId(THIEF), day: "", pageSize: 1, pageToken: first.nextPageToken }))).to.include({
        code: Status.INVALID_ARGUMENT,
        field: "page_token",
      });
    });

    it("a terminal host neither submits nor reads another terminal's PSAM's batches, and its refused try blocks nothing", async () => {
      await bench.purchase(400);
      const genuine = await bench.closeBatch();
      const terminal2 = await bench.as("terminal", "terminal-2");
      expect(await refusal(terminal2.submitBatch(stream(submission(genuine))))).to.include({
        code: Status.PERMISSION_DENIED,
        reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
      });
      // The same with made-up content: refused before anything is kept.
      const madeUp = { ...genuine, trailer: { ...genuine.trailer, batchMac: randomBytes(8) } };
      expect(await refusal(terminal2.submitBatch(stream(submission(madeUp))))).to.include({ code: Status.PERMISSION_DENIED });
      const unknown = { ...genuine, trailer: { ...genuine.trailer, psamId: toPsamId("0badbad0") } };
      expect(await refusal(terminal2.submitBatch(stream(submission(unknown))))).to.include({
        code: Status.PERMISSION_DENIED,
        reason: ErrorReason.ERROR_REASON_UNKNOWN_PSAM,
      });
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await terminal.submitBatch(stream(submission(genuine)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1, duplicate: false });
      expect(await refusal(terminal2.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" }))).to.include({
        code: Status.PERMISSION_DENIED,
        reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
      });
      expect((await terminal.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 0, pageToken: "" })).batch?.posted).to.equal(1);
      expect((await figures()).paidTo(SHOP)).to.equal(400n);
      await expectAuditClean();
    });
  });

  describe("a record paid twice", () => {
    it("a batch sent again under another batch number, without the PSAM's key, is rejected and blocks nothing", async () => {
      await bench.purchase(250);
      const genuine = await bench.closeBatch();
      const renumbered = { ...genuine, trailer: { ...genuine.trailer, batchNumber: 2 } };
      expect(await terminal.submitBatch(stream(submission(renumbered)))).to.include({
        status: BatchStatus.BATCH_STATUS_REJECTED,
        rejectedBecause: QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC,
        posted: 0,
      });
      expect(await terminal.submitBatch(stream(submission(genuine)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
      const f = await figures();
      expect(f.purchases).to.equal(1);
      expect(f.paidTo(SHOP)).to.equal(250n);
      await expectAuditClean();
    });

    it("with the PSAM's key: the same records in a second batch, a record twice in one batch, or both batches at once, each paid once", async () => {
      await bench.purchase(100);
      await bench.purchase(200);
      const genuine = await bench.closeBatch();
      const key = batchKey();
      const strip = genuine.records.map(unmaced);
      // Both batches at once: whichever lands second finds the debits posted.
      const [a1, a2] = await Promise.all([
        terminal.submitBatch(stream(submission(genuine))),
        terminal.submitBatch(stream(submission(forgeBatch(key, PSAM, 2, strip)))),
      ]);
      expect(a1.posted + a2.posted).to.equal(2);
      expect(a1.quarantined + a2.quarantined).to.equal(2);
      const twiceInOne = await terminal.submitBatch(stream(submission(forgeBatch(key, PSAM, 3, [strip[0]!, strip[0]!]))));
      expect(twiceInOne).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 2 });
      // The same record twice is kept once in the quarantine: two from the second batch, one from the third.
      expect(await quarantineReasons()).to.deep.equal(Array(3).fill(QuarantineReason.QUARANTINE_REASON_ALREADY_POSTED));
      const f = await figures();
      expect(f.purchases).to.equal(2);
      expect(f.paidTo(SHOP)).to.equal(300n);
      await expectAuditClean();
    });

    it("a genuine record moved into another PSAM's batch, re-MACed with that PSAM's key, is not paid", async () => {
      await bench.purchase(800);
      const genuine = await bench.closeBatch();
      const r = unmaced(genuine.records[0]!);
      // terminal-2 holds OTHER_PSAM and its key; the card signed for PSAM, which the signature names.
      const moved = forgeBatch(bench.issuer.psamBatchKey(OTHER_PSAM), OTHER_PSAM, 1, [r]);
      const terminal2 = await bench.as("terminal", "terminal-2");
      expect(await terminal2.submitBatch(stream(submission(moved)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 1 });
      expect(await quarantineReasons()).to.deep.equal([QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE]);
      expect(await terminal.submitBatch(stream(submission(genuine)))).to.include({ posted: 1 });
      expect((await figures()).paidTo(SHOP)).to.equal(800n);
      await expectAuditClean();
    });

    // Purchases and loads take their ids from different hands (the merchant, the cardholder's client): a load under the
    // id of a posted purchase is still posted (postings are keyed by kind and id).
    it("a genuine load under the id of a posted purchase is posted all the same", async () => {
      const { transactionRef } = await bench.purchase(300);
      expect((await terminal.submitBatch(stream(submission(await bench.closeBatch())))).posted).to.equal(1);
      const load = await bench.genuineLoad(2_000, { transactionId: transactionRef });
      const loadServer = await bench.as("load", "load-1");
      expect((await loadServer.submitLoads({ loads: [load] })).acknowledgements[0]).to.include({ status: LoadStatus.LOAD_STATUS_POSTED });
      const f = await figures();
      expect(f.owedBy(BANK)).to.equal(2_000n);
      expect(f.paidTo(SHOP)).to.equal(300n);
      await expectAuditClean();
    });

    // The reverse: a load posted under a purchase's id does not keep the card-signed purchase from being paid.
    it("a genuine purchase under the id of a posted load is paid all the same", async () => {
      const id = randomUUID();
      const loadServer = await bench.as("load", "load-1");
      expect((await loadServer.submitLoads({ loads: [await bench.genuineLoad(1, { transactionId: id })] })).acknowledgements[0]?.status).to.equal(
        LoadStatus.LOAD_STATUS_POSTED,
      );
      await bench.purchase(900, { transactionRef: id });
      expect(await terminal.submitBatch(stream(submission(await bench.closeBatch())))).to.include({ posted: 1, quarantined: 0 });
      const f = await figures();
      expect(f.paidTo(SHOP)).to.equal(900n);
      await expectAuditClean();
    });
  });

  describe("a merchant paid without a card debit", () => {
    it("with the PSAM's key, a record whose amount, transaction or key version differs from what the card signed is not paid", async () => {
      await bench.purchase(100);
      const genuine = await bench.closeBatch();
      const r = unmaced(genuine.records[0]!);
      const forged = forgeBatch(batchKey(), PSAM, 1, [
        { ...r, amount: 100_000 },
        { ...r, transactionRef: randomUUID(), psamCounter: r.psamCounter + 100 },
        { ...r, keyVersion: 9, transactionRef: randomUUID(), psamCounter: r.psamCounter + 101 },
      ]);
      expect(await terminal.submitBatch(stream(submission(forged)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 0, quarantined: 3 });
      expect(await quarantineReasons()).to.deep.equal([
        QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE,
        QuarantineReason.QUARANTINE_REASON_BAD_CARD_SIGNATURE,
        QuarantineReason.QUARANTINE_REASON_KEY_VERSION_UNKNOWN,
      ]);
      const f = await figures();
      expect(f.purchases).to.equal(0);
      expect(f.parties).to.deep.equal([]);
    });

    // NOT PROTECTED YET (docs/clearing.md, "Not done yet"): the card's signature does not cover the merchant
    // (lib/protocol/purse.ts CardSignatureInput), and clearing takes the record's merchant_id on the PSAM's MAC alone. Whoever
    // holds a PSAM's batch key (a stolen PSAM, a terminal host that reads its software PSAM's file) can re-MAC a genuine record
    // for another registered merchant: the card's money is not created or lost, but paid to the wrong merchant. The fix binds
    // the merchant to the card's proof (the merchant id in the DEBIT command and the card's signature), a card protocol change;
    // this test is what it must pass.
    it.skip("with the PSAM's key, a genuine record re-MACed to another merchant pays that merchant nothing", async () => {
      await bench.purchase(700);
      const genuine = await bench.closeBatch();
      const r = unmaced(genuine.records[0]!);
      const redirected = forgeBatch(batchKey(), PSAM, 1, [{ ...r, merchantId: THIEF }]);
      expect(await terminal.submitBatch(stream(submission(redirected)))).to.include({ posted: 0 });
      expect((await figures()).paidTo(THIEF)).to.equal(0n);
      const statement = await operator.getMerchantStatement({ merchantId: merchantId(THIEF), day: "", pageSize: 0, pageToken: "" });
      expect(statement.purchases).to.equal(0);
    });
  });

  describe("blocking a genuine batch or load", () => {
    it("rejected submissions, many at once, keep nothing but one entry each and leave the batch number to the genuine batch", async () => {
      await bench.purchase(600);
      const genuine = await bench.closeBatch();
      const forged = { ...genuine, trailer: { ...genuine.trailer, batchMac: randomBytes(8) } };
      // A hundred at once: at most a few are open at a time, the rest are told to wait (RESOURCE_EXHAUSTED); none is counted.
      const acks = await Promise.all(Array.from({ length: 100 }, () => terminal.submitBatch(stream(submission(forged))).catch((e: unknown) => e)));
      const refused = acks.filter((a) => a instanceof Error);
      expect(refused.every((e) => (e as { code?: Status }).code === Status.RESOURCE_EXHAUSTED)).to.equal(true);
      const answered = acks.filter((a) => !(a instanceof Error)) as { status: BatchStatus; posted: number }[];
      expect(answered.length).to.be.greaterThan(0);
      expect(answered.every((a) => a.status === BatchStatus.BATCH_STATUS_REJECTED && a.posted === 0)).to.equal(true);
      const incomplete = await terminal.submitBatch(stream(submission({ ...genuine, records: [] })));
      expect(incomplete.rejectedBecause).to.equal(QuarantineReason.QUARANTINE_REASON_BATCH_INCOMPLETE);
      expect(await quarantineReasons()).to.deep.equal([QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC, QuarantineReason.QUARANTINE_REASON_BATCH_INCOMPLETE]);
      expect(await terminal.submitBatch(stream(submission(genuine)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
      expect((await figures()).paidTo(SHOP)).to.equal(600n);
      await expectAuditClean();
    });

    it("a forged load does not keep the genuine load of its id out; a load re-sent with other content is refused whole", async () => {
      const genuine = await bench.genuineLoad(1_500);
      const loadServer = await bench.as("load", "load-1");
      const answer = LoadResponse.decode(Buffer.from(genuine.loadAnswer));
      const forged = { ...genuine, loadAnswer: LoadResponse.encode({ ...answer, s3: randomBytes(8) }) };
      expect((await loadServer.submitLoads({ loads: [forged] })).acknowledgements[0]).to.include({
        status: LoadStatus.LOAD_STATUS_QUARANTINED,
        quarantinedBecause: QuarantineReason.QUARANTINE_REASON_BAD_S3,
      });
      expect((await loadServer.submitLoads({ loads: [genuine] })).acknowledgements[0]).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: false });
      // The forgery again, now that the genuine load holds the id: refused, and the genuine load stays posted once.
      const other = await bench.genuineLoad(50);
      expect(await refusal(loadServer.submitLoads({ loads: [other, forged] }))).to.include({
        code: Status.ALREADY_EXISTS,
        reason: ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
      });
      expect((await loadServer.submitLoads({ loads: [other] })).acknowledgements[0]).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: false });
      const f = await figures();
      expect(f.loads).to.equal(2);
      expect(f.owedBy(BANK)).to.equal(1_550n);
      await expectAuditClean();
    });

    // A batch sent first with a record damaged does not keep that record from being paid when the genuine batch comes
    // again: a resend checks every record not paid yet.
    it("a first submission with a damaged record does not keep the genuine record from being paid when the batch is sent again", async () => {
      await bench.purchase(100);
      await bench.purchase(200);
      const genuine = await bench.closeBatch();
      const damaged: ClosedBatch = { ...genuine, records: [genuine.records[0]!, { ...genuine.records[1]!, merchantId: THIEF }] };
      expect(await terminal.submitBatch(stream(submission(damaged)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1, quarantined: 1 });
      await terminal.submitBatch(stream(submission(genuine)));
      const f = await figures();
      expect(f.paidTo(SHOP)).to.equal(300n);
      expect(f.paidTo(THIEF)).to.equal(0n);
      await expectAuditClean();
    });

    // With a PSAM's batch key an attacker can MAC a batch under a number the PSAM will use: it does not keep the
    // genuine batch out, which is counted record by record and the conflict listed.
    it("a forged batch under the PSAM's key does not keep the genuine batch of its number from being paid", async () => {
      const empty = forgeBatch(batchKey(), PSAM, 1, []);
      await terminal.submitBatch(stream(submission(empty))).catch(() => undefined);
      await bench.purchase(500);
      const genuine = await bench.closeBatch();
      expect(genuine.trailer.batchNumber).to.equal(1);
      expect(await terminal.submitBatch(stream(submission(genuine)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1 });
      expect((await figures()).paidTo(SHOP)).to.equal(500n);
      await expectAuditClean();
    });

    // A load recorded NOT_LOADED on the load server's word gives way to the card's own S3 for that id.
    it("a load first reported NOT_LOADED is posted when its card-proven S3 arrives", async () => {
      const genuine = await bench.genuineLoad(1_000);
      const loadServer = await bench.as("load", "load-1");
      const notLoaded: LoadRecord = {
        ...genuine,
        outcome: LoadOutcome.LOAD_OUTCOME_NOT_LOADED,
        proof: LoadProof.LOAD_PROOF_NEGATIVE_RESULT,
        loadAnswer: Buffer.alloc(0),
      };
      expect((await loadServer.submitLoads({ loads: [notLoaded] })).acknowledgements[0]?.status).to.equal(LoadStatus.LOAD_STATUS_NOT_LOADED);
      expect((await loadServer.submitLoads({ loads: [genuine] })).acknowledgements[0]?.status).to.equal(LoadStatus.LOAD_STATUS_POSTED);
      expect((await figures()).owedBy(BANK)).to.equal(1_000n);
      await expectAuditClean();
    });

    // The bank that pays for a load is the one the card signed in S1, not whichever the load server names.
    it("a genuine load reported under another bank is not posted to that bank", async () => {
      const genuine = await bench.genuineLoad(2_500);
      const loadServer = await bench.as("load", "load-1");
      const shifted = { ...genuine, bankId: "bank-2" };
      const [ack] = (await loadServer.submitLoads({ loads: [shifted] }).catch(() => ({ acknowledgements: [] }))).acknowledgements;
      expect(ack?.status).to.not.equal(LoadStatus.LOAD_STATUS_POSTED);
      expect((await figures()).owedBy("bank-2")).to.equal(0n);
    });
  });

  describe("malformed fields", () => {
    const record = (b: ClosedBatch, change: Partial<BatchRecord>): SubmitBatchRequest[] => [
      { item: { $case: "record", value: { ...asMessage(b.records[0]!), ...change } } },
      { item: { $case: "trailer", value: b.trailer } },
    ];

    it("a record or trailer that cannot be one is INVALID_ARGUMENT naming the field, keeps nothing, and blocks nothing", async () => {
      await bench.purchase(100);
      const b = await bench.closeBatch();
      const t = b.trailer;
      const cases: [string, SubmitBatchRequest[]][] = [
        ["records[0].amount", record(b, { amount: money(-1, EUR, 0) })],
        ["records[0].amount", record(b, { amount: money(2 ** 32, EUR, 0) })],
        ["records[0].amount", record(b, { amount: undefined })],
        ["records[0].amount.currency", record(b, { amount: money(100, 0, 0) })],
        // 1000..65535 are loyalty programmes' points (docs/loyalty.md): beyond them no code is one.
        ["records[0].amount.currency", record(b, { amount: money(100, 65_536, 0) })],
        ["records[0].key_version", record(b, { keyVersion: 256 })],
        ["records[0].balance_after", record(b, { balanceAfter: -1n })],
        ["records[0].balance_after", record(b, { balanceAfter: 2n ** 32n })],
        ["records[0].date_time", record(b, { dateTime: undefined })],
        ["records[0].date_time", record(b, { dateTime: new Date("1969-12-31T23:59:59Z") })],
        ["records[0].date_time", record(b, { dateTime: new Date("2106-02-08T00:00:00Z") })],
        ["records[0].date_time", record(b, { dateTime: beyondDates })],
        ["records[0].purse_id", record(b, { purseId: { value: randomBytes(7) } })],
        ["records[0].purse_id", record(b, { purseId: undefined })],
        ["records[0].challenge", record(b, { challenge: randomBytes(9) })],
        ["records[0].card_signature", record(b, { cardSignature: Buffer.alloc(0) })],
        ["records[0].record_mac", record(b, { recordMac: randomBytes(16) })],
        ["records[0].transaction_id", record(b, { transactionId: txnId("") })],
        ["records[0].transaction_id", record(b, { transactionId: txnId(randomUUID().toUpperCase()) })],
        ["records[0].merchant_id", record(b, { merchantId: merchantId("") })],
        ["records[0].merchant_id", record(b, { merchantId: merchantId("x".repeat(17)) })],
        ["item", [{ item: undefined }, { item: { $case: "trailer", value: t } }]],
        [
          "trailer.psam_id",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, psamId: { value: randomBytes(3) } } } }),
        ],
        [
          "trailer.psam_id",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, psamId: undefined } } }),
        ],
        [
          "trailer.batch_number",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, batchNumber: 0 } } }),
        ],
        [
          "trailer.total",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, total: undefined } } }),
        ],
        [
          "trailer.total",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, total: money(-100, EUR, 0) } } }),
        ],
        [
          "trailer.total",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, total: money(2 ** 53, EUR, 0) } } }),
        ],
        [
          "trailer.total.currency",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, total: money(100, 0, 0) } } }),
        ],
        [
          "trailer.batch_mac",
          record(b, {})
            .slice(0, 1)
            .concat({ item: { $case: "trailer", value: { ...t, batchMac: randomBytes(7) } } }),
        ],
        ["trailer", record(b, {}).slice(0, 1)],
        ["trailer", [...record(b, {}), ...record(b, {}).slice(0, 1)]],
      ];
      for (const [field, messages] of cases) {
        expect(await refusal(terminal.submitBatch(stream(messages))), field).to.include({ code: Status.INVALID_ARGUMENT, field });
      }
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await figures()).to.include({ purchases: 0 });
      expect(await terminal.submitBatch(stream(submission(b)))).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, posted: 1, duplicate: false });
      await expectAuditClean();
    });

    // A timestamp beyond what a JavaScript date holds is INVALID_ARGUMENT naming the field, never INTERNAL.
    it("a trailer's closed_at out of range is INVALID_ARGUMENT naming it, for a genuine batch and a forged one", async () => {
      await bench.purchase(100);
      const b = await bench.closeBatch();
      const genuineButFar = { ...b, trailer: { ...b.trailer, closedAt: beyondDates } };
      const forgedAndFar = { ...b, trailer: { ...b.trailer, closedAt: beyondDates, batchMac: randomBytes(8) } };
      for (const batch of [genuineButFar, forgedAndFar]) {
        expect(await refusal(terminal.submitBatch(stream(submission(batch))))).to.include({ code: Status.INVALID_ARGUMENT, field: "trailer.closed_at" });
      }
      expect(await terminal.submitBatch(stream(submission(b)))).to.include({ posted: 1 });
    });

    it("a load that cannot be one is INVALID_ARGUMENT naming the field, and nothing of its request is recorded", async () => {
      const genuine = await bench.genuineLoad(700);
      const loadServer = await bench.as("load", "load-1");
      const cases: [string, LoadRecord[]][] = [
        ["loads", []],
        ["loads", Array.from({ length: 101 }, () => ({ ...genuine, transactionId: txnId(randomUUID()) }))],
        ["loads", [genuine, genuine]],
        ["loads[1].transaction_id", [genuine, { ...genuine, transactionId: txnId("not-a-uuid") }]],
        ["loads[0].bank_id", [{ ...genuine, bankId: "" }]],
        ["loads[0].bank_id", [{ ...genuine, bankId: "b".repeat(65) }]],
        ["loads[0].purse_id", [{ ...genuine, purseId: { value: randomBytes(9) } }]],
        ["loads[0].amount", [{ ...genuine, amount: money(0, EUR, 2) }]],
        ["loads[0].amount", [{ ...genuine, amount: money(-700, EUR, 2) }]],
        ["loads[0].amount", [{ ...genuine, amount: money(2 ** 32, EUR, 2) }]],
        ["loads[0].amount", [{ ...genuine, amount: money(700, EUR, 5) }]],
        ["loads[0].outcome", [{ ...genuine, outcome: LoadOutcome.LOAD_OUTCOME_UNSPECIFIED }]],
        ["loads[0].proof", [{ ...genuine, proof: LoadProof.LOAD_PROOF_NEGATIVE_RESULT }]],
        ["loads[0].proof", [{ ...genuine, outcome: LoadOutcome.LOAD_OUTCOME_NOT_LOADED }]],
        ["loads[0].authorised", [{ ...genuine, authorised: randomBytes(3) }]],
        ["loads[0].initialize_response", [{ ...genuine, initializeResponse: Buffer.alloc(0) }]],
        ["loads[0].load_command", [{ ...genuine, loadCommand: randomBytes(200) }]],
        ["loads[0].load_answer", [{ ...genuine, loadAnswer: randomBytes(1) }]],
        ["loads[0].load_answer", [{ ...genuine, proof: LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN }]],
      ];
      for (const [field, loads] of cases) {
        expect(await refusal(loadServer.submitLoads({ loads })), field).to.include({ code: Status.INVALID_ARGUMENT, field });
      }
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await figures()).to.include({ loads: 0 });
      expect((await loadServer.submitLoads({ loads: [genuine] })).acknowledgements[0]).to.include({ status: LoadStatus.LOAD_STATUS_POSTED, duplicate: false });
      await expectAuditClean();
    });

    // A timestamp beyond what a JavaScript date holds is INVALID_ARGUMENT naming the field, never INTERNAL.
    it("a load's settled_at out of range is INVALID_ARGUMENT naming it", async () => {
      const genuine = await bench.genuineLoad(700);
      const loadServer = await bench.as("load", "load-1");
      const answer = LoadResponse.decode(Buffer.from(genuine.loadAnswer));
      const forged = { ...genuine, settledAt: beyondDates, loadAnswer: LoadResponse.encode({ ...answer, s3: randomBytes(8) }) };
      expect(await refusal(loadServer.submitLoads({ loads: [forged] }))).to.include({ code: Status.INVALID_ARGUMENT, field: "loads[0].settled_at" });
    });

    it("page tokens work only for the list and scope they were made for; days must be days, and not in the future", async () => {
      for (const amount of [100, 200, 300]) await bench.purchase(amount);
      const b = await bench.closeBatch();
      // Two records damaged in transit: a batch with quarantined records to page through.
      b.records[0] = { ...b.records[0]!, merchantId: "x1" };
      b.records[1] = { ...b.records[1]!, merchantId: "x2" };
      await terminal.submitBatch(stream(submission(b)));
      const quarantineToken = (await operator.listQuarantined({ pageSize: 1, pageToken: "" })).nextPageToken;
      const batchToken = (await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 1, pageToken: "" })).nextPageToken;
      expect(quarantineToken).to.not.equal("");
      expect(batchToken).to.not.equal("");
      const bad = { code: Status.INVALID_ARGUMENT, field: "page_token" };
      expect(await refusal(operator.getMerchantStatement({ merchantId: merchantId(SHOP), day: "", pageSize: 0, pageToken: quarantineToken }))).to.include(bad);
      expect(await refusal(operator.listQuarantined({ pageSize: 0, pageToken: batchToken }))).to.include(bad);
      expect(await refusal(operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 2, pageSize: 0, pageToken: batchToken }))).to.include(bad);
      expect(await refusal(operator.getBatch({ psamId: toPsamId(OTHER_PSAM), batchNumber: 1, pageSize: 0, pageToken: batchToken }))).to.include(bad);
      expect(await refusal(operator.listQuarantined({ pageSize: 0, pageToken: `${quarantineToken}A` }))).to.include(bad);
      expect(await refusal(operator.listQuarantined({ pageSize: -1, pageToken: "" }))).to.include({ code: Status.INVALID_ARGUMENT, field: "page_size" });
      // The second page of each, with its own token, is the rest.
      expect((await operator.listQuarantined({ pageSize: 1, pageToken: quarantineToken })).entries).to.have.length(1);
      expect((await operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 1, pageSize: 1, pageToken: batchToken })).quarantinedRecords).to.have.length(1);

      const badDay = { code: Status.INVALID_ARGUMENT, field: "day" };
      for (const day of ["2026-11-30", "9999-12-31", "2026-02-30", "2026-11-29 ", "29/11/2026", "2026-1-29"]) {
        expect(await refusal(operator.closeSettlementDay({ day })), day).to.include(badDay);
      }
      expect(await refusal(operator.getSettlement({ day: "2026-11" }))).to.include(badDay);
      expect(await refusal(operator.getMerchantStatement({ merchantId: merchantId(SHOP), day: "yesterday", pageSize: 0, pageToken: "" }))).to.include(badDay);
      expect(await refusal(operator.getBatch({ psamId: toPsamId(PSAM), batchNumber: 0, pageSize: 0, pageToken: "" }))).to.include({
        code: Status.INVALID_ARGUMENT,
        field: "batch_number",
      });
      expect(await refusal(operator.getBatch({ psamId: { value: randomBytes(5) }, batchNumber: 1, pageSize: 0, pageToken: "" }))).to.include({
        code: Status.INVALID_ARGUMENT,
        field: "psam_id",
      });
      const tooMany = Array.from({ length: 1_001 }, () => ({ purseId: { value: randomBytes(8) }, balance: money(0, EUR, 2), openingValue: undefined }));
      expect(await refusal(operator.runAudit({ cards: tooMany }))).to.include({ code: Status.INVALID_ARGUMENT, field: "cards" });
      expect(
        await refusal(operator.runAudit({ cards: [{ purseId: { value: randomBytes(8) }, balance: money(-1, EUR, 2), openingValue: undefined }] })),
      ).to.include({
        code: Status.INVALID_ARGUMENT,
        field: "cards[0].balance",
      });
      expect((await figures()).paidTo(SHOP)).to.equal(300n);
      expect((await operator.getSettlement({ day: "2026-11-29" })).settlement?.closed).to.equal(false);
    });
    // A day of the right form that is no date (2026-13-01) is INVALID_ARGUMENT naming day, never INTERNAL.
    it("a day of the form YYYY-MM-DD that is no date is INVALID_ARGUMENT naming day, not INTERNAL", async () => {
      const shop = await bench.as("merchant", SHOP);
      const badDay = { code: Status.INVALID_ARGUMENT, field: "day" };
      for (const day of ["2026-13-01", "2026-01-32", "0000-00-00"]) {
        expect(await refusal(operator.getSettlement({ day })), day).to.include(badDay);
        expect(await refusal(operator.closeSettlementDay({ day })), day).to.include(badDay);
        expect(await refusal(shop.getMerchantStatement({ merchantId: merchantId(SHOP), day, pageSize: 0, pageToken: "" })), day).to.include(badDay);
      }
    });
  });

  describe("floods", () => {
    const filler = (): SubmitBatchRequest => ({
      item: {
        $case: "record",
        value: asMessage({
          psamCounter: 1,
          purseId: randomBytes(8),
          keyVersion: 1,
          sessionCounter: 1,
          challenge: randomBytes(8),
          cardCounter: 2,
          balanceAfter: 0,
          amount: 1,
          currency: EUR,
          dateTime: 1_800_000_000,
          transactionRef: randomUUID(),
          merchantId: SHOP,
          cardSignature: randomBytes(8),
          recordMac: randomBytes(8),
        }),
      },
    });

    it("a stream of 10,001 records is refused at the one over the limit, and nothing of it is kept", async () => {
      await bench.purchase(100);
      const b = await bench.closeBatch();
      function* flood(): Generator<SubmitBatchRequest> {
        for (let i = 0; i < 10_001; i++) yield filler();
        yield { item: { $case: "trailer", value: b.trailer } };
      }
      expect(await refusal(terminal.submitBatch(stream(flood())))).to.include({ code: Status.INVALID_ARGUMENT, field: "record" });
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await terminal.submitBatch(stream(submission(b)))).to.include({ posted: 1, duplicate: false });
    });

    it("a message over 64 KiB is RESOURCE_EXHAUSTED, for SubmitBatch and SubmitLoads", async () => {
      await bench.purchase(100);
      const b = await bench.closeBatch();
      const big = await bench.as("terminal", "terminal-1", { maxMessageBytes: 1024 * 1024 });
      const huge = [{ item: { $case: "record", value: { ...asMessage(b.records[0]!), challenge: randomBytes(70_000) } } } as SubmitBatchRequest];
      expect((await refusal(big.submitBatch(stream([...huge, ...submission(b).slice(-1)])))).code).to.equal(Status.RESOURCE_EXHAUSTED);
      const load = await bench.genuineLoad(300);
      const bigLoadServer = await bench.as("load", "load-1", { maxMessageBytes: 1024 * 1024 });
      expect((await refusal(bigLoadServer.submitLoads({ loads: [{ ...load, authorised: randomBytes(70_000) }] }))).code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await terminal.submitBatch(stream(submission(b)))).to.include({ posted: 1 });
      expect((await bigLoadServer.submitLoads({ loads: [load] })).acknowledgements[0]?.status).to.equal(LoadStatus.LOAD_STATUS_POSTED);
      await expectAuditClean();
    });

    it("a submission that never sends its trailer holds no database lock: other batches and the operator's reads go on, and ending it keeps nothing", async () => {
      const stalled = new AsyncQueue<SubmitBatchRequest>();
      const abort = new AbortController();
      let settled = false;
      const call = terminal
        .submitBatch(stalled, { signal: abort.signal })
        .catch((e: unknown) => e)
        .finally(() => (settled = true));
      for (let i = 0; i < 10_000; i++) stalled.push(filler());
      await waitFor(() => stalled.length === 0, 20_000, "the stalled submission's records to be sent");
      await bench.purchase(350, { psam: OTHER_PSAM });
      const terminal2 = await bench.as("terminal", "terminal-2");
      expect(await terminal2.submitBatch(stream(submission(await bench.closeBatch(OTHER_PSAM))))).to.include({ posted: 1 });
      expect((await figures()).paidTo(SHOP)).to.equal(350n);
      expect((await operator.runAudit({ cards: [] })).ok).to.equal(true);
      expect(settled).to.equal(false);
      abort.abort();
      await call;
      expect(await quarantineReasons()).to.deep.equal([]);
      expect(await figures()).to.include({ purchases: 1 });
      await expectAuditClean();
    });

    // A submission holds its records in memory until its trailer: a terminal host may keep only a few open at once.
    it("one terminal host cannot keep more than a few submissions open at once", async () => {
      const aborts: AbortController[] = [];
      const calls = Array.from({ length: 17 }, () => {
        const q = new AsyncQueue<SubmitBatchRequest>();
        q.push(filler());
        const a = new AbortController();
        aborts.push(a);
        return terminal.submitBatch(q, { signal: a.signal }).then(
          () => undefined,
          (e: unknown) => e as { code?: Status },
        );
      });
      const first = await Promise.race([Promise.race(calls), new Promise((r) => setTimeout(() => r("none ended"), 5_000))]);
      for (const a of aborts) a.abort();
      await Promise.all(calls);
      expect(first).to.have.property("code", Status.RESOURCE_EXHAUSTED);
    });
  });

  describe("CloseBatches at the concentrator", () => {
    let concentrator: Awaited<ReturnType<typeof startConcentrator>>;
    beforeEach(async () => {
      concentrator = await startConcentrator({
        security: await bench.security.of("concentrator", "concentrator-1"),
        psamRegistry: bench.registryPath,
        listen: "127.0.0.1:0",
        keepaliveIntervalMs: 1_000,
        closeBatchesTimeoutMs: 2_000,
      });
    });
    afterEach(async () => {
      await concentrator.close();
    });

    const concentratorAs = async (kind: "operator" | "terminal" | "payment" | "merchant", id: string) => {
      const channel = openChannel(concentrator.address, (await bench.security.of(kind, id)).channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
      return Object.assign(clientFactory().create(TerminalConcentratorServiceDefinition, channel), { close: () => channel.close() });
    };

    /**
     * terminal-2, attached with the PSAM provisioned for it, answering every CloseBatchesCommand with `closed`
     * whatever it was asked. Ends when the test aborts it.
     */
    async function lyingHost(closed: { psam: string; batchNumber: number }[]) {
      const client = await concentratorAs("terminal", "terminal-2");
      const out = new AsyncQueue<AttachTerminalRequest>();
      const abort = new AbortController();
      const slot = {
        slot: 0,
        psamId: toPsamId(OTHER_PSAM),
        keyVersions: [1],
        currencies: [EUR],
        state: PsamSlotState.PSAM_SLOT_STATE_READY,
        psamCounter: 0,
        pendingDebits: [],
        batchCount: 0,
        reader: "",
      };
      out.push({ message: { $case: "hello", value: { terminalId: "terminal-2", window: 8, slots: [slot] } } });
      let welcomed = false;
      const run = (async () => {
        for await (const m of client.attachTerminal(out, { signal: abort.signal })) {
          const msg = m.message;
          if (msg?.$case === "welcome") welcomed = true;
          else if (msg?.$case === "ping") out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
          else if (msg?.$case === "closeBatches") {
            out.push({
              message: {
                $case: "closeBatchesReport",
                value: {
                  requestId: msg.value.requestId,
                  closed: closed.map((c) => ({
                    terminalId: "terminal-1",
                    psamId: toPsamId(c.psam),
                    batchNumber: c.batchNumber,
                    count: 3,
                    total: money(999, EUR, 0),
                  })),
                  notClosed: [],
                },
              },
            });
          }
        }
      })().catch(() => undefined);
      await waitFor(() => welcomed, 5_000, "terminal-2 to be welcomed");
      return {
        async stop() {
          out.close();
          abort.abort();
          await run;
          client.close();
        },
      };
    }

    it("CloseBatches from a terminal host, a payment server or a merchant is PERMISSION_DENIED NOT_ALLOWED", async () => {
      for (const [kind, id] of [
        ["terminal", "terminal-1"],
        ["payment", "payment-1"],
        ["merchant", SHOP],
      ] as const) {
        const c = await concentratorAs(kind, id);
        try {
          expect(await refusal(c.closeBatches({ terminalId: "", psamId: undefined })), kind).to.include({
            code: Status.PERMISSION_DENIED,
            reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
          });
        } finally {
          c.close();
        }
      }
    });

    it("a terminal host's report of its own PSAM reaches the operator under the id its certificate proves", async () => {
      const host = await lyingHost([{ psam: OTHER_PSAM, batchNumber: 4 }]);
      const op = await concentratorAs("operator", "operator");
      try {
        const r = await op.closeBatches({ terminalId: "terminal-2", psamId: undefined });
        expect(r.closed.map((c) => [c.terminalId, Buffer.from(c.psamId!.value).toString("hex"), c.batchNumber])).to.deep.equal([["terminal-2", OTHER_PSAM, 4]]);
        expect(r.notClosed).to.deep.equal([]);
        // A host that is gone is reported as not answering, not waited for.
        await host.stop();
        await waitFor(async () => (await op.listTerminals({})).terminals.length === 0, 5_000, "terminal-2 to detach");
        expect(await refusal(op.closeBatches({ terminalId: "terminal-2", psamId: undefined }))).to.include({ code: Status.NOT_FOUND });
      } finally {
        op.close();
        await host.stop();
      }
    });

    // A terminal host answers CloseBatches only for the PSAMs in its own slots, and the one asked for.
    it("a terminal host's report of a PSAM it does not hold, or was not asked about, is not passed on", async () => {
      const host = await lyingHost([
        { psam: OTHER_PSAM, batchNumber: 4 },
        { psam: PSAM, batchNumber: 9 },
      ]);
      const op = await concentratorAs("operator", "operator");
      try {
        const all = await op.closeBatches({ terminalId: "terminal-2", psamId: undefined });
        expect(all.closed.map((c) => Buffer.from(c.psamId!.value).toString("hex"))).to.deep.equal([OTHER_PSAM]);
        const one = await op.closeBatches({ terminalId: "", psamId: toPsamId(OTHER_PSAM) });
        expect(one.closed.map((c) => Buffer.from(c.psamId!.value).toString("hex"))).to.deep.equal([OTHER_PSAM]);
      } finally {
        op.close();
        await host.stop();
      }
    });
  });
});
