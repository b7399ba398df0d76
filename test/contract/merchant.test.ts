// Contract of netpurse.merchant.v1.MerchantService: the real merchant server
// with its real validation service, paid through the real payment network.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import { withOriginalAmount } from "../../client/card/purse-reader.js";
import { completeRequest, drawRequestFor, failure, flipBit, openCard, openIssued } from "../support/card-client.js";
import { startNetwork, type Network } from "../support/network.js";

describe("contract: netpurse.merchant.v1.MerchantService", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

  /** Pays an order at the payment server and returns its debit result M, without delivering it. */
  async function paidOrder(product = "ebook-smart-cards") {
    const { offer } = await net.clients.merchant.createOrder({ productId: product });
    const card = await openCard(net.cardPath);
    const issued = openIssued(offer!, await net.clients.payment.processDrawRequest(await drawRequestFor(card, offer!)));
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), Number(offer!.amount!.amountMinor)));
    const done = await net.clients.payment.completePurchase(completeRequest(offer!, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    return { offer: offer!, resultM: done.debitResultM!, psamCounter: issued.psamCounter };
  }

  it("lists its products with prices", async () => {
    const r = await net.clients.merchant.listProducts({});
    expect(r.merchantId?.value).to.equal("demo-shop");
    expect(r.products.map((p) => p.productId)).to.include("ebook-smart-cards");
    expect(r.products.every((p) => p.price!.amountMinor > 0n && p.price!.currency === 978)).to.equal(true);
  });

  it("creates an order with a fresh transaction id, a complete payment offer and the transaction's keys", async () => {
    const a = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const b = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    expect(a.transactionId?.value).to.match(/^[0-9a-f-]{36}$/);
    expect(a.transactionId?.value).to.not.equal(b.transactionId?.value);
    expect(a.amount).to.deep.equal({ amountMinor: 99n, currency: 978, exponent: 2 });
    expect(a.paymentServerAddress).to.equal(net.payment.address);
    expect(a.merchantAddress).to.equal(net.merchant.address);
    expect(a.confirmationMode).to.equal(1);
    expect(a.expiresAt!.getTime()).to.be.above(Date.now());
    expect(a.keyNonce).to.have.length(16);
    expect(a.transactionSessionKey).to.have.length(32);
    expect(Buffer.from(a.transactionSessionKey).equals(Buffer.from(b.transactionSessionKey))).to.equal(false);
    expect(a.encryptedSessionKey!.ciphertext).to.have.length(32 + 16);
    const { order } = await net.clients.merchant.getOrder({ transactionId: a.transactionId });
    expect(order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
  });

  it("refuses an unknown or missing product", async () => {
    expect(await failure(net.clients.merchant.createOrder({ productId: "nothing" }))).to.include({ code: "NOT_FOUND" });
    expect(await failure(net.clients.merchant.createOrder({ productId: "" }))).to.include({ code: "INVALID_ARGUMENT" });
  });

  it("releases the goods exactly once for a validated debit result; a repeat returns the same receipt", async () => {
    const { offer, resultM, psamCounter } = await paidOrder();
    const r1 = await net.clients.merchant.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM });
    expect(r1.receipt!.goods).to.match(/^licence key /);
    expect(r1.receipt!.amount).to.deep.equal(offer.amount);
    expect(r1.receipt!.psamCounter).to.equal(psamCounter);
    const r2 = await net.clients.merchant.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM });
    expect(r2.receipt!.goods).to.equal(r1.receipt!.goods);
    const { order } = await net.clients.merchant.getOrder({ transactionId: offer.transactionId });
    expect(order!.state).to.equal(OrderState.ORDER_STATE_PAID);
    expect(order!.receipt!.goods).to.equal(r1.receipt!.goods);
  });

  it("gives no goods for a tampered debit result, or one of another order", async () => {
    const { offer, resultM } = await paidOrder("song-1");
    for (const where of ["iv", "ciphertext", "tag"] as const) {
      const f = await failure(net.clients.merchant.completeOrder({ transactionId: offer.transactionId, debitResultM: flipBit(resultM, where) }));
      expect(f, where).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
    }
    const { offer: other } = await net.clients.merchant.createOrder({ productId: "song-1" });
    expect(await failure(net.clients.merchant.completeOrder({ transactionId: other!.transactionId, debitResultM: resultM }))).to.include({
      code: "PERMISSION_DENIED",
      reason: "SEAL_BROKEN",
    });
    for (const o of [offer, other!])
      expect((await net.clients.merchant.getOrder({ transactionId: o.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
  });

  it("answers NOT_FOUND for an unknown order and INVALID_ARGUMENT without a debit result", async () => {
    const { resultM } = await paidOrder("song-1");
    expect(await failure(net.clients.merchant.completeOrder({ transactionId: { value: randomUUID() }, debitResultM: resultM }))).to.include({
      code: "NOT_FOUND",
    });
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    expect(await failure(net.clients.merchant.completeOrder({ transactionId: offer!.transactionId }))).to.include({ code: "INVALID_ARGUMENT" });
    expect(await failure(net.clients.merchant.getOrder({ transactionId: { value: randomUUID() } }))).to.include({ code: "NOT_FOUND" });
  });
});
