// Contract of netpurse.merchant.v1.MerchantService: the real merchant server
// with its real validation service, paid through the real payment network.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { PurchaseConfirmation } from "../../gen/netpurse/payment/v1/payment.js";
import { withOriginalAmount } from "../../client/card/purse-reader.js";
import { drawRequestFor, failure, openCard } from "../support/card-client.js";
import { startNetwork, type Network } from "../support/network.js";

describe("contract: netpurse.merchant.v1.MerchantService", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

  /** Pays an order at the payment server and returns the confirmation, without delivering it. */
  async function paidOrder(product = "ebook-smart-cards") {
    const { offer } = await net.clients.merchant.createOrder({ productId: product });
    const card = await openCard(net.cardPath);
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, offer!) });
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), Number(offer!.amount!.amountMinor)));
    const done = await net.clients.payment.completePurchase({ transactionId: offer!.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken });
    return { offer: offer!, confirmation: done.confirmation! };
  }

  it("lists its products with prices", async () => {
    const r = await net.clients.merchant.listProducts({});
    expect(r.merchantId?.value).to.equal("demo-shop");
    expect(r.products.map((p) => p.productId)).to.include("ebook-smart-cards");
    expect(r.products.every((p) => p.price!.amountMinor > 0n && p.price!.currency === 978)).to.equal(true);
  });

  it("creates an order with a fresh transaction id and a complete payment offer", async () => {
    const a = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const b = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    expect(a.transactionId?.value).to.match(/^[0-9a-f-]{36}$/);
    expect(a.transactionId?.value).to.not.equal(b.transactionId?.value);
    expect(a.amount).to.deep.equal({ amountMinor: 99n, currency: 978, exponent: 2 });
    expect(a.paymentServerAddress).to.equal(net.payment.address);
    expect(a.merchantAddress).to.equal(net.merchant.address);
    expect(a.confirmationMode).to.equal(1);
    expect(a.expiresAt!.getTime()).to.be.above(Date.now());
    const { order } = await net.clients.merchant.getOrder({ transactionId: a.transactionId });
    expect(order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
  });

  it("refuses an unknown or missing product", async () => {
    expect(await failure(net.clients.merchant.createOrder({ productId: "nothing" }))).to.include({ code: "NOT_FOUND" });
    expect(await failure(net.clients.merchant.createOrder({ productId: "" }))).to.include({ code: "INVALID_ARGUMENT" });
  });

  it("releases the goods exactly once for a validated confirmation; a repeat returns the same receipt", async () => {
    const { offer, confirmation } = await paidOrder();
    const r1 = await net.clients.merchant.completeOrder({ transactionId: offer.transactionId, confirmation });
    expect(r1.receipt!.goods).to.match(/^licence key /);
    expect(r1.receipt!.amount).to.deep.equal(offer.amount);
    expect(r1.receipt!.psamCounter).to.equal(confirmation.psamCounter);
    const r2 = await net.clients.merchant.completeOrder({ transactionId: offer.transactionId, confirmation });
    expect(r2.receipt!.goods).to.equal(r1.receipt!.goods);
    const { order } = await net.clients.merchant.getOrder({ transactionId: offer.transactionId });
    expect(order!.state).to.equal(OrderState.ORDER_STATE_PAID);
    expect(order!.receipt!.goods).to.equal(r1.receipt!.goods);
  });

  describe("a forged or mismatched confirmation gets PERMISSION_DENIED and no goods", () => {
    const tamper: [string, (c: PurchaseConfirmation) => PurchaseConfirmation][] = [
      ["a flipped MAC bit", (c) => ({ ...c, mac: Buffer.from(Buffer.from(c.mac).map((b, i) => (i === 0 ? b ^ 1 : b))) })],
      ["a raised amount", (c) => ({ ...c, amount: { ...c.amount!, amountMinor: c.amount!.amountMinor + 1n } })],
      ["another PSAM counter", (c) => ({ ...c, psamCounter: c.psamCounter + 1 })],
      ["another purse", (c) => ({ ...c, purseId: { value: Buffer.alloc(8, 7) } })],
      ["a later confirmation time", (c) => ({ ...c, confirmedAt: new Date(c.confirmedAt!.getTime() + 1) })],
    ];
    for (const [name, change] of tamper) {
      it(name, async () => {
        const { offer, confirmation } = await paidOrder("song-1");
        const f = await failure(net.clients.merchant.completeOrder({ transactionId: offer.transactionId, confirmation: change(confirmation) }));
        expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
        expect((await net.clients.merchant.getOrder({ transactionId: offer.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
      });
    }

    it("a genuine confirmation of another order", async () => {
      const paid = await paidOrder("song-1");
      const { offer: other } = await net.clients.merchant.createOrder({ productId: "song-1" });
      const f = await failure(net.clients.merchant.completeOrder({ transactionId: other!.transactionId, confirmation: paid.confirmation }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
      expect((await net.clients.merchant.getOrder({ transactionId: other!.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
    });
  });

  it("answers NOT_FOUND for an unknown order and INVALID_ARGUMENT without a confirmation", async () => {
    const { confirmation } = await paidOrder("song-1");
    expect(await failure(net.clients.merchant.completeOrder({ transactionId: { value: randomUUID() }, confirmation }))).to.include({ code: "NOT_FOUND" });
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    expect(await failure(net.clients.merchant.completeOrder({ transactionId: offer!.transactionId }))).to.include({ code: "INVALID_ARGUMENT" });
    expect(await failure(net.clients.merchant.getOrder({ transactionId: { value: randomUUID() } }))).to.include({ code: "NOT_FOUND" });
  });
});
