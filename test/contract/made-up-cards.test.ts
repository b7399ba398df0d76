// The attack from outside, as tests: draw requests built around INITIALIZE
// FOR PURCHASE responses no card made (or a genuine one altered, or one
// genuine one replayed), through the real payment server, concentrator,
// terminal hosts and software PSAMs. The card's cryptogram makes the PSAM
// refuse a response no genuine card gave before it counts anything; the
// payment server's per-purse bound keeps a genuine card's replayed response
// from holding more than a few open debits. Each attack leaves the PSAMs'
// counters as they were and no debit open.

import { expect } from "chai";
import { PurchaseState, type IssuedDebitCommand } from "../../gen/netpurse/payment/v1/payment.js";
import { OrderState, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { SW } from "../../lib/apdu/apdu.js";
import { hexOf } from "../../lib/ids.js";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { PAYMENT_DEFAULTS } from "../../services/payment/server.js";
import {
  alteredInit,
  completeRequest,
  drawRequestFor,
  drawRequestWith,
  failure,
  madeUpInit,
  openCard,
  openIssued,
  openResultC,
  plainDrawRequest,
  sealDrawRequest,
} from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined, termsOf } from "../support/offers.js";
import { psamTotals } from "../support/payment.js";
import { join } from "node:path";

const N = PAYMENT_DEFAULTS.maxUnansweredPerPurse;

