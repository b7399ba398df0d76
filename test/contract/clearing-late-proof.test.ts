// A purchase whose card proof arrives late (the client or the merchant
// compares, FIG. 7 and 8) is posted by clearing when it is proven, never
// before: until the proof reaches the PSAM, no batch holds the debit, so no
// merchant is paid for it; once it does, the next batch carries it and the
// merchant is paid once. Real network on loopback: payment server,
// concentrator, terminal host with software PSAMs, merchants, clearing.

import { expect } from "chai";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { merchantId, purseId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { completeRequest, drawRequestFor, openCard, openIssued } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

describe("contract: clearing posts a purchase whose card proof arrives late only once it is proven", function () {
  this.timeout(90_000);
  let net: Network;
  let card: PurseReader;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], cardValue: 10_000 });
    card = await openCard(net.cardPath);
  });
  after(async () => net?.close());

  const offerAt = async (shop: string): Promise<PaymentOffer> => (await net.merchants[shop]!.createOrder({ productId: "song-1" })).offer!;
  const purchase = async (o: PaymentOffer) => (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!;
  const statementIds = async (shop: string) =>
    (await net.clearing.getMerchantStatement({ merchantId: merchantId(shop), day: "", pageSize: 500, pageToken: "" })).lines.map((l) => l.transactionId!.value);

  /** Closes every PSAM's batch and waits until clearing holds each one closed. */
  async function closeAndClear(): Promise<number> {
    const { closed } = await net.clients.concentrator.closeBatches({ terminalId: "", psamId: undefined });
    for (const b of closed) {
      await waitFor(
        async () => !!(await net.clearing.getBatch({ psamId: b.psamId, batchNumber: b.batchNumber, pageSize: 0, pageToken: "" }).catch(() => undefined)),
        15_000,
        `batch ${b.batchNumber} in clearing`,
      );
    }
    return closed.length;
  }

  for (const shop of ["client-shop", "merchant-shop"] as const) {
    it(`${shop}: the DEBIT command issued and the card debited, nothing paid until the card's proof is reported, then paid once`, async () => {
      // A PSAM_VERIFIES purchase first, so that the batch closed below is not empty.
      const first = await offerAt("demo-shop");
      const dr = await net.clients.payment.processDrawRequest(await drawRequestFor(card, first));
      const firstIssued = openIssued(first, dr);
      const firstDebit = await card.debit(Buffer.from(firstIssued.debitCommand));
      await net.clients.payment.completePurchase(completeRequest(first, { sw: firstDebit.sw, raw: firstDebit.raw, token: firstIssued.completionToken }));

      const o = await offerAt(shop);
      const r = await net.clients.payment.processDrawRequest(await drawRequestFor(card, o));
      const debit = await card.debit(Buffer.from(openIssued(o, r).debitCommand));
      expect(debit.parsed!.result).to.equal(0);
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED);

      await closeAndClear();
      expect(await statementIds(shop), "not posted before it is proven").to.not.include(o.transactionId!.value);

      await net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: debit.raw });
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 15_000, "the proof in the PSAM's batch");
      expect(await closeAndClear()).to.be.greaterThan(0);
      expect(
        (await statementIds(shop)).filter((id) => id === o.transactionId!.value),
        "posted once it is proven, once",
      ).to.have.length(1);

      // Closing again changes nothing: the proven purchase is paid once.
      await closeAndClear();
      expect((await statementIds(shop)).filter((id) => id === o.transactionId!.value)).to.have.length(1);
    });
  }

  it("the audit agrees with the card once every proof is in", async () => {
    await closeAndClear();
    const purse = await card.readPurse();
    const audit = await net.clearing.runAudit({
      cards: [{ purseId: purseId(purse.purseId.toString("hex")), balance: money(purse.balance, 978, 2), openingValue: money(10_000, 978, 2) }],
    });
    expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
  });
});
