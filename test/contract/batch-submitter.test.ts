// The batch submitter's handling of each answer clearing can give, against a
// stand-in clearing service on loopback: an accepted batch leaves the outbox,
// a rejected one is set aside and never sent again, a PSAM clearing refuses
// the host for waits while the other PSAMs' batches go, an unreachable
// clearing is tried again, and a batch the host cannot send whole is never
// sent.

import { expect } from "chai";
import { join } from "node:path";
import { ServerError, Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { BatchStatus, QuarantineReason, type SubmitBatchRequest, type SubmitBatchResponse } from "../../gen/netpurse/clearing/v1/clearing.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { hexOf } from "../../lib/ids.js";
import { createLogger } from "../../lib/log.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import type { PsamBatchRecord } from "../../lib/protocol/psam.js";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { BatchSubmitter } from "../../services/terminal/batch-submitter.js";
import { TERMINAL_MIGRATIONS, TerminalStore } from "../../services/terminal/store.js";
import { fakeClearing, trailerOf } from "../support/batches.js";
import { EUR, tempDir } from "../support/fixtures.js";
import { testSecurity, waitFor } from "../support/network.js";

/** A record as a PSAM would give it (the stand-in checks no MAC). */
function record(psamCounter: number, amount: number): PsamBatchRecord {
  return {
    psamCounter,
    purseId: Buffer.from("0102030405060708", "hex"),
    keyVersion: 1,
    sessionCounter: psamCounter - 1,
    challenge: Buffer.alloc(8, psamCounter),
    cardCounter: psamCounter,
    balanceAfter: 10_000 - amount,
    amount,
    currency: EUR,
    dateTime: 1_800_000_000,
    transactionRef: `00000000-0000-4000-8000-${String(psamCounter).padStart(12, "0")}`,
    merchantId: "demo-shop",
    cardSignature: Buffer.alloc(8, 0xcc),
    recordMac: Buffer.alloc(8, 0xdd),
  };
}

describe("batch submitter: what it does with each answer of clearing", function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => Promise<void>;
  let db: Db;
  let store: TerminalStore;
  let security: Awaited<ReturnType<typeof testSecurity>>;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-submitter-"));
    await CertificateAuthority.init(pkiDirOf(dir));
    security = await testSecurity(dir);
    db = openSqlite(join(dir, "terminal.db"), TERMINAL_MIGRATIONS);
    store = new TerminalStore(db);
  });
  afterEach(async () => {
    await db.close();
    await cleanup();
  });

  /** Puts a closed batch of `amounts` (PSAM counters from `firstCounter`) in the outbox; `lose` records are missing from the store. */
  async function closed(psam: string, batchNumber: number, amounts: number[], o: { firstCounter?: number; lose?: number } = {}) {
    const records = amounts.map((a, i) => record((o.firstCounter ?? 1) + i, a));
    await store.recordTransactions(psam, batchNumber, records.slice(o.lose ?? 0), "test");
    const total = amounts.reduce((t, a) => t + a, 0);
    await store.recordBatch({ psamId: Buffer.from(psam, "hex"), batchNumber, count: amounts.length, total, currency: EUR, batchMac: Buffer.alloc(8, 0xee) });
  }

  const accepted = (psam: string, batchNumber: number, n: number, missing: number[] = []): SubmitBatchResponse => ({
    psamId: { value: Buffer.from(psam, "hex") },
    batchNumber,
    status: BatchStatus.BATCH_STATUS_ACCEPTED,
    rejectedBecause: QuarantineReason.QUARANTINE_REASON_UNSPECIFIED,
    posted: n,
    quarantined: 0,
    duplicate: false,
    missingBatchNumbers: missing,
    settlementDay: "2026-11-29",
  });

  async function submitter(address: string) {
    const s = new BatchSubmitter({
      clearingAddress: address,
      security: await security.of("terminal", "terminal-1"),
      store,
      log: createLogger("submitter under test"),
      retryMinMs: 50,
      retryMaxMs: 200,
      refusedRetryMs: 60_000,
    });
    s.start();
    return s;
  }

  const sent = (received: SubmitBatchRequest[][]) => received.map((b) => `${hexOf(trailerOf(b)?.psamId?.value)}/${trailerOf(b)?.batchNumber}`);

  it("sends each batch whole, oldest first, and keeps of an accepted one only its acknowledgement and its debits' transaction ids", async () => {
    await closed("0000000b", 1, [100, 200]);
    await closed("0000000b", 2, [300], { firstCounter: 3 });
    const fake = await fakeClearing(await security.of("clearing", "clearing-1"), async (batch) => {
      const t = trailerOf(batch)!;
      return accepted(hexOf(t.psamId?.value), t.batchNumber, batch.length - 1);
    });
    const s = await submitter(fake.address);
    try {
      await waitFor(async () => (await store.outbox()).length === 0, 10_000, "the outbox to empty");
      expect(sent(fake.received)).to.deep.equal(["0000000b/1", "0000000b/2"]);
      const first = fake.received[0]!;
      expect(first.map((m) => m.item?.$case)).to.deep.equal(["record", "record", "trailer"]);
      const r = first[0]!.item?.$case === "record" ? first[0]!.item.value : undefined;
      expect(r).to.include({ psamCounter: 1, keyVersion: 1, sessionCounter: 0, cardCounter: 1, balanceAfter: 9_900n });
      expect(r?.amount).to.deep.equal({ amountMinor: 100n, currency: EUR, exponent: 0 });
      expect(trailerOf(first)).to.include({ batchNumber: 1, count: 2 });
      expect(trailerOf(first)?.total?.amountMinor).to.equal(300n);
      expect((await store.batches()).map((b) => [b.batch_number, b.state, b.posted])).to.deep.equal([
        [1, "accepted", 2],
        [2, "accepted", 1],
      ]);
      expect(await store.transactions()).to.deep.equal([]);
      expect(await store.settledTransaction("0000000b", 3)).to.equal(record(3, 0).transactionRef);
    } finally {
      await s.close();
      await fake.close();
    }
  });

  it("sets aside a batch clearing rejects or holds with other content, and one it cannot send whole, and never sends them again", async () => {
    await closed("0000000c", 1, [100]);
    await closed("0000000d", 1, [100]);
    await closed("0000000e", 1, [100, 200], { lose: 1 });
    await closed("0000000f", 1, [100]);
    const fake = await fakeClearing(await security.of("clearing", "clearing-1"), async (batch) => {
      const t = trailerOf(batch)!;
      const psam = hexOf(t.psamId?.value);
      if (psam === "0000000c")
        return { ...accepted(psam, 1, 0), status: BatchStatus.BATCH_STATUS_REJECTED, rejectedBecause: QuarantineReason.QUARANTINE_REASON_BAD_BATCH_MAC };
      if (psam === "0000000d")
        throw new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_BATCH_NUMBER_REUSED, "clearing holds batch 1 with other content");
      return accepted(psam, 1, 1);
    });
    const s = await submitter(fake.address);
    try {
      await waitFor(async () => (await store.outbox()).length === 0, 10_000, "the outbox to empty");
      s.wake();
      await new Promise((r) => setTimeout(r, 300));
      expect(sent(fake.received).sort()).to.deep.equal(["0000000c/1", "0000000d/1", "0000000f/1"]); // once each; never e
      const states = Object.fromEntries((await store.batches()).map((b) => [b.psam_id, [b.state, b.last_error]]));
      expect(states["0000000c"]).to.deep.equal(["rejected", "rejected by clearing: QUARANTINE_REASON_BAD_BATCH_MAC"]);
      expect(states["0000000d"]![0]).to.equal("rejected");
      expect(states["0000000d"]![1]).to.match(/^ALREADY_EXISTS/);
      expect(states["0000000e"]![0]).to.equal("incomplete");
      expect(states["0000000e"]![1]).to.contain("holds 1 records totalling 200 of batch 1, whose trailer says 2 totalling 300");
      expect(states["0000000f"]![0]).to.equal("accepted");
      // A set-aside batch keeps its records, for the operator.
      expect((await store.transactions()).map((t) => t.psam_id).sort()).to.deep.equal(["0000000c", "0000000d", "0000000e"]);
    } finally {
      await s.close();
      await fake.close();
    }
  });

  it("holds back only the PSAM clearing refuses the host for, and tries an unreachable clearing again", async () => {
    await closed("000000a1", 1, [100]);
    await closed("000000a2", 1, [100]);
    let unavailable = 2;
    const fake = await fakeClearing(await security.of("clearing", "clearing-1"), async (batch) => {
      const t = trailerOf(batch)!;
      const psam = hexOf(t.psamId?.value);
      if (psam === "000000a1")
        throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_NOT_ALLOWED, "PSAM 000000a1 was provisioned for terminal-2");
      if (unavailable-- > 0) throw new ServerError(Status.UNAVAILABLE, "clearing is starting");
      return accepted(psam, 1, 1);
    });
    const s = await submitter(fake.address);
    try {
      await waitFor(async () => (await store.batch("000000a2", 1))?.state === "accepted", 10_000, "the other PSAM's batch to go");
      expect((await store.batch("000000a2", 1))!.attempts).to.equal(3); // two UNAVAILABLE, then accepted
      s.wake();
      await new Promise((r) => setTimeout(r, 300));
      const refused = (await store.batch("000000a1", 1))!;
      expect(refused).to.include({ state: "pending", attempts: 1 }); // not tried again before the refused-retry time
      expect(refused.last_error).to.match(/^PERMISSION_DENIED: PSAM 000000a1 was provisioned for terminal-2/);
      expect(sent(fake.received).filter((x) => x === "000000a1/1")).to.have.length(1);
    } finally {
      await s.close();
      await fake.close();
    }
  });

  it("stays on a batch it has not reached clearing with across a restart", async () => {
    await closed("000000b1", 1, [100]);
    const down = await submitter("127.0.0.1:1"); // nothing listens there
    await waitFor(async () => (await store.batch("000000b1", 1))!.attempts >= 1, 10_000, "an attempt");
    await down.close();
    expect((await store.batch("000000b1", 1))!.state).to.equal("pending");
    const fake = await fakeClearing(await security.of("clearing", "clearing-1"), async () => accepted("000000b1", 1, 1));
    const s = await submitter(fake.address);
    try {
      await waitFor(async () => (await store.batch("000000b1", 1))!.state === "accepted", 10_000, "the batch acknowledged after the restart");
      expect(fake.received).to.have.length(1);
    } finally {
      await s.close();
      await fake.close();
    }
  });
});
