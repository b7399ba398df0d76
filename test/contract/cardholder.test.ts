// Contract of netpurse.cardholder.v1.CardholderService: the real client
// daemon with a software card, paying through the real network.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { CardTransactionKind, PurseStatus, type CardTransaction } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { startClientDaemon } from "../../client/daemon/server.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { failure } from "../support/card-client.js";
import { startNetwork, type Network } from "../support/network.js";
import { openAccount } from "../support/load.js";

describe("contract: netpurse.cardholder.v1.CardholderService", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

  const offer = async (product = "song-1"): Promise<PaymentOffer> => (await net.clients.merchant.createOrder({ productId: product })).offer!;
  const counter = async () => (await net.clients.cardholder.getCard({})).purse!.transactionCounter;
  const notAtPaymentServer = async (o: PaymentOffer) =>
    expect((await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }))).code).to.equal("NOT_FOUND");

  it("reads the card's purse state", async () => {
    const r = await net.clients.cardholder.getCard({});
    expect(r.purse!.balance).to.deep.equal({ amountMinor: 10_000n, currency: 978, exponent: 2 });
    expect(r.purse!.maxBalance!.amountMinor).to.equal(50_000n);
    expect(r.purse!.expiryDate).to.equal("2031-12-31");
    expect(r.purse!.status).to.equal(PurseStatus.PURSE_STATUS_ACTIVE);
    expect(r.purse!.purseId!.value).to.have.length(8);
    expect(r.atrHex).to.match(/^3b/);
  });

  it("pays an approved offer: receipt, new balance, every step, and the card's log", async () => {
    const before = (await net.clients.cardholder.getCard({})).purse!;
    const o = await offer("ebook-smart-cards");
    const r = await net.clients.cardholder.payOffer({ offer: o, approvedAmount: o.amount });
    expect(r.receipt!.transactionId).to.deep.equal(o.transactionId);
    expect(r.receipt!.goods).to.match(/^licence key /);
    expect(r.purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor - 250n);
    expect(r.purse!.transactionCounter).to.equal(before.transactionCounter + 1);
    expect(r.steps.map((s) => s.name)).to.deep.equal([
      "offer",
      "card",
      "checks",
      "draw request",
      "PSAM",
      "debit command",
      "card debit",
      "confirmation",
      "goods released",
    ]);
    const { transactions } = await net.clients.cardholder.listCardTransactions({ limit: 1 });
    expect(transactions).to.have.length(1);
    const t = transactions[0]!;
    expect(t.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_PURCHASE);
    expect(t.amount!.amountMinor).to.equal(250n);
    expect(t.transactionId).to.deep.equal(o.transactionId);
    expect(t.cardSignature).to.have.length(8);
    expect(t.psamCounter).to.equal(r.receipt!.psamCounter);
  });

  it("does not touch the card unless the cardholder approved exactly the offer's amount", async () => {
    const o = await offer();
    const c0 = await counter();
    for (const approvedAmount of [undefined, { ...o.amount!, amountMinor: 98n }, { ...o.amount!, currency: 840 }]) {
      expect(await failure(net.clients.cardholder.payOffer({ offer: o, ...(approvedAmount ? { approvedAmount } : {}) }))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "NOT_APPROVED",
      });
    }
    expect(await counter()).to.equal(c0);
    await notAtPaymentServer(o);
  });

  it("stops an offer above the card's balance at the client (step 608): nothing is sent", async () => {
    const o = await offer();
    const big = { ...o, amount: { ...o.amount!, amountMinor: 99_999_900n } };
    expect(await failure(net.clients.cardholder.payOffer({ offer: big, approvedAmount: big.amount }))).to.include({
      code: "FAILED_PRECONDITION",
      reason: "INSUFFICIENT_BALANCE",
    });
    await notAtPaymentServer(o);
  });

  it("stops an offer in another currency and an expired offer at the client", async () => {
    const o = await offer();
    const usd = { ...o, amount: { ...o.amount!, currency: 840 } };
    expect(await failure(net.clients.cardholder.payOffer({ offer: usd, approvedAmount: usd.amount }))).to.include({
      code: "FAILED_PRECONDITION",
      reason: "CURRENCY_MISMATCH",
    });
    const stale = { ...(await offer()), expiresAt: new Date(Date.now() - 1000) };
    expect(await failure(net.clients.cardholder.payOffer({ offer: stale, approvedAmount: stale.amount }))).to.include({
      code: "FAILED_PRECONDITION",
      reason: "OFFER_EXPIRED",
    });
    await notAtPaymentServer(o);
    await notAtPaymentServer(stale);
  });

  it("refuses a malformed offer with INVALID_ARGUMENT naming the field", async () => {
    const o = await offer();
    const cases: [PaymentOffer, string][] = [
      [{ ...o, transactionId: { value: "x" } }, "offer.transaction_id"],
      [{ ...o, merchantId: undefined }, "offer.merchant_id"],
      [{ ...o, paymentServerAddress: "" }, "offer.payment_server_address"],
      [{ ...o, amount: { ...o.amount!, amountMinor: 0n } }, "offer.amount"],
    ];
    for (const [bad, field] of cases) {
      const f = await failure(net.clients.cardholder.payOffer({ offer: bad, approvedAmount: bad.amount }));
      expect(f.code, field).to.equal("INVALID_ARGUMENT");
      expect(f.details).to.contain(field);
    }
  });

  it("passes the payment server's refusal on with its code and reason", async () => {
    const o = await offer();
    const forged = { ...o, merchantId: { value: "not-registered" } };
    const f = await failure(net.clients.cardholder.payOffer({ offer: forged, approvedAmount: forged.amount }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "UNKNOWN_MERCHANT" });
  });

  it("refuses to pay the same offer twice", async () => {
    const o = await offer();
    await net.clients.cardholder.payOffer({ offer: o, approvedAmount: o.amount });
    const c0 = await counter();
    expect(await failure(net.clients.cardholder.payOffer({ offer: o, approvedAmount: o.amount }))).to.include({ code: "ALREADY_EXISTS" });
    expect(await counter()).to.equal(c0);
  });

  it("stops an expired card at the client", async () => {
    const issuer = await Issuer.open(net.paths.issuer);
    const path = join(net.paths.cards, "expired.card.json");
    await issuer.personaliseCard({ path, currency: 978, exponent: 2, initialValue: 1_000, maxBalance: 5_000, expiry: "2025-01-31" });
    await issuer.close();
    const d = await startClientDaemon({ security: net.security.cardholder, card: path, dir: join(net.data, "client-expired") });
    const channel = openChannel(d.address, { insecure: true }); // the daemon's Unix socket
    try {
      const c = clientFactory().create(CardholderServiceDefinition, channel);
      const o = await offer();
      expect(await failure(c.payOffer({ offer: o, approvedAmount: o.amount }))).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_EXPIRED" });
      await notAtPaymentServer(o);
    } finally {
      channel.close();
      await d.close();
    }
  });

  describe("ListCardTransactions, a page at a time", () => {
    type Cardholder = typeof net.clients.cardholder;
    const list = (req: { limit?: number; pageSize?: number; pageToken?: string }, c: Cardholder = net.clients.cardholder) => c.listCardTransactions(req);
    const counters = (ts: CardTransaction[]) => ts.map((t) => t.transactionCounter);

    /** Every page from `pageToken` on, and each page's size. */
    async function pages(req: { limit?: number; pageSize: number }, pageToken = "") {
      const all: CardTransaction[] = [];
      const sizes: number[] = [];
      do {
        const r = await list({ ...req, pageToken });
        all.push(...r.transactions);
        sizes.push(r.transactions.length);
        pageToken = r.nextPageToken;
      } while (pageToken);
      return { all, sizes };
    }

    const pay = async () => {
      const o = await offer();
      await net.clients.cardholder.payOffer({ offer: o, approvedAmount: o.amount });
    };

    /** INVALID_ARGUMENT, reason INVALID_FIELD, naming `field`. */
    async function refusedNaming(call: Promise<unknown>, field: string, what = field) {
      const f = await failure(call);
      expect(f, what).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
      expect(f.details, what).to.match(new RegExp(`^${field}: `));
      return f;
    }

    before(async () => {
      while ((await list({})).transactions.length < 7) await pay();
    });

    it("pages of 2 together are the whole log, newest first, each entry once", async () => {
      const whole = await list({});
      expect(whole.nextPageToken).to.equal("");
      const n = whole.transactions.length;
      const { all, sizes } = await pages({ pageSize: 2 });
      expect(all).to.deep.equal(whole.transactions);
      expect(sizes).to.deep.equal([...Array<number>(Math.floor(n / 2)).fill(2), ...(n % 2 ? [1] : [])]);
      const c = counters(all);
      expect(c).to.deep.equal([...c].sort((x, y) => y - x));
      expect(new Set(c).size).to.equal(n);
    });

    it("a purchase between two pages neither repeats an entry nor makes one skipped", async () => {
      const before = (await list({})).transactions;
      const first = await list({ pageSize: 3 });
      await pay();
      const rest = await pages({ pageSize: 3 }, first.nextPageToken);
      expect(counters([...first.transactions, ...rest.all])).to.deep.equal(counters(before));
      expect((await list({ limit: 1 })).transactions[0]!.transactionCounter).to.equal(before[0]!.transactionCounter + 1);
    });

    it("limit bounds the whole listing: alone it gives one page as before; with page_size the pages stop after limit entries", async () => {
      const whole = (await list({})).transactions;
      const one = await list({ limit: 3 });
      expect(one.transactions).to.deep.equal(whole.slice(0, 3));
      expect(one.nextPageToken).to.equal("");
      const { all, sizes } = await pages({ limit: 5, pageSize: 2 });
      expect(sizes).to.deep.equal([2, 2, 1]);
      expect(all).to.deep.equal(whole.slice(0, 5));
    });

    it("page_size 0 is the default, 32 (all a card keeps); above the maximum it is taken as the maximum, not refused; negative is INVALID_ARGUMENT naming page_size", async () => {
      const whole = await list({});
      expect(await list({ pageSize: 0 })).to.deep.equal(whole);
      expect(await list({ pageSize: 1_000_000 })).to.deep.equal(whole);
      await refusedNaming(list({ pageSize: -1 }), "page_size");
      await refusedNaming(list({ limit: 3, pageSize: -5 }), "page_size");
    });

    it("a page_token that does not decode (garbled, cut, extended, made up) is INVALID_ARGUMENT naming page_token", async () => {
      const { nextPageToken: token, transactions } = await list({ pageSize: 1 });
      expect(token).to.match(/^[A-Za-z0-9_-]+$/);
      const garbled = token.slice(0, 12) + (token[12] === "A" ? "B" : "A") + token.slice(13);
      const madeUp = Buffer.from(JSON.stringify({ v: 1, l: "transactions", s: "card 00", p: { c: 1, n: 1 } })).toString("base64url");
      for (const bad of ["x", "%%%", "a token", garbled, token.slice(0, -3), `${token}A`, madeUp]) {
        await refusedNaming(list({ pageSize: 1, pageToken: bad }), "page_token", bad);
      }
      const next = await list({ pageSize: 1, pageToken: token });
      expect(next.transactions[0]!.transactionCounter).to.be.below(transactions[0]!.transactionCounter);
    });

    it("a page_token made for another limit, another card or another list is INVALID_ARGUMENT naming page_token", async () => {
      const { nextPageToken: token } = await list({ pageSize: 2 });
      await refusedNaming(list({ limit: 5, pageToken: token }), "page_token", "another limit");

      // Another card, in another daemon.
      const issuer = await Issuer.open(net.paths.issuer);
      const path = join(net.paths.cards, "paging.card.json");
      await issuer.personaliseCard({ path, currency: 978, exponent: 2, initialValue: 1_000, maxBalance: 5_000, expiry: "2031-12-31" });
      await issuer.close();
      const d = await startClientDaemon({ security: net.security.cardholder, card: path, dir: join(net.data, "client-paging") });
      const channel = openChannel(d.address, { insecure: true }); // the daemon's Unix socket
      try {
        const other = clientFactory().create(CardholderServiceDefinition, channel);
        const f = await refusedNaming(list({ pageToken: token }, other), "page_token", "another card");
        expect(f.details).to.contain("was made for the transactions of card");
      } finally {
        channel.close();
        await d.close();
      }

      // The bank's list of holds.
      const { accountId } = await openAccount(net, { accountId: "paging-account", holder: "Paging Holder", deposit: 10_000 });
      const { purse } = await net.clients.cardholder.getCard({});
      for (let i = 0; i < 2; i++) {
        await net.bankAs(accountId).createLoadOffer({ transactionId: txnId(randomUUID()), accountId, amount: money(1, 978, 2), purse });
      }
      const { nextPageToken: holds } = await net.bankAs(accountId).listHolds({ accountId, pageSize: 1 });
      expect(holds).to.not.equal("");
      const f = await refusedNaming(list({ pageToken: holds }), "page_token", "the bank's holds");
      expect(f.details).to.contain(`was made for the holds of account ${accountId}`);
      expect((await list({ pageSize: 2, pageToken: token })).transactions).to.have.length(2);
    });
  });
});
