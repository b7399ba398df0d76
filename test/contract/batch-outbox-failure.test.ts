// A PSAM gives back only its last closed batch's trailer (CLOSE BATCH with
// P1 = 01). If the terminal host's store fails to take a closed batch, that
// batch must be in the outbox before the PSAM closes another, or its MAC is
// gone and its purchases are never paid. Real network on loopback.

import { expect } from "chai";
import { BatchStatus } from "../../gen/netpurse/clearing/v1/clearing.js";
import { hexOf, psamId as toPsamId } from "../../lib/ids.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

describe("terminal host: a closed batch its store failed to take is put in the outbox before the next close", function () {
  this.timeout(60_000);
  let net: Network;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }] });
  });
  after(async () => net?.close());

  async function buy(): Promise<void> {
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 20_000 });
  }

  it("sends both batches, each counted once", async () => {
    const host = net.hosts.get("terminal-1")!.host;
    const store = host.data;
    const psamHex = hexOf((await net.clients.concentrator.listTerminals({})).terminals[0]!.slots[0]!.psamId?.value);
    const recordBatch = store.recordBatch.bind(store);
    let failures = 0;
    store.recordBatch = async (...args: Parameters<typeof recordBatch>) => {
      if (failures++ === 0) throw new Error("disk full (test)");
      return recordBatch(...args);
    };

    await buy();
    const first = await net.clients.concentrator.closeBatches({ terminalId: "", psamId: undefined });
    expect(first.closed.map((c) => c.batchNumber)).to.deep.equal([1]);
    await new Promise((r) => setTimeout(r, 300));
    expect(await store.outbox(), "batch 1's store write failed").to.deep.equal([]);

    await buy();
    const second = await net.clients.concentrator.closeBatches({ terminalId: "", psamId: undefined });
    expect(second.closed.map((c) => c.batchNumber)).to.deep.equal([2]);
    await waitFor(async () => (await store.outbox()).length === 0 && failures >= 3, 15_000, "both batches acknowledged");
    for (const n of [1, 2]) {
      const { batch } = await net.clearing.getBatch({ psamId: toPsamId(psamHex), batchNumber: n, pageSize: 0, pageToken: "" });
      expect(batch, `batch ${n}`).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 1, posted: 1 });
    }
    expect((await net.clearing.getSettlement({ day: "" })).settlement!.purchases).to.equal(2);
  });
});
