// Contract of netpurse.cardholder.v1.CardholderService for FIG. 16
// (docs/loyalty.md): the real client daemon with a software card
// authenticates at a benefits site and redeems points there in each
// confirmation mode, earns points with a purchase at an enrolled shop
// (EarnPoints, kept in its journal while the site cannot be reached), and
// refuses the attacks on them; every part is real (payment server, terminal
// host with authentication, points and money PSAMs, validation service, the
// benefits sites, clearing) on loopback.

import { expect } from "chai";
import Database from "better-sqlite3";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { CardTransactionKind, Sealed, type Money, type PointsGrant } from "../../gen/netpurse/card/v1/card.js";
import { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import { OrderState, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { PartyKind } from "../../gen/netpurse/clearing/v1/clearing.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf, txnId } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, money } from "../../lib/money.js";
import { startClientDaemon } from "../../client/daemon/server.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { DEMO_SITE } from "../../services/benefits/site.js";
import { failure } from "../support/card-client.js";
import { defined } from "../support/offers.js";
import { LOYALTY_SITES, startNetwork, waitFor, type Network } from "../support/network.js";

const SKYWAYS = DEMO_SITE.programme.code;
const AUTHENTICATION: Money = money(0, AUTHENTICATION_CURRENCY, 0);
const points = (n: number | bigint): Money => money(n, SKYWAYS, 0);
const eur = (minor: number | bigint): Money => money(minor, 978, 2);
/** What the Skyways sites show their member Ana Silva, holder of the demo card, for an authentication. */
const MEMBER_VIEW = "member 100234 Ana Silva: booking NP4821 LIS→AMS 12 Dec";
const CARD_POINTS = 10_000;
/** Points per euro at the enrolled demo shops. */
const RATE = 10;
const LOUNGE = 2_000;
const UPGRADE = 15_000;

describe("contract: CardholderService authenticates, redeems and earns points (FIG. 16)", function () {
  this.timeout(60_000);
  let net: Network;
  /** What the tests paid, for clearing's figures at the end: money purchases by shop, redemptions by site. */
  const made = { money: new Map<string, bigint>(), purchases: 0, redemptions: new Map<string, { points: bigint; count: number }>() };

  before(async () => (net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], loyalty: { cardPoints: CARD_POINTS, pointsPerUnit: RATE } })));
  after(async () => net?.close());

  const cardholder = () => net.clients.cardholder;
  const site = (siteId: string) => defined(net.sites[siteId], `site ${siteId}`);

  /** The card as the daemon reads it: money, Skyways points, counter. */
  async function cardState() {
    const r = await cardholder().getCard({});
    const purse = defined(r.purse, "the purse");
    const skyways = r.points.find((p) => p.programme === SKYWAYS);
    return {
      money: defined(purse.balance, "the balance").amountMinor,
      points: defined(defined(skyways, "the Skyways points purse").balance, "the points").amountMinor,
      counter: purse.transactionCounter,
    };
  }
  const purseHex = async () => hexOf((await cardholder().getCard({})).purse?.purseId?.value);
  const newestLog = async () => defined((await cardholder().listCardTransactions({ limit: 1 })).transactions[0], "the card's newest log entry");

  const orderAt = async (siteId: string, reward: string): Promise<PaymentOffer> =>
    defined((await site(siteId).shop.createOrder({ productId: reward })).offer, `an offer of ${reward}`);
  const pay = (o: PaymentOffer) => cardholder().payOffer({ offer: o, approvedAmount: o.amount });
  const purchaseOf = async (o: PaymentOffer) => defined((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase, "the purchase");
  const completed = (o: PaymentOffer) =>
    waitFor(async () => (await purchaseOf(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, `purchase ${o.transactionId?.value} COMPLETED`);
  const notAtPaymentServer = async (o: PaymentOffer) =>
    expect((await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }))).code, "GetPurchase").to.equal("NOT_FOUND");

  /** Batch records, signatures and open debits of the PSAMs of one currency, as the concentrator reports them. */
  async function psams(currency: number) {
    const slots = (await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots).filter((s) => s.currencies.includes(currency));
    expect(slots, `a PSAM of currency ${currency}`).to.have.length(1);
    const s = defined(slots[0], `the PSAM of currency ${currency}`);
    return { psamId: hexOf(s.psamId?.value), batch: s.batchCount, counter: s.psamCounter, pending: s.pendingDebits.length };
  }

  /** A row of a SQLite file a service keeps (read-only, beside the running service). */
  function row<T>(file: string, sql: string, ...args: unknown[]): T | undefined {
    const db = new Database(file, { readonly: true });
    try {
      return db.prepare(sql).get(...args) as T | undefined;
    } finally {
      db.close();
    }
  }
  const idOfGrant = (g: PointsGrant) => defined(g.grantId, "the grant id").value;
  const journaledGrant = (grantId: string) =>
    row<{ state: string; error: string | null }>(join(net.paths.client, "client.db"), "SELECT state, error FROM client_grants WHERE grant_id = ?", grantId);
  /** A grant as the Skyways site keeps it, read through the site's own store (SQLite or PostgreSQL). */
  const siteGrant = (grantId: string) =>
    defined(net.sites[DEMO_SITE.merchantId], "the Skyways site").server.db.get<{ state: string; points: number }>(
      "SELECT state, points FROM grants WHERE grant_id = ?",
      [grantId],
    );

  /** Redeems a lounge pass at a site through the daemon, checking what the cardholder sees. */
  async function redeemLounge(siteId: string) {
    const before = await cardState();
    const pts0 = await psams(SKYWAYS);
    const o = await orderAt(siteId, "lounge");
    expect(o.amount).to.deep.equal(points(LOUNGE));
    const r = await pay(o);
    const receipt = defined(r.receipt, "the receipt");
    expect(receipt.goods).to.match(/^Lounge pass voucher [0-9A-F]{4}(-[0-9A-F]{4}){3} for member 100234 Ana Silva$/);
    expect(receipt.amount).to.deep.equal(points(LOUNGE));
    expect(receipt.pointsGrant, "no points are earned on points").to.equal(undefined);
    expect(r.points?.programme).to.equal(SKYWAYS);
    expect(r.points?.balance, "PayOfferResponse.points: the points after").to.deep.equal(points(before.points - BigInt(LOUNGE)));
    expect(r.purse?.balance, "the money purse untouched").to.deep.equal(eur(before.money));
    expect(await cardState()).to.deep.equal({ money: before.money, points: before.points - BigInt(LOUNGE), counter: before.counter + 1 });
    const log = await newestLog();
    expect(log.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_REDEMPTION);
    expect(log.amount).to.deep.equal(points(LOUNGE));
    expect(log.balanceAfter).to.deep.equal(points(before.points - BigInt(LOUNGE)));
    expect(log.transactionId).to.deep.equal(o.transactionId);
    await completed(o);
    expect((await purchaseOf(o)).amount).to.deep.equal(points(LOUNGE));
    expect((await psams(SKYWAYS)).batch - pts0.batch, "one record in the points PSAM's batch").to.equal(1);
    const tally = made.redemptions.get(siteId) ?? { points: 0n, count: 0 };
    made.redemptions.set(siteId, { points: tally.points + BigInt(LOUNGE), count: tally.count + 1 });
    return o;
  }

  /** Buys at an enrolled demo shop through the daemon. */
  async function buy(shopId: string, product: string) {
    const o = defined((await defined(net.merchants[shopId], shopId).createOrder({ productId: product })).offer, "an offer");
    const r = await pay(o);
    made.purchases++;
    made.money.set(shopId, (made.money.get(shopId) ?? 0n) + defined(o.amount, "the amount").amountMinor);
    return { o, r, grant: r.receipt?.pointsGrant };
  }

  describe("authentication (0 in 999) through PayOffer", () => {
    for (const { mode, siteId } of LOYALTY_SITES) {
      it(`${mode}: the site shows the member, the card's money and points stay, its counter moves, its log says AUTHENTICATION, the payment server COMPLETED 0 in 999, no batch record`, async () => {
        const before = await cardState();
        const auth0 = await psams(AUTHENTICATION_CURRENCY);
        const o = await orderAt(siteId, "booking");
        expect(o.amount).to.deep.equal(AUTHENTICATION);
        const r = await pay(o);
        const receipt = defined(r.receipt, "the receipt");
        expect(receipt.goods).to.equal(MEMBER_VIEW);
        expect(receipt.amount).to.deep.equal(AUTHENTICATION);
        expect(receipt.merchantId?.value).to.equal(siteId);
        expect(receipt.pointsGrant).to.equal(undefined);
        expect(r.points, "no points purse moved").to.equal(undefined);
        expect(r.purse?.balance).to.deep.equal(eur(before.money));
        expect(await cardState()).to.deep.equal({ ...before, counter: before.counter + 1 });
        const log = await newestLog();
        expect(log.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_AUTHENTICATION);
        expect(log.amount).to.deep.equal(AUTHENTICATION);
        expect(log.transactionCounter).to.equal(before.counter + 1);
        expect(log.transactionId).to.deep.equal(o.transactionId);
        await completed(o);
        const p = await purchaseOf(o);
        expect(p.amount).to.deep.equal(AUTHENTICATION);
        expect(p.merchantId?.value).to.equal(siteId);
        const auth1 = await psams(AUTHENTICATION_CURRENCY);
        expect(auth1.counter - auth0.counter, "the authentication PSAM signed once").to.equal(1);
        expect(auth1.batch, "no batch record, ever").to.equal(0);
        expect(auth1.pending, "no debit left open").to.equal(0);
        expect((await site(siteId).shop.getOrder({ transactionId: o.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_PAID);
      });
    }
  });

  describe("redemption in points through PayOffer", () => {
    for (const { mode, siteId } of LOYALTY_SITES) {
      it(`${mode}: the points purse pays (PayOfferResponse.points), the card's log says POINTS_REDEMPTION, the money purse stays, the points PSAM records it`, async () => {
        await redeemLounge(siteId);
      });
    }
  });

  describe("earning points at an enrolled shop", () => {
    it("a purchase's receipt carries the grant; the daemon collects it at once: GetCard shows the points once, the card's log POINTS_CREDIT; EarnPoints again credits nothing more", async () => {
      const before = await cardState();
      const { o, r, grant } = await buy("demo-shop", "ebook-grpc"); // EUR 9.90 at 10 a euro: 99 points
      expect(defined(r.receipt, "the receipt").goods).to.match(/^licence key /);
      const g = defined(grant, "receipt.points_grant");
      expect(g).to.deep.include({ programme: SKYWAYS, siteId: DEMO_SITE.merchantId, siteAddress: site(DEMO_SITE.merchantId).gate.address });
      expect(g.points).to.deep.equal(points(99));
      expect(hexOf(g.purseId?.value)).to.equal(await purseHex());
      expect(r.steps.map((s) => s.name)).to.include.members(["grant", "LOAD command", "confirmation"]);
      // One purchase and one credit: two counter steps.
      expect(await cardState()).to.deep.equal({ money: before.money - 990n, points: before.points + 99n, counter: before.counter + 2 });
      const [credit, purchase] = (await cardholder().listCardTransactions({ limit: 2 })).transactions;
      expect(credit?.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_CREDIT);
      expect(credit?.amount).to.deep.equal(points(99));
      expect(credit?.balanceAfter).to.deep.equal(points(before.points + 99n));
      expect(credit?.transactionId).to.deep.equal(g.grantId);
      expect(purchase?.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_PURCHASE);
      expect(purchase?.transactionId).to.deep.equal(o.transactionId);
      const grantId = defined(g.grantId, "the grant id").value;
      expect(journaledGrant(grantId)?.state).to.equal("CREDITED");
      expect(await siteGrant(grantId)).to.deep.equal({ state: "CREDITED", points: 99 });
      // Again: the card's log shows the credit, the site confirms the same answer; nothing moves.
      const again = await cardholder().earnPoints({ grant: g });
      expect(again.steps.map((s) => s.name)).to.include("card log");
      expect(again.points?.balance).to.deep.equal(points(before.points + 99n));
      expect(await cardState()).to.deep.equal({ money: before.money - 990n, points: before.points + 99n, counter: before.counter + 2 });
      expect((await siteGrant(grantId))?.state).to.equal("CREDITED");
    });

    it("EarnPoints of a credited grant the card's log no longer holds: FAILED_PRECONDITION (GRANT_ALREADY_CREDITED), nothing credited, the journal still says CREDITED", async () => {
      const { grant } = await buy("client-shop", "song-1"); // EUR 0.99: 9 points
      const g = defined(grant, "receipt.points_grant");
      const grantId = defined(g.grantId, "the grant id").value;
      expect(journaledGrant(grantId)?.state).to.equal("CREDITED");
      // The card keeps its last 32 records: 32 authentications push the credit out.
      for (let i = 0; i < 32; i++) await pay(await orderAt(DEMO_SITE.merchantId, "booking"));
      const log = (await cardholder().listCardTransactions({})).transactions;
      expect(log.map((t) => t.transactionId?.value)).to.not.include(grantId);
      const before = await cardState();
      expect(await failure(cardholder().earnPoints({ grant: g }))).to.include({ code: "FAILED_PRECONDITION", reason: "GRANT_ALREADY_CREDITED" });
      expect(await cardState()).to.deep.equal(before);
      expect(journaledGrant(grantId)?.state, "a credited grant stays credited").to.equal("CREDITED");
    });

    it("with the site out of the cardholder's reach during the purchase: goods released, the grant kept OPEN, the purse as paid; once it is back the daemon credits it once", async () => {
      const gate = site(DEMO_SITE.merchantId).gate;
      const before = await cardState();
      await gate.down();
      let g: PointsGrant;
      try {
        const { r, grant } = await buy("server-shop", "ebook-smart-cards"); // EUR 2.50: 25 points
        expect(defined(r.receipt, "the receipt").goods, "the goods never wait for the points").to.match(/^licence key /);
        g = defined(grant, "receipt.points_grant: the shop reached the site");
        expect(g.points).to.deep.equal(points(25));
        expect(r.steps.find((s) => s.name === "points")?.detail).to.match(/^not collected yet/);
        expect(journaledGrant(defined(g.grantId, "grant id").value)?.state).to.equal("OPEN");
        expect((await siteGrant(idOfGrant(g)))?.state).to.equal("GRANTED");
        expect(await cardState()).to.deep.equal({ money: before.money - 250n, points: before.points, counter: before.counter + 1 });
      } finally {
        await gate.up();
      }
      const grantId = idOfGrant(g);
      // The daemon's own round (resume) collects what it kept, once the site answers again.
      await waitFor(
        async () => {
          await net.daemon.daemon.resume();
          return journaledGrant(grantId)?.state === "CREDITED";
        },
        20_000,
        "the kept grant collected",
      );
      expect(await cardState()).to.deep.equal({ money: before.money - 250n, points: before.points + 25n, counter: before.counter + 2 });
      expect((await siteGrant(grantId))?.state).to.equal("CREDITED");
      const log = await newestLog();
      expect(log.kind).to.equal(CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_CREDIT);
      expect(log.transactionId?.value).to.equal(grantId);
      // EarnPoints with the same grant: the card's log shows it credited; nothing more.
      const again = await cardholder().earnPoints({ grant: g });
      expect(again.points?.balance).to.deep.equal(points(before.points + 25n));
      await net.daemon.daemon.resume();
      expect(await cardState()).to.deep.equal({ money: before.money - 250n, points: before.points + 25n, counter: before.counter + 2 });
    });
  });

  describe("attacks: refused, nothing happens to the card", () => {
    /** The enrolled demo shop's own grant of `paidMinor` euro cents for the card `purse` (as the shop asks GrantPoints). */
    async function grantFor(purse: string, paidMinor: number): Promise<PointsGrant> {
      const channel = openChannel(
        site(DEMO_SITE.merchantId).server.address,
        (await net.security.of("merchant", "demo-shop")).channel({ kind: "merchant", id: DEMO_SITE.merchantId }),
      );
      try {
        const asShop = clientFactory().create(BenefitsServiceDefinition, channel);
        const r = await asShop.grantPoints({ transactionId: txnId(randomUUID()), purseId: { value: Buffer.from(purse, "hex") }, amount: eur(paidMinor) });
        return defined(r.grant, "a grant");
      } finally {
        channel.close();
      }
    }

    it("an authentication's debit result M at another site's CompleteOrder: NOT_FOUND for the transaction, SEAL_BROKEN for the other site's own order; nothing released there", async () => {
      const o = await orderAt(DEMO_SITE.merchantId, "booking");
      await pay(o);
      // What the cardholder's machine holds: the confirmation in the daemon's journal.
      const m = Sealed.decode(
        defined(
          row<{ result_m: Buffer }>(
            join(net.paths.client, "client.db"),
            "SELECT result_m FROM client_purchases WHERE transaction_id = ?",
            defined(o.transactionId, "the transaction id").value,
          )?.result_m,
          "the journaled debit result M",
        ),
      );
      const other = site("skyways-server").shop;
      expect(await failure(other.completeOrder({ transactionId: o.transactionId, debitResultM: m }))).to.include({ code: "NOT_FOUND" });
      const theirs = await orderAt("skyways-server", "booking");
      expect(await failure(other.completeOrder({ transactionId: theirs.transactionId, debitResultM: m }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      expect((await other.getOrder({ transactionId: theirs.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    it("the same authentication offer paid twice: ALREADY_EXISTS (TRANSACTION_ID_REUSED), the card untouched", async () => {
      const o = await orderAt("skyways-client", "booking");
      await pay(o);
      const before = await cardState();
      const log = await newestLog();
      expect(await failure(pay(o))).to.include({ code: "ALREADY_EXISTS", reason: "TRANSACTION_ID_REUSED" });
      expect(await cardState()).to.deep.equal(before);
      expect(await newestLog()).to.deep.equal(log);
    });

    it("a redemption beyond the card's points: FAILED_PRECONDITION (INSUFFICIENT_BALANCE) before anything is sent; the card untouched", async () => {
      const before = await cardState();
      expect(Number(before.points)).to.be.below(UPGRADE);
      const pts0 = await psams(SKYWAYS);
      const o = await orderAt(DEMO_SITE.merchantId, "upgrade");
      expect(await failure(pay(o))).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
      await notAtPaymentServer(o);
      expect(await psams(SKYWAYS)).to.deep.equal(pts0);
      expect(await cardState()).to.deep.equal(before);
      expect((await site(DEMO_SITE.merchantId).shop.getOrder({ transactionId: o.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    describe("a card without a points purse of the programme", () => {
      let plainPath: string;
      let plainPurse: string;
      let other: Awaited<ReturnType<typeof startClientDaemon>>;
      let channel: ReturnType<typeof openChannel>;
      before(async () => {
        const issuer = await Issuer.open(net.paths.issuer);
        try {
          plainPath = join(net.paths.cards, "plain.card.json");
          const card = await issuer.personaliseCard({
            path: plainPath,
            currency: 978,
            exponent: 2,
            initialValue: 1_000,
            maxBalance: 5_000,
            expiry: "2031-12-31",
          });
          plainPurse = card.purseId;
        } finally {
          await issuer.close();
        }
        other = await startClientDaemon({ security: net.security.cardholder, card: plainPath, dir: join(net.data, "client-plain"), resumeEveryMs: 3_600_000 });
        channel = openChannel(other.address, { insecure: true }); // the daemon's Unix socket
      });
      after(async () => {
        channel?.close();
        await other?.close();
      });

      it("asked to redeem: FAILED_PRECONDITION (CURRENCY_MISMATCH), nothing sent, its counter unmoved", async () => {
        const c = clientFactory().create(CardholderServiceDefinition, channel);
        const before = defined((await c.getCard({})).purse, "the purse");
        expect((await c.getCard({})).points).to.deep.equal([]);
        const o = await orderAt(DEMO_SITE.merchantId, "lounge");
        expect(await failure(c.payOffer({ offer: o, approvedAmount: o.amount }))).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
        await notAtPaymentServer(o);
        expect((await c.getCard({})).purse).to.deep.equal(before);
      });

      it("its grant handed to the demo card's daemon (EarnPoints): FAILED_PRECONDITION (INVALID_FIELD), nothing signed, nothing credited", async () => {
        const g = await grantFor(plainPurse, 1_000); // 100 points for the plain card
        const before = await cardState();
        expect(await failure(cardholder().earnPoints({ grant: g }))).to.include({ code: "FAILED_PRECONDITION", reason: "INVALID_FIELD" });
        expect(await cardState()).to.deep.equal(before);
        expect((await siteGrant(idOfGrant(g)))?.state, "no credit signed").to.equal("GRANTED");
        expect(journaledGrant(idOfGrant(g)), "refused before it is kept: never tried again").to.equal(undefined);
      });
    });

    it("EarnPoints with a grant whose points the client raised: the programme refuses the card's S1 (PERMISSION_DENIED, BAD_SIGNATURE); nothing credited; the genuine grant still collects once", async () => {
      const g = await grantFor(await purseHex(), 500); // EUR 5.00: 50 points
      const before = await cardState();
      const raised = { ...g, points: points(5_000) };
      expect(await failure(cardholder().earnPoints({ grant: raised }))).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect(await cardState()).to.deep.equal(before);
      expect((await siteGrant(idOfGrant(g)))?.state, "no credit signed").to.equal("GRANTED");
      const r = await cardholder().earnPoints({ grant: g });
      expect(r.points?.balance).to.deep.equal(points(before.points + 50n));
      expect(await cardState()).to.deep.equal({ ...before, points: before.points + 50n, counter: before.counter + 1 });
      expect(await siteGrant(idOfGrant(g))).to.deep.equal({ state: "CREDITED", points: 50 });
    });

    /** Writes into the daemon's journal as a power cut would have left it (the daemon reads another connection's commits). */
    function journal(sql: string, ...args: unknown[]): void {
      const db = new Database(join(net.paths.client, "client.db"));
      try {
        db.prepare(sql).run(...args);
      } finally {
        db.close();
      }
    }

    it("a points LOAD sent whose answer was lost: the card is used for nothing else until it shows whether it took it (UNAVAILABLE, IN_DOUBT while the site is out of reach); then the credit is made once and the purchase goes on", async () => {
      const gate = site(DEMO_SITE.merchantId).gate;
      const g = await grantFor(await purseHex(), 300); // EUR 3.00: 30 points
      const grantId = idOfGrant(g);
      await gate.down();
      try {
        // Kept, not collected: the site is out of reach.
        expect((await failure(cardholder().earnPoints({ grant: g }))).code).to.equal("UNAVAILABLE");
        const before = await cardState();
        // The power cut: the daemon had written LOAD_SENT at the card's counter, and the LOAD never reached the card.
        journal("UPDATE client_grants SET state = 'LOAD_SENT', card_counter = ? WHERE grant_id = ?", before.counter, grantId);
        const o = defined((await defined(net.merchants["demo-shop"], "demo-shop").createOrder({ productId: "song-1" })).offer, "an offer");
        expect(await failure(pay(o))).to.include({ code: "UNAVAILABLE", reason: "IN_DOUBT" });
        expect(await cardState(), "the card untouched while the credit is in doubt").to.deep.equal(before);
        expect(journaledGrant(grantId)?.state).to.equal("LOAD_SENT");
      } finally {
        await gate.up();
      }
      const before = await cardState();
      const { r } = await buy("demo-shop", "song-1"); // EUR 0.99: 9 points, collected too
      expect(r.receipt?.goods).to.match(/^licence key /);
      expect(journaledGrant(grantId)?.state).to.equal("CREDITED");
      expect(await siteGrant(grantId)).to.deep.equal({ state: "CREDITED", points: 30 });
      expect(await cardState(), "30 points of the grant in doubt once, then the purchase and its 9 points").to.deep.equal({
        money: before.money - 99n,
        points: before.points + 30n + 9n,
        counter: before.counter + 3,
      });
    });

    it("a receipt's grant is journaled in the same commit as the receipt: a grant no collection ever started is found and collected", async () => {
      const { o, grant } = await buy("demo-shop", "song-1");
      const g = defined(grant, "the receipt's grant");
      const grantId = idOfGrant(g);
      expect(journaledGrant(grantId)?.state).to.equal("CREDITED");
      const receiptRow = row<{ receipt: Buffer }>(
        join(net.paths.client, "client.db"),
        "SELECT receipt FROM client_purchases WHERE transaction_id = ?",
        o.transactionId?.value,
      );
      expect(receiptRow?.receipt, "the receipt journaled").to.be.instanceOf(Buffer);
    });

    it("an offer naming a merchant id whose address is another merchant's: the confirmation never goes there (the server must prove the offer's merchant), nothing is released there", async () => {
      const shop = defined(net.merchants["demo-shop"], "demo-shop");
      const o = defined((await shop.createOrder({ productId: "song-1" })).offer, "an offer");
      // Another registered merchant's address in place of the demo shop's: its certificate proves skyways, not demo-shop.
      const rogue: PaymentOffer = { ...o, merchantAddress: site(DEMO_SITE.merchantId).server.address };
      const e = await failure(pay(rogue));
      expect(e.code, e.details).to.equal("UNAVAILABLE");
      expect(e.details).to.contain("is not spiffe://").and.contain("/merchant/demo-shop");
      // The card paid (the PSAM's batch has it, clearing pays demo-shop), and the goods wait for demo-shop itself.
      made.purchases++;
      made.money.set("demo-shop", (made.money.get("demo-shop") ?? 0n) + defined(o.amount, "the amount").amountMinor);
    });
  });

  describe("clearing: an authentication never appears as money", () => {
    it("after authentications and redemptions the batches close: no record in 999 anywhere, points apart per site, money totals only the money purchases; the audit is clean", async () => {
      // One more of each, so this holds whatever ran before.
      await pay(await orderAt(DEMO_SITE.merchantId, "booking"));
      await redeemLounge(DEMO_SITE.merchantId);
      const auth = await psams(AUTHENTICATION_CURRENCY);
      expect(auth.batch, "the authentication PSAM's batch").to.equal(0);
      const pts = await psams(SKYWAYS);
      const redemptions = [...made.redemptions.values()].reduce((n, r) => n + r.count, 0);
      const closed = (await net.clients.concentrator.closeBatches({})).closed;
      expect(
        closed.filter((b) => hexOf(b.psamId?.value) === auth.psamId),
        "no batch of the authentication PSAM",
      ).to.deep.equal([]);
      const pointsBatch = closed.find((b) => hexOf(b.psamId?.value) === pts.psamId);
      expect(pointsBatch?.count, "the points PSAM's batch: every redemption").to.equal(redemptions);
      expect(pointsBatch?.total).to.deep.equal(points([...made.redemptions.values()].reduce((n, r) => n + r.points, 0n)));
      let s = defined((await net.clearing.getSettlement({ day: "" })).settlement, "the settlement");
      await waitFor(
        async () => {
          s = defined((await net.clearing.getSettlement({ day: "" })).settlement, "the settlement");
          return s.redemptions === redemptions && s.purchases === made.purchases;
        },
        15_000,
        "clearing posted the batches",
      );
      expect(s.purchases, "money purchases only: no authentication, no redemption").to.equal(made.purchases);
      expect(s.pointsRedeemed).to.deep.equal(
        [...made.redemptions.entries()]
          .sort(([a], [b]) => a.localeCompare(b))
          .map(([merchantId, r]) => ({ programme: SKYWAYS, merchantId, points: r.points, redemptions: r.count })),
      );
      const amounts = [...s.positions.flatMap((p) => [p.receivable, p.payable, p.net]), ...s.payouts.map((p) => p.amount)].filter((m) => m !== undefined);
      expect(new Set(amounts.map((m) => m.currency)), "money in EUR only: nothing in 999, nothing in points").to.deep.equal(new Set([978]));
      const merchants = s.positions.filter((p) => p.kind === PartyKind.PARTY_KIND_MERCHANT);
      expect(
        Object.fromEntries(merchants.filter((p) => p.transactions > 0).map((p) => [p.partyId, p.receivable?.amountMinor])),
        "merchants are owed their money purchases, the sites nothing",
      ).to.deep.equal(Object.fromEntries(made.money));
      expect((await net.clearing.listQuarantined({})).entries, "nothing quarantined").to.deep.equal([]);
      const audit = await net.clearing.runAudit({});
      expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
      expect(audit.ok).to.equal(true);
    });
  });
});
