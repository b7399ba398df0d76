// The payment server ends a draw request that never got its DEBIT command:
// a RECEIVED row left longer than --abandon-received-after-ms is REFUSED
// (reason DRAW_REQUEST_ABANDONED), and every later call about it gets that
// answer; nothing is debited, and no PSAM signs for it afterwards.

import { expect } from "chai";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { completeRequest, drawRequestFor, failure, openCard } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";
import { psamTotals } from "../support/payment.js";

describe("contract: PaymentService ends draw requests left without a DEBIT command", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], maxPsamWaitMs: 1_500, abandonReceivedAfterMs: 2_500, sweepEveryMs: 200 });
  });
  after(async () => net?.close());

  it("ends a RECEIVED purchase after the bound; its retry, CompletePurchase and ReportCardSignature get the ending, and no PSAM signs for it", async () => {
    await net.hosts.get("terminal-1")?.close();
    await waitFor(() => net.payment.pool.counts().total === 0, 10_000, "the terminal's PSAM to leave the pool");
    const card = await openCard(net.cardPath);
    const before = (await card.readPurse()).balance;
    const { offer: o } = await net.clients.merchant.createOrder({ productId: "song-1" });
    if (!o) throw new Error("the merchant made no offer");
    const req = await drawRequestFor(card, o);
    expect(await failure(net.clients.payment.processDrawRequest(req, { deadline: 5_000 }))).to.include({
      code: "FAILED_PRECONDITION",
      reason: "NO_PSAM_ATTACHED",
    });
    const record = async () => defined((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase, "the purchase's record");
    expect((await record()).state).to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);

    await waitFor(async () => (await record()).state === PurchaseState.PURCHASE_STATE_REFUSED, 10_000, "the RECEIVED purchase to be ended");
    const ended = (await record()).events.find((e) => e.step === "draw_request_abandoned");
    expect(ended?.detail).to.contain("left unfinished for more than 2500 ms").and.contain("no card was debited");

    // The PSAM is back: the same draw request gets the ending, not a DEBIT command signed now.
    await net.startHost({ id: "terminal-1" });
    await waitFor(() => net.payment.pool.counts().free === 1, 10_000, "the terminal's PSAM back in the pool");
    const psams = await psamTotals(net)();
    const retried = await failure(net.clients.payment.processDrawRequest(req, { deadline: 5_000 }));
    expect(retried).to.include({ code: "FAILED_PRECONDITION", reason: "DRAW_REQUEST_ABANDONED" });
    expect(retried.details).to.contain("nothing was debited").and.contain("pay with a new offer");
    expect(await psamTotals(net)(), "no PSAM signed a DEBIT command for it").to.deep.equal(psams);
    // No client ever got a completion token for it; a made-up answer is refused before anything else.
    const complete = await failure(net.clients.payment.completePurchase(completeRequest(o, { sw: 0x9000, raw: Buffer.alloc(17), token: Buffer.alloc(16) })));
    expect(complete).to.include({ code: "PERMISSION_DENIED", reason: "WRONG_COMPLETION_TOKEN" });
    const report = await failure(net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: Buffer.alloc(17) }));
    expect(report).to.include({ code: "FAILED_PRECONDITION", reason: "WRONG_STATE" });
    expect(report.details).to.contain("REFUSED");
    expect((await record()).state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
    expect((await card.readPurse()).balance).to.equal(before);
  });
});
