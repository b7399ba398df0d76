// The load server's clearing reporter against a scripted ClearingService on
// loopback (real gRPC): how it batches, retries, reads acknowledgements and
// isolates a refused load, each checked in the load server's outbox and in
// what the stand-in clearing received. The real clearing service is in
// load-clearing.test.ts; this file drives the answers it would rarely give.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { ServerError, Status } from "nice-grpc";
import {
  ClearingServiceDefinition,
  LoadStatus,
  QuarantineReason,
  type LoadAcknowledgement,
  type SubmitLoadsRequest,
  type SubmitLoadsResponse,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { invalidField, NetpurseError } from "../../lib/grpc/errors.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import type { Logger } from "../../lib/log.js";
import { InitializeForLoadCommand, InitializeForLoadResponse, LoadCommand } from "../../lib/protocol/load.js";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { ClearingReporter, LOADS_PER_REQUEST } from "../../services/load/clearing-reporter.js";
import { LOAD_MIGRATIONS, LoadStore, type Settlement } from "../../services/load/store.js";
import { tempDir } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";

/** A logger that keeps what it is told, to check what reaches the operator's log. */
function recordingLogger() {
  const lines: { level: string; msg: string; fields: Record<string, unknown> }[] = [];
  const log: Logger = {
    debug: (msg, fields = {}) => lines.push({ level: "debug", msg, fields }),
    info: (msg, fields = {}) => lines.push({ level: "info", msg, fields }),
    warn: (msg, fields = {}) => lines.push({ level: "warn", msg, fields }),
    error: (msg, fields = {}) => lines.push({ level: "error", msg, fields }),
    child: () => log,
  };
  return { log, lines };
}

type Answer = (req: SubmitLoadsRequest, call: number) => Promise<SubmitLoadsResponse>;

const ack = (id: string, o: Partial<LoadAcknowledgement> = {}): LoadAcknowledgement => ({
  transactionId: { value: id },
  status: LoadStatus.LOAD_STATUS_POSTED,
  quarantinedBecause: QuarantineReason.QUARANTINE_REASON_UNSPECIFIED,
  duplicate: false,
  settlementDay: "2030-01-02",
  ...o,
});
const postAll: Answer = async (req) => ({ acknowledgements: req.loads.map((l) => ack(l.transactionId!.value)) });
const idsOf = (req: SubmitLoadsRequest) => req.loads.map((l) => l.transactionId!.value);

/** A stand-in clearing service answering SubmitLoads as the test scripts it, and keeping every request with its time. */
async function startStubClearing() {
  let answer: Answer = postAll;
  const calls: { at: number; ids: string[] }[] = [];
  const unimplemented = async (): Promise<never> => {
    throw new ServerError(Status.UNIMPLEMENTED, "not in this stand-in");
  };
  const server = await startGrpcServer({
    address: "127.0.0.1:0",
    services: [
      service(
        ClearingServiceDefinition,
        {
          submitLoads: async (req) => {
            calls.push({ at: Date.now(), ids: idsOf(req) });
            return answer(req, calls.length);
          },
          submitBatch: unimplemented,
          getSettlement: unimplemented,
          closeSettlementDay: unimplemented,
          getMerchantStatement: unimplemented,
          getBatch: unimplemented,
          listQuarantined: unimplemented,
          runAudit: unimplemented,
        },
        { all: "public" },
      ),
    ],
    transport: { insecure: true },
    log: recordingLogger().log,
  });
  return {
    address: server.address,
    calls,
    answer(a: Answer) {
      answer = a;
    },
    close: () => server.shutdown(),
  };
}

/** Settles a load in the store as the load server does (pending with its LOAD command, then settled), with well-formed card messages. */
async function settledLoad(store: LoadStore, s: Partial<Settlement> = {}): Promise<string> {
  const id = randomUUID();
  const amount = 500;
  const init = {
    format: 1,
    providerId: Buffer.alloc(4),
    purseId: randomBytes(8),
    currency: 978,
    exponent: 2,
    balance: 1_000,
    maxBalance: 50_000,
    expiry: "2031-12-31",
    counter: 3,
    keyVersion: 1,
    algorithm: 1,
    status: 0,
    challenge: randomBytes(8),
    s1: randomBytes(8),
  };
  const authorised = { amount, currency: 978, bankId: "demo-bank", dateTime: 1_900_000_000, transactionRef: id };
  await store.insert(
    {
      transaction_id: id,
      bank_id: "demo-bank",
      purse_id: init.purseId.toString("hex"),
      amount_minor: amount,
      currency: 978,
      exponent: 2,
      key_nonce: randomBytes(16),
      authorised: InitializeForLoadCommand.encode(authorised),
      initialize_response: InitializeForLoadResponse.encode(init),
      hsm_id: "0a0b0c0d",
      hsm_counter: 7,
      load_command: LoadCommand.encode({ ...authorised, hsmId: Buffer.from("0a0b0c0d", "hex"), hsmCounter: 7, s2: randomBytes(8) }),
      proof_reference: randomUUID(),
      state: "PENDING",
    },
    "load_command_issued",
    "test",
  );
  expect(await store.settle(id, { outcome: "LOADED", kind: "S3", proof: "S3 verified", cardCounter: 4, cardSignature: randomBytes(8), ...s })).to.equal(true);
  return id;
}

describe("contract: the load server's clearing reporter (SubmitLoads against a scripted clearing)", function () {
  this.timeout(30_000);
  let dir: { dir: string; cleanup: () => Promise<void> };
  let db: Db;
  let store: LoadStore;
  let stub: Awaited<ReturnType<typeof startStubClearing>>;
  let channel: ReturnType<typeof openChannel>;
  let reporter: ClearingReporter | undefined;
  let logged: ReturnType<typeof recordingLogger>;

  beforeEach(async () => {
    dir = await tempDir("netpurse-reporter-");
    db = openSqlite(join(dir.dir, "load.db"), LOAD_MIGRATIONS);
    store = new LoadStore(db);
    stub = await startStubClearing();
    channel = openChannel(stub.address, { insecure: true });
    logged = recordingLogger();
  });
  afterEach(async () => {
    await reporter?.close();
    reporter = undefined;
    channel.close();
    await stub.close();
    await db.close();
    await dir.cleanup();
  });

  const makeReporter = (o: { firstBackoffMs?: number; maxBackoffMs?: number; deadlineMs?: number } = {}) =>
    (reporter = new ClearingReporter({
      store,
      clearing: clientFactory().create(ClearingServiceDefinition, channel),
      log: logged.log,
      everyMs: 60_000,
      firstBackoffMs: o.firstBackoffMs ?? 100,
      maxBackoffMs: o.maxBackoffMs ?? 1_000,
      deadlineMs: o.deadlineMs ?? 2_000,
    }));
  const reportOf = async (id: string) => (await store.clearingReports()).find((r) => r.transaction_id === id)!;

  it(`sends ${LOADS_PER_REQUEST} loads a request at most, oldest first, and marks each acknowledged load once`, async () => {
    const ids: string[] = [];
    for (let i = 0; i < 250; i++) ids.push(await settledLoad(store));
    await makeReporter().flush();
    expect(stub.calls.map((c) => c.ids.length)).to.deep.equal([100, 100, 50]);
    expect(stub.calls.flatMap((c) => c.ids)).to.deep.equal(ids);
    const reports = await store.clearingReports();
    expect(reports.filter((r) => r.reported_at && r.clearing_status === "POSTED" && r.attempts === 1 && r.settlement_day === "2030-01-02")).to.have.length(250);
    await reporter!.flush();
    expect(stub.calls).to.have.length(3);
  });

  it("clearing UNAVAILABLE: the loads stay queued and are retried with a doubling back-off, which wake-ups do not cut short", async () => {
    const id = await settledLoad(store);
    stub.answer(async (req, call) => {
      if (call <= 3) throw new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, "clearing is restarting");
      return postAll(req, call);
    });
    makeReporter({ firstBackoffMs: 150, maxBackoffMs: 10_000 }).start();
    await waitFor(() => stub.calls.length >= 1);
    // Settlements during the back-off wake the reporter; they must not add attempts.
    await new Promise((r) => setTimeout(r, 50));
    for (let i = 0; i < 5; i++) reporter!.wake();
    await waitFor(async () => !!(await reportOf(id)).reported_at, 10_000, "the load reported");
    const gaps = stub.calls.slice(1).map((c, i) => c.at - stub.calls[i]!.at);
    expect(stub.calls).to.have.length(4);
    expect(gaps[0]).to.be.at.least(140);
    expect(gaps[1]).to.be.at.least(290);
    expect(gaps[2]).to.be.at.least(590);
    expect(await reportOf(id)).to.deep.include({ attempts: 4, clearing_status: "POSTED", last_error: null });
  });

  it("clearing silent past the deadline (DEADLINE_EXCEEDED): the load stays queued with the error, and goes again", async () => {
    const id = await settledLoad(store);
    stub.answer(async (req, call) => {
      if (call === 1) await new Promise((r) => setTimeout(r, 1_000));
      return postAll(req, call);
    });
    await makeReporter({ deadlineMs: 300 })
      .flush()
      .then(
        () => expect.fail("the first pass must fail"),
        () => undefined,
      );
    expect(await reportOf(id)).to.deep.include({ reported_at: null, attempts: 1 });
    expect((await reportOf(id)).last_error).to.match(/^DEADLINE_EXCEEDED/);
    await reporter!.flush();
    expect(await reportOf(id)).to.deep.include({ clearing_status: "POSTED", attempts: 2 });
  });

  it("a QUARANTINED acknowledgement counts as reported and is logged as an error; a duplicate acknowledgement counts as reported", async () => {
    const [bad, again] = [await settledLoad(store), await settledLoad(store)];
    stub.answer(async () => ({
      acknowledgements: [
        ack(bad, { status: LoadStatus.LOAD_STATUS_QUARANTINED, quarantinedBecause: QuarantineReason.QUARANTINE_REASON_BAD_S3, settlementDay: "" }),
        ack(again, { duplicate: true }),
      ],
    }));
    await makeReporter().flush();
    expect(await reportOf(bad)).to.deep.include({ clearing_status: "QUARANTINED", duplicate: 0, settlement_day: null });
    expect((await reportOf(bad)).reported_at).to.be.a("string");
    expect(await reportOf(again)).to.deep.include({ clearing_status: "POSTED", duplicate: 1 });
    const errors = logged.lines.filter((l) => l.level === "error");
    expect(errors.map((e) => [e.fields.transaction, e.fields.reason])).to.deep.equal([[bad, "QUARANTINE_REASON_BAD_S3"]]);
    await reporter!.flush();
    expect(stub.calls).to.have.length(1);
  });

  it("an answer that leaves a load unacknowledged: that load stays queued and goes again, alone", async () => {
    const [a, b] = [await settledLoad(store), await settledLoad(store)];
    stub.answer(async (req, call) => (call === 1 ? { acknowledgements: [ack(a)] } : postAll(req, call)));
    await makeReporter()
      .flush()
      .then(
        () => expect.fail("the pass must report the missing acknowledgement"),
        (e: Error) => expect(e.message).to.contain(b),
      );
    expect(await reportOf(a)).to.deep.include({ clearing_status: "POSTED" });
    expect(await reportOf(b)).to.deep.include({ reported_at: null, last_error: "clearing's answer did not acknowledge this load" });
    await reporter!.flush();
    expect(stub.calls.map((c) => c.ids)).to.deep.equal([[a, b], [b]]);
    expect(await reportOf(b)).to.deep.include({ clearing_status: "POSTED" });
  });

  for (const [code, refuse] of [
    [
      "ALREADY_EXISTS",
      (id: string) => new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED, `load ${id} recorded with other content`),
    ],
    ["INVALID_ARGUMENT", () => invalidField("loads[1].load_command", "must be 36 bytes")],
  ] as const) {
    it(`a request refused ${code} because of one load: sent one by one, the others are recorded, that one is set aside and named in an error`, async () => {
      const ids = [await settledLoad(store), await settledLoad(store), await settledLoad(store)];
      const culprit = ids[1]!;
      stub.answer(async (req, call) => {
        if (idsOf(req).includes(culprit)) throw refuse(culprit);
        return postAll(req, call);
      });
      await makeReporter().flush();
      expect(stub.calls.map((c) => c.ids)).to.deep.equal([ids, [ids[0]], [culprit], [ids[2]]]);
      expect((await store.clearingReports()).map((r) => [r.transaction_id, r.clearing_status])).to.deep.equal([
        [ids[0], "POSTED"],
        [culprit, null],
        [ids[2], "POSTED"],
      ]);
      const setAside = await reportOf(culprit);
      expect(setAside.refused_at).to.be.a("string");
      expect(setAside.last_error).to.match(new RegExp(`^refused by clearing: ${code}`));
      expect(logged.lines.filter((l) => l.level === "error").map((l) => l.fields.transaction)).to.deep.equal([culprit]);
      await reporter!.flush();
      expect(stub.calls).to.have.length(4);
    });
  }

  it("loads settled before the outbox existed are queued by its migration, each with what proves it; loads without a LOAD command are not", async () => {
    const path = join(dir.dir, "old-load.db");
    const old = openSqlite(path, LOAD_MIGRATIONS.slice(0, 2));
    const proofs: [string, string | null][] = [
      ["S3 verified", "S3"],
      ["card history: the credit and its S3 in the card's log", "CARD_HISTORY"],
      ["negative result proven: zero-value S1 (counters equal) matches the card unloaded", "NEGATIVE_RESULT"],
      ["negative result not proven: zero-value S1 (counters equal) does not match the card unloaded, so it is treated as loaded", "NEGATIVE_RESULT_UNPROVEN"],
      ["security module refused: the card is blocked", null],
      ["abandoned before any LOAD command was issued", null],
    ];
    for (const [i, [proof, kind]] of proofs.entries()) {
      await old.run(
        `INSERT INTO loads (transaction_id, bank_id, purse_id, amount_minor, currency, exponent, key_nonce, authorised, initialize_response, load_command,
                            state, outcome, proof, settled_at, created_at)
         VALUES (?, 'b', 'p', 1, 978, 2, x'00', x'00', x'00', ?, 'SETTLED', 'LOADED', ?, ?, ?)`,
        [`load-${i}`, kind ? Buffer.from("c") : null, proof, `2030-01-01T00:00:0${i}Z`, "2030-01-01T00:00:00Z"],
      );
    }
    await old.run(
      "INSERT INTO loads (transaction_id, bank_id, purse_id, amount_minor, currency, exponent, key_nonce, authorised, initialize_response, load_command, state, created_at) VALUES ('pending', 'b', 'p', 1, 978, 2, x'00', x'00', x'00', x'00', 'PENDING', 'x')",
    );
    await old.close();
    const migrated = openSqlite(path, LOAD_MIGRATIONS);
    try {
      const kinds = await migrated.all<{ transaction_id: string; proof_kind: string | null }>(
        "SELECT transaction_id, proof_kind FROM loads ORDER BY transaction_id",
      );
      expect(kinds).to.deep.equal([
        { transaction_id: "load-0", proof_kind: "S3" },
        { transaction_id: "load-1", proof_kind: "CARD_HISTORY" },
        { transaction_id: "load-2", proof_kind: "NEGATIVE_RESULT" },
        { transaction_id: "load-3", proof_kind: "NEGATIVE_RESULT_UNPROVEN" },
        { transaction_id: "load-4", proof_kind: "REFUSED" },
        { transaction_id: "load-5", proof_kind: "ABANDONED" },
        { transaction_id: "pending", proof_kind: null },
      ]);
      const queued = await new LoadStore(migrated).clearingReports();
      expect(queued.map((r) => [r.transaction_id, r.queued_at, r.reported_at])).to.deep.equal([
        ["load-0", "2030-01-01T00:00:00Z", null],
        ["load-1", "2030-01-01T00:00:01Z", null],
        ["load-2", "2030-01-01T00:00:02Z", null],
        ["load-3", "2030-01-01T00:00:03Z", null],
      ]);
    } finally {
      await migrated.close();
    }
  });
});