describe("contract: a draw request needs a genuine card, and a purse holds at most a few DEBIT commands awaiting its answer", function () {
  this.timeout(120_000);
  let net: Network;
  let card: PurseReader;
  let totals: ReturnType<typeof psamTotals>;

  before(async () => {
    net = await startNetwork({
      terminals: [
        { id: "terminal-1", psams: 2 },
        { id: "terminal-2", psams: 2 },
      ],
      holdTimeoutMs: 2_000,
      proofTimeoutMs: 1_500,
      sweepEveryMs: 300,
    });
    card = await openCard(net.cardPath);
    totals = psamTotals(net);
  });
  after(async () => net?.close());

  const shop = (id: string) => defined(net.merchants[id], `the demo shop ${id}`);
  const offerAt = async (id = "demo-shop", product = "song-1"): Promise<PaymentOffer> =>
    defined((await shop(id).createOrder({ productId: product })).offer, "the shop's offer");
  const stateOf = async (o: PaymentOffer) =>
    defined((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase, "the purchase").state;
  const balance = async (r: PurseReader = card) => (await r.readPurse()).balance;

  /** Every PSAM slot in the pool, by PSAM id: its counter and open debits. */
  async function slots(): Promise<Map<string, { counter: number; open: number }>> {
    const out = new Map<string, { counter: number; open: number }>();
    for (const t of (await net.clients.concentrator.listTerminals({})).terminals)
      for (const s of t.slots) out.set(hexOf(s.psamId?.value), { counter: s.psamCounter, open: s.pendingDebits.length });
    return out;
  }

  async function newCard(name: string): Promise<PurseReader> {
    const issuer = await Issuer.open(net.paths.issuer);
    try {
      const path = join(net.paths.cards, `${name}.card.json`);
      await issuer.personaliseCard({ path, currency: 978, exponent: 2, initialValue: 10_000, maxBalance: 50_000, expiry: "2031-12-31" });
      return openCard(path);
    } finally {
      await issuer.close();
    }
  }

  /** A full honest purchase with a card, confirmed and recorded in its PSAM's batch (so that no PSAM work is left behind). */
  async function honestPurchase(reader: PurseReader, shopId = "demo-shop"): Promise<void> {
    const o = await offerAt(shopId);
    const before = await balance(reader);
    const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(reader, o)));
    const debit = await reader.debit(withOriginalAmount(Buffer.from(issued.debitCommand), termsOf(o).amountMinor));
    expect(debit.sw).to.equal(SW.OK);
    const done = await net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    expect(openResultC(o, done).state).to.be.oneOf([PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED]);
    expect(await balance(reader)).to.equal(before - termsOf(o).amountMinor);
    await waitFor(async () => (await stateOf(o)) === PurchaseState.PURCHASE_STATE_COMPLETED, 20_000, "the purchase to be recorded in its PSAM's batch");
  }

  it("a made-up INITIALIZE response (random purse id) is refused PERMISSION_DENIED BAD_SIGNATURE in every mode: nothing signed, no open debit, REFUSED", async () => {
    for (const id of ["demo-shop", "server-shop", "client-shop", "merchant-shop"]) {
      const o = await offerAt(id);
      const t0 = await totals();
      const req = sealDrawRequest(o, drawRequestWith(o, madeUpInit()));
      const f = await failure(net.clients.payment.processDrawRequest(req));
      expect(f, id).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect(f.details).to.contain("does not prove a genuine card");
      expect(await totals(), id).to.deep.equal(t0);
      expect(await stateOf(o), id).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      // The same draw request again: the same refusal, from the record, without a PSAM.
      expect(await failure(net.clients.payment.processDrawRequest(req))).to.deep.equal(f);
      expect(await totals(), id).to.deep.equal(t0);
      // No DEBIT command, so no debit result M: not even CLIENT_COMPARES releases goods for it.
      expect(defined((await shop(id).getOrder({ transactionId: o.transactionId })).order, "the order").state, id).to.equal(OrderState.ORDER_STATE_OFFERED);
    }
  });

  describe("a genuine INITIALIZE response with one field altered is refused alike", () => {
    const changes: [string, (raw: Buffer) => Buffer][] = [
      ["balance raised", (raw) => alteredInit(raw, { balance: 9_999_999 })],
      ["expiry extended", (raw) => alteredInit(raw, { expiry: "2099-12-31" })],
      ["counter changed", (raw) => alteredInit(raw, { counter: 12_345 })],
    ];
    for (const [what, change] of changes) {
      it(what, async () => {
        const o = await offerAt();
        const before = await balance();
        const t0 = await totals();
        const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, o, change)));
        expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
        expect(await totals()).to.deep.equal(t0);
        expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
        expect(await balance()).to.equal(before);
      });
    }
  });

  it("a flood of 100 draw requests with made-up cards leaves every PSAM with no open debit, and an honest purchase right after goes through", async () => {
    const before = await slots();
    expect(before.size).to.equal(4);
    const offers = await Promise.all(Array.from({ length: 100 }, () => offerAt()));
    const refusals = await Promise.all(
      offers.map((o) => failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, drawRequestWith(o, madeUpInit()))))),
    );
    for (const f of refusals) expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    const after = await slots();
    for (const [psam, s] of after) {
      expect(s.open, `PSAM ${psam} open debits`).to.equal(0);
      expect(s.counter, `PSAM ${psam} counter`).to.equal(before.get(psam)?.counter);
    }
    expect(net.payment.pool.counts().total).to.equal(4); // no PSAM left the pool for refusing a card
    await honestPurchase(card);
  });

  it(`a genuine card's INITIALIZE response replayed into ${N + 1} draw requests gets ${N} DEBIT commands, then the per-purse refusal; once the card answers one, a new purchase goes through`, async () => {
    const replayed = await newCard("replayed");
    const t0 = await totals();
    // One INITIALIZE FOR PURCHASE, its answer packaged into draw requests for N + 2 offers (SERVER_COMPARES: no PSAM is held).
    const offers = await Promise.all(Array.from({ length: N + 2 }, () => offerAt("server-shop")));
    const first = await plainDrawRequest(replayed, defined(offers[0], "an offer"));
    const requests = offers.map((o) => sealDrawRequest(o, drawRequestWith(o, Buffer.from(first.initializeResponse), Buffer.from(first.cardAtr))));
    const issued: IssuedDebitCommand[] = [];
    for (let i = 0; i < N; i++) {
      const o = defined(offers[i], "an offer");
      issued.push(openIssued(o, await net.clients.payment.processDrawRequest(defined(requests[i], "a request"))));
    }
    expect(await totals()).to.include({ counter: t0.counter + N, pending: t0.pending + N });

    // One more, for a new transaction of the same purse: refused before any PSAM is asked, and not recorded.
    const over = defined(offers[N], "an offer");
    const f = await failure(net.clients.payment.processDrawRequest(defined(requests[N], "a request")));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "WRONG_STATE" });
    expect(f.details).to.contain(`the card has ${N} purchases waiting for its answer`);
    expect(f.details).to.contain("finish them");
    expect(await totals()).to.include({ counter: t0.counter + N, pending: t0.pending + N });
    expect((await failure(net.clients.payment.getPurchase({ transactionId: over.transactionId }))).code).to.equal("NOT_FOUND");

    // A retry of a draw request already answered gets its DEBIT command again: it is not counted twice.
    const again = openIssued(defined(offers[0], "an offer"), await net.clients.payment.processDrawRequest(defined(requests[0], "a request")));
    expect(again).to.deep.equal(issued[0]);
    expect((await totals()).counter).to.equal(t0.counter + N);

    // In doubt without an answer (no proof in time), they still count.
    await waitFor(
      async () => (await Promise.all(offers.slice(0, N).map(stateOf))).every((s) => s === PurchaseState.PURCHASE_STATE_IN_DOUBT),
      20_000,
      "the unanswered DEBIT commands to be in doubt",
    );
    const g = await failure(net.clients.payment.processDrawRequest(defined(requests[N + 1], "a request")));
    expect(g).to.include({ code: "FAILED_PRECONDITION", reason: "WRONG_STATE" });
    expect(await totals()).to.include({ counter: t0.counter + N, pending: t0.pending + N });

    // The card answers one of them (its session is still the replayed INITIALIZE's). That proves its counter went
    // to that purchase, so the others at the same counter are reversed in their PSAMs.
    const o0 = defined(offers[0], "an offer");
    const i0 = defined(issued[0], "the first DEBIT command");
    const debit = await replayed.debit(withOriginalAmount(Buffer.from(i0.debitCommand), termsOf(o0).amountMinor));
    expect(debit.sw).to.equal(SW.OK);
    const done = await net.clients.payment.completePurchase(completeRequest(o0, { sw: debit.sw, raw: debit.raw, token: i0.completionToken }));
    expect(openResultC(o0, done).state).to.be.oneOf([PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED]);
    await waitFor(
      async () => (await stateOf(o0)) === PurchaseState.PURCHASE_STATE_COMPLETED,
      20_000,
      "the answered purchase to be recorded in its PSAM's batch",
    );
    await waitFor(
      async () => (await Promise.all(offers.slice(1, N).map(stateOf))).every((s) => s === PurchaseState.PURCHASE_STATE_REVERSED),
      20_000,
      "the other DEBIT commands of the replayed response to be reversed",
    );
    await waitFor(async () => (await totals()).pending === t0.pending, 20_000, "the PSAMs' open debits to be closed");
    expect(await balance(replayed)).to.equal(10_000 - termsOf(o0).amountMinor);

    // Nothing awaits the card now: its next purchase goes through.
    await honestPurchase(replayed, "server-shop");
  });
});
