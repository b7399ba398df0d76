// End to end, with failures: terminal hosts and the payment server killed
// mid-transaction as separate processes. Nothing may be lost or guessed.

import { slowIt } from "../support/fixtures.js";
import { expect } from "chai";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import { hexOf } from "../../lib/ids.js";
import { withOriginalAmount } from "../../client/card/purse-reader.js";
import { completeRequest, drawRequestFor, failure, openCard, openIssued } from "../support/card-client.js";
import { waitFor } from "../support/network.js";
import { launchE2E, type E2E } from "../support/processes.js";

describe("end to end: a terminal host drops mid-transaction", function () {
  this.timeout(180_000);
  let net: E2E;
  afterEach(async () => net?.close());

  const psamState = async (n: E2E) => {
    const r = await n.clients.concentrator.listTerminals({});
    return r.terminals.flatMap((t) =>
      t.slots.map((s) => ({ terminal: t.terminalId, psam: hexOf(s.psamId?.value), pending: s.pendingDebits.length, batch: s.batchCount })),
    );
  };

  slowIt("[slow] work without a debit command goes to another PSAM; the lost PSAM's open debit is reversed when it returns", async () => {
    net = await launchE2E({
      terminals: [
        { id: "t-dying", psams: 1, args: ["--answer-delay-ms", "60000"] },
        { id: "t-spare", psams: 1, start: false },
      ],
    });
    const card = await openCard(net.cardPath);
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    const inFlight = net.clients.payment.processDrawRequest(await drawRequestFor(card, offer!), { deadline: 30_000 }).then((r) => openIssued(offer!, r));
    await new Promise((r) => setTimeout(r, 1_500)); // the dying terminal's PSAM has signed, its answer is held back
    await net.launcher.kill("t-dying");
    await net.startTerminal("t-spare");
    const issued = await inFlight;
    expect(issued.terminalId).to.equal("t-spare");
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 99));
    await net.clients.payment.completePurchase(completeRequest(offer!, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));

    // The dying terminal's PSAM signed a DEBIT command nobody received: open until it returns, then reversed.
    await net.startTerminal("t-dying");
    await net.attached(["t-dying", "t-spare"]);
    await waitFor(async () => (await psamState(net)).every((s) => s.pending === 0), 20_000, "the orphan debit to be reversed");
    const rec = (await net.clients.payment.getPurchase({ transactionId: offer!.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec.events.map((e) => e.step)).to.include.members(["psam_unavailable", "orphan_debit_reversed", "purchase_confirmed"]);
    const batches = await psamState(net);
    expect(batches.find((s) => s.terminal === "t-spare")!.batch).to.equal(1);
    expect(batches.find((s) => s.terminal === "t-dying")!.batch).to.equal(0);
    expect((await card.readPurse()).balance).to.equal(10_000 - 99);
  });

  slowIt("[slow] work with a debit command is in doubt while its PSAM is away, and settled — not guessed — when it returns", async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }] });
    const card = await openCard(net.cardPath);
    const { offer } = await net.clients.merchant.createOrder({ productId: "ebook-smart-cards" });
    const issued = openIssued(offer!, await net.clients.payment.processDrawRequest(await drawRequestFor(card, offer!)));
    const debit = await card.debit(Buffer.from(issued.debitCommand)); // the card is debited
    await net.launcher.kill("terminal-1");
    await waitFor(async () => (await net.clients.concentrator.listTerminals({})).terminals.length === 0, 10_000, "the terminal to detach");

    const req = completeRequest(offer!, { sw: debit.sw, raw: debit.raw, token: issued.completionToken });
    const f = await failure(net.clients.payment.completePurchase(req));
    expect(f).to.include({ code: "UNAVAILABLE", reason: "IN_DOUBT" });
    expect((await net.clients.payment.getPurchase({ transactionId: offer!.transactionId })).purchase!.state).to.equal(PurchaseState.PURCHASE_STATE_IN_DOUBT);
    // No confirmation exists yet, so the merchant has released nothing.
    expect((await net.clients.merchant.getOrder({ transactionId: offer!.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);

    await net.startTerminal("terminal-1");
    await waitFor(
      async () => (await net.clients.payment.getPurchase({ transactionId: offer!.transactionId })).purchase!.state === PurchaseState.PURCHASE_STATE_COMPLETED,
      20_000,
      "the in-doubt purchase to settle",
    );
    const done = await net.clients.payment.completePurchase(req);
    const receipt = await net.clients.merchant.completeOrder({ transactionId: offer!.transactionId, debitResultM: done.debitResultM });
    expect(receipt.receipt!.goods).to.match(/^licence key/);
    expect((await card.readPurse()).balance).to.equal(10_000 - 250);
    const s = (await psamState(net))[0]!;
    expect(s.batch).to.equal(1);
    expect(s.pending).to.equal(0);
  });

  slowIt("[slow] a payment server killed after the DEBIT command resumes from its log", async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }] });
    const card = await openCard(net.cardPath);
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    const dr = await drawRequestFor(card, offer!);
    const issued = openIssued(offer!, await net.clients.payment.processDrawRequest(dr));
    await net.launcher.kill("payment");
    await net.restartPayment();
    await net.attached(["terminal-1"]);
    // The retried draw request gets the command it got before (from the log), not a second one.
    const again = openIssued(offer!, await net.clients.payment.processDrawRequest(dr, { deadline: 10_000 }));
    expect(Buffer.from(again.debitCommand).equals(Buffer.from(issued.debitCommand))).to.equal(true);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await net.clients.payment.completePurchase(completeRequest(offer!, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }), { deadline: 15_000 });
    expect((await card.readPurse()).balance).to.equal(10_000 - 99);
    const s = (await psamState(net))[0]!;
    expect(s).to.include({ batch: 1, pending: 0 });
  });
});
