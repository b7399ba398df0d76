// Contract of netpurse.merchant.v1.MerchantService: the real merchant server
// with its real validation service, paid through the real payment network.

import { expect } from "chai";
import { ClientError, Status, type Client } from "nice-grpc";
import { createHash, randomBytes, randomUUID } from "node:crypto";
import Database from "better-sqlite3";
import { copyFile } from "node:fs/promises";
import { join } from "node:path";
import { MerchantServiceDefinition, OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import { withOriginalAmount } from "../../client/card/purse-reader.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { reasonName, reasonOf, retryAfterMsOf } from "../../lib/grpc/errors.js";
import { startMerchant, type MerchantConfig } from "../../services/merchant/server.js";
import { completeRequest, drawRequestFor, failure, flipBit, openCard, openIssued } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";
import { defined, termsOf } from "../support/offers.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

describe("contract: netpurse.merchant.v1.MerchantService", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

  /** Pays an order at the payment server and returns its debit result M, without delivering it. */
  async function paidOrder(product = "ebook-smart-cards", merchant: Client<typeof MerchantServiceDefinition> = net.clients.merchant) {
    const offer = defined((await merchant.createOrder({ productId: product })).offer, "an offer");
    const card = await openCard(net.cardPath);
    const issued = openIssued(offer, await net.clients.payment.processDrawRequest(await drawRequestFor(card, offer)));
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), termsOf(offer).amountMinor));
    const done = await net.clients.payment.completePurchase(completeRequest(offer, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    return { offer, resultM: defined(done.debitResultM, "debit result M"), psamCounter: issued.psamCounter };
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
    // The ETSK holds the TSK with the offer's terms (a SessionKeyGrant), more than the bare 32-byte TSK.
    expect(a.encryptedSessionKey!.ciphertext.length).to.be.above(32 + 16);
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
    // Each answer carries a new access secret, which replaces the one before: the merchant keeps only its digest.
    expect(Buffer.from(r2.accessSecret).equals(Buffer.from(r1.accessSecret))).to.equal(false);
    const { order } = await net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret: r2.accessSecret });
    expect(order!.state).to.equal(OrderState.ORDER_STATE_PAID);
    expect(order!.receipt!.goods).to.equal(r1.receipt!.goods);
    expect(
      defined((await net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret: r1.accessSecret })).order, "the order").receipt,
    ).to.equal(undefined);
  });

  describe("who reads an order (GetOrder): the goods for the buyer only", () => {
    /** What anyone with the transaction id may see of an order: its id and its state, nothing else. */
    const stateOnly = (id: { value: string } | undefined, state: OrderState) => ({
      order: { transactionId: id, productId: "", amount: undefined, state, createdAt: undefined, receipt: undefined },
    });
    /** An order paid and its goods released: the receipt and the access secret the buyer got with it. */
    async function released() {
      const { offer, resultM } = await paidOrder("song-1");
      const r = await net.clients.merchant.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM });
      return { offer, receipt: defined(r.receipt, "a receipt"), accessSecret: r.accessSecret };
    }

    it("a stranger with the transaction id sees the order's state only: no product, amount, receipt or goods", async () => {
      const { offer } = await released();
      expect(await net.clients.merchant.getOrder({ transactionId: offer.transactionId })).to.deep.equal(
        stateOnly(offer.transactionId, OrderState.ORDER_STATE_PAID),
      );
      const unpaid = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "an offer");
      expect(await net.clients.merchant.getOrder({ transactionId: unpaid.transactionId })).to.deep.equal(
        stateOnly(unpaid.transactionId, OrderState.ORDER_STATE_OFFERED),
      );
    });

    it("a wrong access secret, or another order's, sees the same: the state only; a malformed one is INVALID_ARGUMENT", async () => {
      const { offer } = await released();
      const other = await released();
      const wrong: [string, Buffer][] = [
        ["a made-up secret", randomBytes(32)],
        ["another order's secret", other.accessSecret],
      ];
      for (const [what, accessSecret] of wrong)
        expect(await net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret }), what).to.deep.equal(
          stateOnly(offer.transactionId, OrderState.ORDER_STATE_PAID),
        );
      const malformed = await failure(net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret: randomBytes(31) }));
      expect(malformed.details).to.contain("access_secret");
      expect(malformed).to.deep.include({
        code: "INVALID_ARGUMENT",
        reason: "INVALID_FIELD",
      });
    });

    it("the buyer, with the access secret CompleteOrder gave, gets the whole order with the receipt and the goods", async () => {
      const { offer, receipt, accessSecret } = await released();
      expect(accessSecret).to.have.length(32);
      const order = defined((await net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret })).order, "the order");
      expect(order).to.deep.include({ transactionId: offer.transactionId, productId: "song-1", amount: offer.amount, state: OrderState.ORDER_STATE_PAID });
      expect(order.receipt).to.deep.equal(receipt);
      expect(defined(order.receipt, "the receipt").goods).to.match(/^licence key /);
    });

    it("the merchant keeps only the secret's SHA-256 digest; the cardholder's client keeps the secret in its journal", async () => {
      const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "an offer");
      const paid = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer.amount });
      const id = defined(offer.transactionId, "the transaction id").value;
      const journal = new Database(join(net.paths.client, "client.db"), { readonly: true });
      const { order_access_secret: secret } = journal.prepare("SELECT order_access_secret FROM client_purchases WHERE transaction_id = ?").get(id) as {
        order_access_secret: Buffer;
      };
      journal.close();
      expect(secret).to.have.length(32);
      const row = defined(await net.merchant.db.get<Record<string, unknown>>("SELECT * FROM orders WHERE transaction_id = ?", [id]), "the order's row");
      expect(row.access_secret_digest).to.deep.equal(createHash("sha256").update(secret).digest());
      expect(Object.values(row).some((v) => Buffer.isBuffer(v) && v.includes(secret))).to.equal(false);
      // With the journaled secret the cardholder gets the goods again.
      const { order } = await net.clients.merchant.getOrder({ transactionId: offer.transactionId, accessSecret: secret });
      expect(defined(order?.receipt, "the receipt").goods).to.equal(defined(paid.receipt, "the receipt paid").goods);
    });
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

  describe("unpaid orders expire and are deleted; at most so many are open", () => {
    const servers: { close(): Promise<void> }[] = [];
    const cleanups: (() => Promise<void>)[] = [];
    after(async () => {
      for (const s of servers) await s.close();
      for (const c of cleanups) await c();
    });

    /** A merchant server of the demo shop over a fresh merchant.db, with short periods. */
    async function shopWith(o: Omit<MerchantConfig, "dir" | "security">) {
      const { dir, cleanup } = await tempDir("netpurse-shop-");
      cleanups.push(cleanup);
      await copyFile(join(net.paths.merchant("demo-shop"), "shop.json"), join(dir, "shop.json"));
      const server = await startMerchant({
        security: await net.security.of("merchant", "demo-shop"),
        listen: "127.0.0.1:0",
        dir,
        validation: net.validation.address,
        paymentServer: net.payment.address,
        ...o,
      });
      const channel = openChannel(server.address, net.security.cardholder.channel({ kind: "merchant" }));
      servers.push({
        async close() {
          channel.close();
          await server.close();
        },
      });
      return clientFactory().create(MerchantServiceDefinition, channel);
    }
    const orderOf = async (m: Client<typeof MerchantServiceDefinition>, id: { value: string } | undefined, accessSecret: Buffer = Buffer.alloc(0)) =>
      defined((await m.getOrder({ transactionId: id, accessSecret })).order, "the order");
    const stateOf = async (m: Client<typeof MerchantServiceDefinition>, id: { value: string } | undefined) => (await orderOf(m, id)).state;
    const create = async (m: Client<typeof MerchantServiceDefinition>) => defined((await m.createOrder({ productId: "song-1" })).offer, "an offer");
    const goodsOf = (r: { receipt?: { goods: string } | undefined }) => defined(r.receipt, "a receipt").goods;
    const gone = (m: Client<typeof MerchantServiceDefinition>, id: { value: string } | undefined) =>
      m.getOrder({ transactionId: id }).then(
        () => false,
        (e: unknown) => e instanceof ClientError && e.code === Status.NOT_FOUND,
      );
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

    it("the sweep turns an order unpaid past its expiry plus the grace period EXPIRED, then deletes it after the retention period", async () => {
      const grace = 300;
      const m = await shopWith({ offerTtlMs: 800, expiryGraceMs: grace, retentionMs: 1_000, sweepEveryMs: 50 });
      const offer = await create(m);
      const id = offer.transactionId;
      expect(await stateOf(m, id)).to.equal(OrderState.ORDER_STATE_OFFERED);
      await waitFor(async () => (await stateOf(m, id)) === OrderState.ORDER_STATE_EXPIRED, 5_000, "the order to expire");
      const expiredAt = Date.now();
      expect(expiredAt).to.be.at.least(termsOf(offer).expiresAt.getTime() + grace);
      // The payment server signs nothing for it any more.
      const card = await openCard(net.cardPath);
      expect(await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, offer)))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "OFFER_EXPIRED",
      });
      await waitFor(() => gone(m, id), 5_000, "the expired order to be deleted");
      expect(Date.now() - expiredAt).to.be.at.least(900);
    });

    it("a paid order is never expired or deleted", async () => {
      const m = await shopWith({ offerTtlMs: 800, expiryGraceMs: 100, retentionMs: 300, sweepEveryMs: 50 });
      const { offer, resultM } = await paidOrder("song-1", m);
      const released = await m.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM });
      const goods = goodsOf(released);
      await sleep(Math.max(0, termsOf(offer).expiresAt.getTime() - Date.now()) + 100 + 300 + 500); // expiry, grace, retention, some sweeps
      const order = await orderOf(m, offer.transactionId, released.accessSecret);
      expect(order.state).to.equal(OrderState.ORDER_STATE_PAID);
      expect(goodsOf(order)).to.equal(goods);
    });

    it("a debit result M that comes for an EXPIRED order still releases the goods, once: the card paid in time", async () => {
      const m = await shopWith({ offerTtlMs: 1_500, expiryGraceMs: 100, retentionMs: 60_000, sweepEveryMs: 50 });
      const { offer, resultM, psamCounter } = await paidOrder("song-1", m); // drawn before the offer expired
      await waitFor(async () => (await stateOf(m, offer.transactionId)) === OrderState.ORDER_STATE_EXPIRED, 5_000, "the order to expire");
      const r1 = defined((await m.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM })).receipt, "a receipt");
      expect(r1.goods).to.match(/^licence key /);
      expect(r1.psamCounter).to.equal(psamCounter);
      expect(await stateOf(m, offer.transactionId)).to.equal(OrderState.ORDER_STATE_PAID);
      const r2 = await m.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM });
      expect(goodsOf(r2)).to.equal(r1.goods);
      await sleep(300); // more sweeps: it stays PAID
      expect(await stateOf(m, offer.transactionId)).to.equal(OrderState.ORDER_STATE_PAID);
    });

    it("at most N unpaid orders: beyond it RESOURCE_EXHAUSTED (TOO_MANY_ORDERS) with a RetryInfo; room again as orders expire", async () => {
      const m = await shopWith({ offerTtlMs: 1_000, expiryGraceMs: 100, retentionMs: 60_000, sweepEveryMs: 50, maxUnpaidOrders: 2 });
      const paid = await create(m);
      const unpaid = [await create(m)];
      let refused: unknown;
      await m.createOrder({ productId: "song-1" }).catch((e: unknown) => (refused = e));
      expect(refused).to.be.instanceOf(ClientError);
      expect((refused as ClientError).code).to.equal(Status.RESOURCE_EXHAUSTED);
      expect(reasonName(reasonOf(refused) ?? 0)).to.equal("ERROR_REASON_TOO_MANY_ORDERS");
      expect(retryAfterMsOf(refused)).to.equal(1_000);
      // A paid order does not count: it frees its place at once.
      const card = await openCard(net.cardPath);
      const issued = openIssued(paid, await net.clients.payment.processDrawRequest(await drawRequestFor(card, paid)));
      const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), termsOf(paid).amountMinor));
      const done = await net.clients.payment.completePurchase(completeRequest(paid, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
      await m.completeOrder({ transactionId: paid.transactionId, debitResultM: done.debitResultM });
      unpaid.push(await create(m));
      expect(await failure(m.createOrder({ productId: "song-1" }))).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_ORDERS" });
      // Unpaid ones free theirs once they expire: then two more fit, and a third does not.
      for (const o of unpaid)
        await waitFor(async () => (await stateOf(m, o.transactionId)) === OrderState.ORDER_STATE_EXPIRED, 5_000, "the unpaid orders to expire");
      await m.createOrder({ productId: "song-1" });
      await m.createOrder({ productId: "song-1" });
      expect(await failure(m.createOrder({ productId: "song-1" }))).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_ORDERS" });
    });
  });
});
