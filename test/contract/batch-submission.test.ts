// Terminal hosts send their PSAMs' closed batches to clearing on their own:
// a batch closes on a count, an age or an operator's command, waits in the
// host's outbox until clearing acknowledges it, and is counted once however
// often it is sent. Submission never holds up a purchase.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { ClientError, Status } from "nice-grpc";
import { BatchStatus, type ClearingServiceClient } from "../../gen/netpurse/clearing/v1/clearing.js";
import { BatchNotClosedReason, TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { fieldOf, reasonOf } from "../../lib/grpc/errors.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { hexOf, psamId as toPsamId } from "../../lib/ids.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import { startClearing } from "../../services/clearing/server.js";
import { openSqlite } from "../../lib/store/db.js";
import { TERMINAL_MIGRATIONS } from "../../services/terminal/store.js";
import { issueCard, psamFileOf, recordDebits, restartHost, stalledClearing, stopHost } from "../support/batches.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

const ROOT = new URL("../..", import.meta.url).pathname;
const run = promisify(execFile);
const TERMINAL = "terminal-1";
/** Quick retries, so that a test sees a batch go as soon as clearing is back. */
const FAST = { retryMinMs: 100, retryMaxMs: 500 };

describe("terminal host: closed batches reach clearing on their own", function () {
  this.timeout(120_000);
  let net: Network;
  let replacement: Awaited<ReturnType<typeof startClearing>> | undefined;
  let psamHex: string;
  let clearing: ClearingServiceClient;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: TERMINAL, psams: 1 }] });
    psamHex = hexOf((await net.clients.concentrator.listTerminals({})).terminals[0]!.slots[0]!.psamId?.value);
    clearing = net.clearing;
  });
  after(async () => {
    await replacement?.close();
    await net?.close();
  });

  const host = () => net.hosts.get(TERMINAL)!.host;
  const clearingAddress = () => replacement?.address ?? net.clearingServer.address;

  /** Buys song-1 (99 cents) at the demo shop, where the PSAM verifies the card's answer: each purchase is a record in the PSAM's batch. */
  async function buy(n: number): Promise<{ ids: string[]; ms: number[] }> {
    const ids: string[] = [];
    const ms: number[] = [];
    for (let i = 0; i < n; i++) {
      const started = Date.now();
      const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
      const r = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 20_000 });
      expect(r.receipt?.goods).to.match(/^licence key/);
      ids.push(offer!.transactionId!.value);
      ms.push(Date.now() - started);
    }
    return { ids, ms };
  }

  const batchAtClearing = async (batchNumber: number) =>
    (await clearing.getBatch({ psamId: toPsamId(psamHex), batchNumber, pageSize: 0, pageToken: "" })).batch!;

  const outboxEmpty = async () => (await host().data.outbox()).length === 0;

  it("sends a batch closed by its count, which clearing accepts once; the host then keeps only its acknowledgement", async () => {
    await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), batchCloseAt: 2, submitter: FAST });
    const { ids } = await buy(2);
    await waitFor(async () => (await host().data.batches()).some((b) => b.batch_number === 1 && b.state === "accepted"), 15_000, "batch 1 acknowledged");
    expect(await outboxEmpty()).to.equal(true);
    const [stored] = await host().data.batches();
    expect(stored).to.include({ psam_id: psamHex, batch_number: 1, record_count: 2, total_minor: 198, state: "accepted", posted: 2, quarantined: 0 });
    // The records left the outbox; each PSAM counter still names its transaction (the ownership checks need it).
    expect((await host().data.transactions()).filter((t) => t.batch_number === 1)).to.have.length(0);
    expect([await host().data.settledTransaction(psamHex, 1), await host().data.settledTransaction(psamHex, 2)]).to.deep.equal(ids);

    const batch = await batchAtClearing(1);
    expect(batch).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 2, posted: 2, quarantined: 0, terminalId: TERMINAL, resubmissions: 0 });
    expect(batch.total?.amountMinor).to.equal(198n);
    const { settlement } = await clearing.getSettlement({ day: "" });
    expect(settlement?.purchases).to.equal(2);
  });

  it("keeps batches closed while clearing is down and sends them once it is back, each counted once", async () => {
    const address = clearingAddress();
    await net.clearingServer.close();
    await buy(2); // purchases go on without clearing
    await waitFor(async () => (await host().data.outbox()).some((b) => b.batch_number === 2 && b.attempts >= 1), 10_000, "an attempt to send batch 2");
    const [waiting] = await host().data.outbox();
    expect(waiting).to.include({ batch_number: 2, record_count: 2, state: "pending" });
    expect(waiting!.last_error).to.match(/^UNAVAILABLE/);

    replacement = await startClearing({
      security: await net.security.of("clearing", CLEARING_ID),
      listen: address,
      dir: net.paths.clearing,
      ...net.storeOption,
      psamRegistry: psamRegistryPath(net.data),
    });
    await waitFor(outboxEmpty, 15_000, "batch 2 acknowledged once clearing is back");
    expect(await batchAtClearing(2)).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 2, posted: 2, resubmissions: 0 });
    const { settlement } = await clearing.getSettlement({ day: "" });
    expect(settlement?.purchases).to.equal(4);
  });

  it("lets purchases go on while a batch's submission waits for a clearing service that does not answer", async () => {
    const stalled = await stalledClearing(await net.security.of("clearing", "clearing-stalled"));
    try {
      await restartHost(net, TERMINAL, { clearingAddress: stalled.address, batchCloseAt: 1, submitter: { ...FAST, deadlineMs: 60_000 } });
      await buy(1); // batch 3 closes, and its submission hangs
      await waitFor(() => stalled.received.length === 1 && stalled.received[0]!.at(-1)?.item?.$case === "trailer", 10_000, "batch 3 sent");
      const { ms } = await buy(2); // batches 4 and 5 close meanwhile
      for (const t of ms) expect(t).to.be.below(5_000);
      await waitFor(async () => (await host().data.outbox()).length === 3, 5_000, "three batches in the outbox");
      expect((await host().data.outbox()).map((b) => b.batch_number)).to.deep.equal([3, 4, 5]);
      expect(stalled.received).to.have.length(1); // still in flight: one at a time, oldest first
      expect(host().lastCloseHeldMs).to.be.below(1_000);
    } finally {
      await stalled.close();
    }
    // Pointed at the real clearing service, the host sends all three, oldest first.
    await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), submitter: FAST });
    await waitFor(outboxEmpty, 15_000, "batches 3 to 5 acknowledged");
    for (const n of [3, 4, 5]) expect(await batchAtClearing(n)).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 1, posted: 1 });
  });

  it("closes a batch whose first record is older than --batch-close-after-ms", async () => {
    await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), batchCloseAfterMs: 300, submitter: FAST });
    await buy(1);
    await waitFor(async () => (await host().data.batches()).some((b) => b.batch_number === 6 && b.state === "accepted"), 10_000, "batch 6 closed by age");
    expect(await batchAtClearing(6)).to.include({ count: 1, posted: 1 });
  });

  it("closes batches on an operator's CloseBatches, leaves an empty one open, and the CLI prints them", async () => {
    await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), submitter: FAST });
    await buy(2);
    const r = await net.clients.concentrator.closeBatches({ terminalId: "", psamId: undefined });
    expect(r.closed).to.have.length(1);
    const [closed] = r.closed;
    expect(closed).to.include({ terminalId: TERMINAL, batchNumber: 7, count: 2 });
    expect(hexOf(closed!.psamId?.value)).to.equal(psamHex);
    expect(closed!.total).to.deep.equal({ amountMinor: 198n, currency: 978, exponent: 0 });
    expect(r.notClosed).to.deep.equal([]);
    await waitFor(outboxEmpty, 10_000, "batch 7 acknowledged");
    expect(await batchAtClearing(7)).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 2, posted: 2 });

    // Nothing recorded since: nothing closed, no batch number used.
    const again = await net.clients.concentrator.closeBatches({ terminalId: TERMINAL, psamId: toPsamId(psamHex) });
    expect(again.closed).to.deep.equal([]);
    expect(again.notClosed).to.have.length(1);
    expect(again.notClosed[0]).to.include({ terminalId: TERMINAL, reason: BatchNotClosedReason.BATCH_NOT_CLOSED_REASON_EMPTY });

    await buy(1);
    const cli = await run(
      join(ROOT, "bin/netpurse-operator"),
      ["close-batch", "--psam", psamHex, "--concentrator", net.concentrator.address, "--data", net.data],
      { env: { ...process.env, NETPURSE_DATA: net.data } },
    );
    expect(cli.stdout.split("\n").map((l) => l.trim().split(/\s{2,}/))).to.deep.include([TERMINAL, psamHex, "8", "1", "EUR 99"]);
    await waitFor(outboxEmpty, 10_000, "batch 8 acknowledged");
    expect(await batchAtClearing(8)).to.include({ count: 1, posted: 1 });
    const empty = await run(join(ROOT, "bin/netpurse-operator"), ["close-batch", "--concentrator", net.concentrator.address, "--data", net.data]);
    expect(empty.stdout).to.contain("no batch closed");
    expect(empty.stdout).to.contain(`not closed: terminal-1 PSAM ${psamHex}: empty`);
  });

  it("refuses CloseBatches from anyone but an operator, and names what is wrong in a request", async () => {
    const refusal = async (p: Promise<unknown>) => {
      try {
        await p;
      } catch (e) {
        if (e instanceof ClientError) return { code: e.code, reason: reasonOf(e), field: fieldOf(e) };
        throw e;
      }
      throw new Error("the call succeeded; a refusal was expected");
    };
    for (const [kind, id] of [
      ["payment", "payment-1"],
      ["terminal", TERMINAL],
    ] as const) {
      const channel = openChannel(net.concentrator.address, (await net.security.of(kind, id)).channel({ kind: "concentrator" }));
      try {
        const asPeer = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
        expect(await refusal(asPeer.closeBatches({ terminalId: "", psamId: undefined }))).to.include({
          code: Status.PERMISSION_DENIED,
          reason: ErrorReason.ERROR_REASON_NOT_ALLOWED,
        });
      } finally {
        channel.close();
      }
    }
    const c = net.clients.concentrator;
    expect(await refusal(c.closeBatches({ terminalId: "", psamId: { value: Buffer.from("0102", "hex") } }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "psam_id",
    });
    expect(await refusal(c.closeBatches({ terminalId: "no such terminal!", psamId: undefined }))).to.include({
      code: Status.INVALID_ARGUMENT,
      field: "terminal_id",
    });
    expect(await refusal(c.closeBatches({ terminalId: "terminal-9", psamId: undefined }))).to.include({
      code: Status.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_NOT_FOUND,
    });
    expect(await refusal(c.closeBatches({ terminalId: "", psamId: toPsamId("ffffffff") }))).to.include({
      code: Status.NOT_FOUND,
      reason: ErrorReason.ERROR_REASON_NOT_FOUND,
    });
  });

  it("holds the PSAM's slot for milliseconds to close a batch of 200 records", async () => {
    // 200 genuine debits recorded straight into the PSAM while its host is stopped; the host stores them as it starts.
    await stopHost(net, TERMINAL);
    const card = await issueCard(net.data, "bulk");
    const debits = await recordDebits({
      psamFile: psamFileOf(net.data, TERMINAL),
      cardPath: card,
      merchantId: "demo-shop",
      amounts: Array.from({ length: 200 }, () => 10),
    });
    const h = await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), submitter: FAST });
    const r = await net.clients.concentrator.closeBatches({ terminalId: TERMINAL, psamId: undefined });
    expect(r.closed[0]).to.include({ batchNumber: 9, count: 200 });
    const heldMs = h.host.lastCloseHeldMs;
    console.log(`      slot held ${heldMs.toFixed(1)} ms to close a batch of 200 records`);
    expect(heldMs).to.be.below(250);
    await waitFor(outboxEmpty, 15_000, "batch 9 acknowledged");
    expect(await batchAtClearing(9)).to.include({ count: 200, posted: 200, quarantined: 0 });
    expect(debits).to.have.length(200);

    // When the host's store lacks records of the batch (a write that failed), the close reads the whole batch from the PSAM first.
    await stopHost(net, TERMINAL);
    await recordDebits({ psamFile: psamFileOf(net.data, TERMINAL), cardPath: card, merchantId: "demo-shop", amounts: Array.from({ length: 200 }, () => 10) });
    const again = await restartHost(net, TERMINAL, { clearingAddress: clearingAddress(), submitter: FAST });
    const db = openSqlite(join(net.paths.terminal(TERMINAL), "terminal.db"), TERMINAL_MIGRATIONS);
    expect((await db.run("DELETE FROM psam_transactions WHERE psam_id = ? AND batch_number = 10 AND psam_counter % 2 = 0", [psamHex])).changes).to.equal(100);
    await db.close();
    const r10 = await net.clients.concentrator.closeBatches({ terminalId: TERMINAL, psamId: undefined });
    expect(r10.closed[0]).to.include({ batchNumber: 10, count: 200 });
    const rereadMs = again.host.lastCloseHeldMs;
    console.log(`      slot held ${rereadMs.toFixed(1)} ms to close a batch of 200 records, reading all 200 from the PSAM again`);
    expect(rereadMs).to.be.below(2_000);
    await waitFor(outboxEmpty, 15_000, "batch 10 acknowledged");
    expect(await batchAtClearing(10)).to.include({ count: 200, posted: 200, quarantined: 0 });
  });
});
