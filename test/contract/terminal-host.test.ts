// The terminal host and the payment server keep their streams to the
// concentrator: when it restarts they reconnect with back-off, re-announce
// themselves, and purchases go on.

import { expect } from "chai";
import { startConcentrator } from "../../services/concentrator/server.js";
import { psamRegistryPath } from "../../services/network/pki.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

describe("terminal host and payment server: reconnecting to the concentrator", function () {
  this.timeout(60_000);
  let net: Network;
  let replacement: Awaited<ReturnType<typeof startConcentrator>> | undefined;
  before(async () => (net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }] })));
  after(async () => {
    await replacement?.close();
    await net?.close();
  });

  it("re-announces the PSAM slots and serves purchases again after a concentrator restart", async () => {
    const address = net.concentrator.address;
    await net.concentrator.close();
    await waitFor(() => net.payment.pool.counts().total === 0, 5_000, "the payment server to forget the pool it lost");
    replacement = await startConcentrator({
      security: await net.security.of("concentrator", "concentrator-1"),
      psamRegistry: psamRegistryPath(net.data),
      listen: address,
      keepaliveIntervalMs: 1_000,
    });
    await waitFor(
      async () => {
        const r = await net.clients.concentrator.listTerminals({});
        return r.terminals.length === 1 && r.terminals[0]!.slots.length === 2 && r.paymentServers.length === 1;
      },
      20_000,
      "terminal host and payment server to reconnect",
    );
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    const r = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 20_000 });
    expect(r.receipt!.goods).to.match(/^licence key/);
  });
});
