// Payment servers as replicas on one PostgreSQL database (issue #15): two
// payment servers of one identity, each its own stream to the concentrator,
// share the purchases. Any replica takes any step of any purchase; the same
// step sent to both is done once; a replica that dies mid-purchase leaves
// it to the other, which finishes or reverses it once; the per-purse bound
// holds across them; recovery run by both at once acts once. Each test
// checks what an operator would: the card's balance, the PSAMs' counters,
// open debits and batches, the purchases' states and events.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { join } from "node:path";
import type { Sealed } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState, type IssuedDebitCommand } from "../../gen/netpurse/payment/v1/payment.js";
import { SW } from "../../lib/apdu/apdu.js";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { paths } from "../../services/network/layout.js";
import { PAYMENT_DEFAULTS, startPaymentServer } from "../../services/payment/server.js";
import {
  completeRequest,
  drawRequestFor,
  drawRequestWith,
  failure,
  openCard,
  openIssued,
  openResultC,
  plainDrawRequest,
  sealDrawRequest,
} from "../support/card-client.js";
import { waitFor } from "../support/network.js";
import { defined, termsOf } from "../support/offers.js";
import { startReplicas, type ReplicaName, type Replicas } from "../support/replicas.js";

const N = PAYMENT_DEFAULTS.maxUnansweredPerPurse;
const PAID = [PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED];

describe("contract: payment servers as replicas on one PostgreSQL database", function () {
  this.timeout(120_000);
  let net: Replicas;

  before(async function () {
    this.timeout(120_000);
    net = await startReplicas(this, { proofTimeoutMs: 4_000, sweepEveryMs: 500, maxPsamWaitMs: 3_000, abandonReceivedAfterMs: 4_000 });
  });
  after(async () => net?.close());

  const amountOf = (o: PaymentOffer) => termsOf(o).amountMinor;
  const stateOf = async (o: PaymentOffer) => (await net.purchase(o)).state;
  const completed = (o: PaymentOffer, what = "the purchase to be COMPLETED") =>
    waitFor(async () => (await stateOf(o)) === PurchaseState.PURCHASE_STATE_COMPLETED, 15_000, what);

  async function draw(o: PaymentOffer, at: ReplicaName, card: PurseReader = net.card) {
    const r = await net.payment(at).processDrawRequest(await drawRequestFor(card, o));
    return { r, issued: openIssued(o, r) };
  }

  async function debit(o: PaymentOffer, issued: IssuedDebitCommand, card: PurseReader = net.card) {
    const d = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), amountOf(o)));
    expect(d.sw, "the card's answer to DEBIT").to.equal(SW.OK);
    return d;
  }

  const answer = (o: PaymentOffer, issued: IssuedDebitCommand, d: { sw: number; raw: Buffer }) =>
    completeRequest(o, { sw: d.sw, raw: d.raw, token: issued.completionToken });

  /** The shop releases the goods for the debit result M (validated by its validation service). */
  async function goods(shopId: string, o: PaymentOffer, m: Sealed | undefined, debitResponse?: Buffer) {
    const r = await net.shop(shopId).completeOrder({ transactionId: o.transactionId, debitResultM: m, ...(debitResponse ? { debitResponse } : {}) });
    expect(r.receipt?.goods, "the goods released").to.match(/^licence key/);
  }

  /**
   * Ends the session holding the transaction's lock (payment:ID), as a
   * database restart or pg_terminate_backend would: its holder goes on, not
   * knowing yet. How many sessions were ended.
   */
  async function cutLockSession(transactionId: string): Promise<number> {
    const r = await net.sql.query<{ n: string }>(
      `SELECT COUNT(pg_terminate_backend(l.pid)) AS n FROM pg_locks l, (SELECT hashtextextended($1, 0) AS k) AS n
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
          AND l.classid::bigint = ((n.k >> 32) & 4294967295) AND l.objid::bigint = (n.k & 4294967295)`,
      [`payment:${transactionId}`],
    );
    return Number(r.rows[0]?.n ?? 0);
  }

  /** Runs `act` inside replica `at`'s step, just before it writes its DEBIT command of `o` (the PSAM has signed). */
  function beforeRecording(at: ReplicaName, o: PaymentOffer, act: () => Promise<void>): void {
    net.replica(at).store.beforeWrite = async (id, steps) => {
      if (id !== o.transactionId?.value || !steps.some((s) => s.step === "debit_command_issued")) return;
      net.replica(at).store.beforeWrite = undefined;
      await act();
    };
  }

  describe("a purchase whose draw request went to A is finished through B", () => {
    it("PSAM_VERIFIES: A gives the PSAM it holds to B, whose CompletePurchase it signed; paid once, recorded once", async () => {
      const o = await net.offerAt("demo-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { issued } = await draw(o, "a");
      expect(net.replica("a").pool.counts().leased, "A holds the signing PSAM for the card's answer").to.equal(1);
      const d = await debit(o, issued);
      const done = await net.payment("b").completePurchase(answer(o, issued, d));
      expect(openResultC(o, done).state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
      await goods("demo-shop", o, done.debitResultM);
      expect(net.replica("a").pool.counts().leased, "A no longer holds it").to.equal(0);
      expect(await net.balance()).to.equal(before - amountOf(o));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
      expect(await net.stepCount(o, "purchase_confirmed")).to.equal(1);
      await waitFor(async () => (await net.purchase(o, "b")).events.some((e) => /another payment server/.test(e.detail)), 5_000, "A's hand-over logged");
    });

    it("SERVER_COMPARES: B compares the card's signature with the one A's PSAM expected, and records the proof", async () => {
      const o = await net.offerAt("server-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { issued } = await draw(o, "a");
      expect(net.replica("a").pool.counts().leased, "released with the DEBIT command").to.equal(0);
      const d = await debit(o, issued);
      const done = await net.payment("b").completePurchase(answer(o, issued, d));
      expect(openResultC(o, done).state).to.be.oneOf(PAID);
      await goods("server-shop", o, done.debitResultM);
      await completed(o);
      expect(await net.balance()).to.equal(before - amountOf(o));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
      expect(await net.stepCount(o, "card_signature_matched")).to.equal(1);
      expect(await net.stepCount(o, "recorded_in_batch")).to.equal(1);
    });

    it("CLIENT_COMPARES: the goods on A's debit result M, the client's report of the card's signature to B", async () => {
      const o = await net.offerAt("client-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { r, issued } = await draw(o, "a");
      const d = await debit(o, issued);
      await goods("client-shop", o, r.debitResultM);
      const ack = await net.payment("b").reportCardSignature({ transactionId: o.transactionId, debitResponse: d.raw });
      expect(ack.state).to.be.oneOf(PAID);
      await completed(o);
      expect(await net.balance()).to.equal(before - amountOf(o));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
      expect(await net.stepCount(o, "recorded_in_batch")).to.equal(1);
    });

    it("MERCHANT_COMPARES: the merchant compares, and its validation service reports the proof to B", async () => {
      const o = await net.offerAt("merchant-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { r, issued } = await draw(o, "a");
      const d = await debit(o, issued);
      await goods("merchant-shop", o, r.debitResultM, d.raw);
      await completed(o, "the validation service's report to reach B and the PSAM's batch");
      const outbox = await net.validation.reporter.rows();
      expect(outbox.find((x) => x.transaction_id === o.transactionId?.value)).to.include({ state: "ACKNOWLEDGED" });
      expect(await net.balance()).to.equal(before - amountOf(o));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
    });

    it("the hand-over of a held PSAM adds at most a few hundred ms to CompletePurchase at the other replica (measured)", async () => {
      const timed = async (at: ReplicaName) => {
        const o = await net.offerAt("demo-shop");
        const { issued } = await draw(o, "a");
        const d = await debit(o, issued);
        const started = process.hrtime.bigint();
        const done = await net.payment(at).completePurchase(answer(o, issued, d));
        const ms = Number(process.hrtime.bigint() - started) / 1e6;
        expect(openResultC(o, done).state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
        return ms;
      };
      const median = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)] ?? NaN;
      const atHolder: number[] = [];
      const atOther: number[] = [];
      for (let i = 0; i < 5; i++) {
        atHolder.push(await timed("a"));
        atOther.push(await timed("b"));
      }
      const added = median(atOther) - median(atHolder);
      console.log(
        `      CompletePurchase (PSAM_VERIFIES), median of 5: at the replica holding the PSAM ${median(atHolder).toFixed(1)} ms, ` +
          `at the other ${median(atOther).toFixed(1)} ms (added ${added.toFixed(1)} ms; max ${Math.max(...atOther).toFixed(1)} ms)`,
      );
      expect(added, "ms added by the hand-over").to.be.below(1_000);
    });
  });

  describe("one step sent to both", () => {
    it("the same CompletePurchase sent to A and B at once completes once: one verdict, one batch record, one debit", async () => {
      for (const shopId of ["demo-shop", "server-shop"]) {
        const o = await net.offerAt(shopId);
        const t0 = await net.psams();
        const before = await net.balance();
        const { issued } = await draw(o, "a");
        const req = answer(o, issued, await debit(o, issued));
        const [x, y] = await Promise.all([net.payment("a").completePurchase(req), net.payment("b").completePurchase(req)]);
        expect(openResultC(o, x).state, shopId).to.be.oneOf(PAID);
        expect(openResultC(o, y).state, shopId).to.be.oneOf(PAID);
        await completed(o);
        expect(await net.balance(), shopId).to.equal(before - amountOf(o));
        expect(await net.psams(), shopId).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
        expect(await net.stepCount(o, "debit_response_received"), shopId).to.equal(1);
        const verdict = shopId === "demo-shop" ? "purchase_confirmed" : "recorded_in_batch";
        expect(await net.stepCount(o, verdict), shopId).to.equal(1);
      }
    });
  });

  describe("a replica that dies after the DEBIT command left it", () => {
    afterEach(async () => {
      if (!net) return;
      // A comes back for the next test, on the same database.
      try {
        net.replica("a");
      } catch {
        await net.startReplica("a");
      }
    });

    it("leaves its purchase to the other: B finishes it with the PSAM A held, once", async () => {
      const o = await net.offerAt("demo-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { issued } = await draw(o, "a");
      const d = await debit(o, issued);
      await net.crash("a");
      const done = await net.payment("b").completePurchase(answer(o, issued, d));
      expect(openResultC(o, done).state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
      await goods("demo-shop", o, done.debitResultM);
      expect(await net.balance()).to.equal(before - amountOf(o));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch + 1 });
      expect(await net.stepCount(o, "purchase_confirmed")).to.equal(1);
      // Started again, A finds nothing of its own to end: the purchase is B's record, final.
      await net.startReplica("a");
      expect((await net.purchase(o, "a")).state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
      expect(await net.stepCount(o, "purchase_confirmed")).to.equal(1);
    });

    it("a draw request A works on is left alone by B's recovery and start-up rule; once A dies, B's sweep ends it past the bound, once", async () => {
      const t0 = await net.psams();
      const before = await net.balance();
      // Both PSAMs held by B for card answers (PSAM_VERIFIES), so that A's draw request waits for one (its lock let go meanwhile).
      const held = [];
      for (let i = 0; i < 2; i++) {
        const o = await net.offerAt("demo-shop");
        held.push({ o, ...(await draw(o, "b")) });
      }
      const o = await net.offerAt("client-shop");
      const req = await drawRequestFor(net.card, o);
      const waiting = failure(net.payment("a").processDrawRequest(req));
      const recorded = () =>
        net
          .payment("b")
          .getPurchase({ transactionId: o.transactionId })
          .then(
            () => true,
            () => false,
          );
      await waitFor(recorded, 5_000, "A's record of the draw request");
      expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
      // B's start-up rule (a replica starting now) and its sweep leave it: younger than --abandon-received-after-ms, it is A's.
      await net.replica("b").recovery.abandonLeftByPreviousRun(new Date());
      await net.replica("b").recovery.sweep();
      expect(await stateOf(o), "left to A, which works on it").to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
      await net.crash("a");
      expect((await waiting).code).to.be.oneOf(["UNAVAILABLE", "CANCELLED", "RESOURCE_EXHAUSTED"]);
      // Still younger than the bound: a retry may come (to B), so B's start-up rule leaves it still.
      await net.replica("b").recovery.abandonLeftByPreviousRun(new Date());
      expect(await stateOf(o), "left for the client's retry").to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
      // Past the bound, B's sweep ends it (and two more sweeps at once change nothing): once.
      await waitFor(async () => (await stateOf(o)) === PurchaseState.PURCHASE_STATE_REFUSED, 15_000, "the row ended by B's sweep");
      await Promise.all([net.replica("b").recovery.sweep(), net.replica("b").recovery.sweep()]);
      expect(await net.stepCount(o, "draw_request_abandoned")).to.equal(1);
      expect(await failure(net.payment("b").processDrawRequest(req))).to.include({ code: "FAILED_PRECONDITION", reason: "DRAW_REQUEST_ABANDONED" });
      // The two held ones: the card answered neither (its log shows it), so both are reversed.
      for (const h of held) {
        const notDebited = completeRequest(h.o, { sw: 0, raw: Buffer.alloc(0), token: h.issued.completionToken, logProvesNoDebit: true });
        expect(await failure(net.payment("b").completePurchase(notDebited))).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_REFUSED" });
      }
      expect(await net.balance()).to.equal(before);
      expect(await net.psams(), "no PSAM signed for the ended draw request").to.deep.equal({ counter: t0.counter + 2, pending: t0.pending, batch: t0.batch });
    });

    it("leaves its purchase to the other: the card never debited, B reverses it in the PSAM, once", async () => {
      const o = await net.offerAt("server-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const { issued } = await draw(o, "a");
      expect((await net.psams()).pending).to.equal(t0.pending + 1);
      await net.crash("a");
      // The card lost the DEBIT command: its log shows no such debit, which the client reports.
      const notDebited = completeRequest(o, { sw: 0, raw: Buffer.alloc(0), token: issued.completionToken, logProvesNoDebit: true });
      const f = await failure(net.payment("b").completePurchase(notDebited));
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_REFUSED" });
      expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
      // Asked again: the same answer, from the record, and nothing more reversed.
      expect(await failure(net.payment("b").completePurchase(notDebited))).to.deep.equal(f);
      expect(await net.balance()).to.equal(before);
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch });
      expect(await net.stepCount(o, "reversed_never_debited")).to.equal(1);
    });
  });

  describe("a replica whose lock is lost in the middle of a draw request", () => {
    afterEach(async () => {
      if (!net) return;
      try {
        net.replica("a").store.beforeWrite = undefined;
      } catch {
        await net.startReplica("a");
      }
    });

    for (const [shopId, mode] of [
      ["server-shop", "SERVER_COMPARES (its PSAM given back before the record)"],
      ["demo-shop", "PSAM_VERIFIES (its PSAM held)"],
    ] as const) {
      it(`${mode}: B ends the purchase before it reverses the debit; A's DEBIT command never leaves, its debit is reversed once, nothing paid`, async () => {
        const o = await net.offerAt(shopId);
        const id = defined(o.transactionId?.value, "the transaction id");
        const t0 = await net.psams();
        const before = await net.balance();
        let cut = 0;
        // A's PSAM signed; before A records its command, A's lock session dies (A goes on, not knowing), and B, which takes
        // the lock at once, is shown the PSAM's open debit (as the concentrator's update shows it to every replica).
        beforeRecording("a", o, async () => {
          cut = await cutLockSession(id);
          const open = defined(await net.slotHolding(id), "the PSAM's open debit");
          net.replica("b").recovery.onSlot(open.terminalId, open.slot);
          await waitFor(
            async () => (await stateOf(o)) !== PurchaseState.PURCHASE_STATE_RECEIVED || (await net.slotHolding(id)) === undefined,
            10_000,
            "B to act on the open debit",
          );
        });
        const req = await drawRequestFor(net.card, o);
        const f = await failure(net.payment("a").processDrawRequest(req));
        expect(cut, "A's lock session ended").to.equal(1);
        // A answers with the ending B recorded; the command its PSAM signed never left it.
        expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "DRAW_REQUEST_ABANDONED" });
        expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
        expect(await net.stepCount(o, "debit_command_issued")).to.equal(0);
        await waitFor(async () => (await net.psams()).pending === t0.pending, 15_000, "the unsent command's debit reversed");
        await waitFor(async () => (await net.stepCount(o, "orphan_debit_reversed")) === 1, 5_000, "its reversal logged");
        expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch });
        expect(await net.stepCount(o, "draw_request_abandoned")).to.equal(1);
        expect(await net.balance()).to.equal(before);
        // Asked again, at either replica: the same ending, and no PSAM signs again.
        for (const at of ["a", "b"] as const) {
          expect(await failure(net.payment(at).processDrawRequest(req))).to.include({ code: "FAILED_PRECONDITION", reason: "DRAW_REQUEST_ABANDONED" });
        }
        expect((await net.psams()).counter).to.equal(t0.counter + 1);
        expect(await net.stepCount(o, "orphan_debit_reversed")).to.equal(1);
      });
    }

    it("PSAM_VERIFIES: a DEBIT command whose record cannot be written (A's database connections cut) gives its PSAM back", async () => {
      const o = await net.offerAt("demo-shop");
      const t0 = await net.psams();
      const before = await net.balance();
      const a = net.replica("a");
      beforeRecording("a", o, () => a.cutDatabase());
      const f = await failure(net.payment("a").processDrawRequest(await drawRequestFor(net.card, o)));
      expect(f.code).to.equal("UNAVAILABLE");
      // Back in A's pool and at the concentrator: B sees both PSAMs free.
      expect(a.pool.counts()).to.deep.equal({ free: 2, leased: 0, total: 2 });
      await waitFor(() => net.replica("b").pool.counts().free === 2, 5_000, "both PSAMs free for B");
      // The command was never recorded: B ends the purchase and reverses the debit its PSAM holds.
      await waitFor(async () => (await net.psams()).pending === t0.pending, 15_000, "the unrecorded command's debit reversed");
      expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 1, pending: t0.pending, batch: t0.batch });
      expect(await net.balance()).to.equal(before);
      await net.crash("a"); // its store answers nothing more; started again after the test
    });
  });

  describe("a replica that starts", () => {
    it("leaves the other replicas' RECEIVED rows younger than --abandon-received-after-ms: the client's retry gets its DEBIT command", async () => {
      const o = await net.offerAt("server-shop");
      const before = await net.balance();
      await net.stopHost();
      const req = await drawRequestFor(net.card, o);
      expect(await failure(net.payment("b").processDrawRequest(req))).to.include({ code: "FAILED_PRECONDITION", reason: "NO_PSAM_ATTACHED" });
      expect(await stateOf(o)).to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
      await net.startHost();
      // A starts again: B's row, left for the client's retry, is not A's previous run's.
      await net.crash("a");
      await net.startReplica("a");
      expect(await stateOf(o), "left for the retry").to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
      expect(await net.stepCount(o, "draw_request_abandoned")).to.equal(0);
      const issued = openIssued(o, await net.payment("b").processDrawRequest(req));
      const done = await net.payment("a").completePurchase(answer(o, issued, await debit(o, issued)));
      expect(openResultC(o, done).state).to.be.oneOf(PAID);
      await completed(o);
      expect(await net.balance()).to.equal(before - amountOf(o));
    });
  });

  describe("the per-purse bound", () => {
    it(`the per-purse bound holds across replicas: ${N + 3} draw requests of one card sent to both at once get ${N} DEBIT commands`, async () => {
      const issuer = await Issuer.open(paths(net.data).issuer);
      const cardPath = join(paths(net.data).cards, "replayed.card.json");
      try {
        await issuer.personaliseCard({ path: cardPath, currency: 978, exponent: 2, initialValue: 10_000, maxBalance: 50_000, expiry: "2031-12-31" });
      } finally {
        await issuer.close();
      }
      const replayed = await openCard(cardPath);
      const t0 = await net.psams();
      // One INITIALIZE FOR PURCHASE, its answer in draw requests for N + 3 offers (SERVER_COMPARES: no PSAM is held), half to each replica.
      const offers = await Promise.all(Array.from({ length: N + 3 }, () => net.offerAt("server-shop")));
      const first = await plainDrawRequest(replayed, defined(offers[0], "an offer"));
      const outcomes = await Promise.all(
        offers.map(async (o, i) => {
          const req = sealDrawRequest(o, drawRequestWith(o, Buffer.from(first.initializeResponse), Buffer.from(first.cardAtr)));
          const at: ReplicaName = i % 2 === 0 ? "a" : "b";
          try {
            return { o, issued: openIssued(o, await net.payment(at).processDrawRequest(req)) };
          } catch {
            return { o, refused: await failure(net.payment(at).processDrawRequest(req)) };
          }
        }),
      );
      const issued = outcomes.filter((x) => x.issued);
      const refused = outcomes.filter((x) => x.refused);
      expect(issued, "DEBIT commands").to.have.length(N);
      for (const x of refused) {
        expect(x.refused).to.include({ code: "FAILED_PRECONDITION", reason: "WRONG_STATE" });
        expect(x.refused?.details).to.contain(`the card has ${N} purchases waiting for its answer`);
        // Not recorded: the same draw request may go through once the card has answered.
        expect((await failure(net.payment("b").getPurchase({ transactionId: x.o.transactionId }))).code).to.equal("NOT_FOUND");
      }
      expect(await net.psams()).to.include({ counter: t0.counter + N, pending: t0.pending + N });

      // The card answers one; that proves its counter went there, and the others at that counter are reversed.
      const one = defined(issued[0], "a DEBIT command");
      const d = await debit(one.o, defined(one.issued, "its command"), replayed);
      const done = await net.payment("b").completePurchase(answer(one.o, defined(one.issued, "its command"), d));
      expect(openResultC(one.o, done).state).to.be.oneOf(PAID);
      await completed(one.o);
      for (const x of issued.slice(1)) await waitFor(async () => (await stateOf(x.o)) === PurchaseState.PURCHASE_STATE_REVERSED, 15_000, "the others reversed");
      await waitFor(async () => (await net.psams()).pending === t0.pending, 15_000, "the PSAMs' open debits closed");
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + N, pending: t0.pending, batch: t0.batch + 1 });
      expect((await replayed.readPurse()).balance).to.equal(10_000 - amountOf(one.o));
    });
  });

  describe("recovery", () => {
    it("recovery run by both replicas at once acts once on each purchase left waiting", async () => {
      const t0 = await net.psams();
      const before = await net.balance();
      // p1 (SERVER_COMPARES) and p2 (PSAM_VERIFIES, signed at B, which holds the PSAM) debited by the card; p3 never answered.
      const p1 = await net.offerAt("server-shop");
      const s1 = await draw(p1, "a");
      const d1 = await debit(p1, s1.issued);
      const p2 = await net.offerAt("demo-shop");
      const s2 = await draw(p2, "b");
      const d2 = await debit(p2, s2.issued);
      const p3 = await net.offerAt("server-shop");
      const s3 = await draw(p3, "a");
      await net.stopHost();
      // p1's answer is proven on arrival (the expected signature), its record in the batch waits for the PSAM; p2's waits for the PSAM to rule.
      expect(openResultC(p1, await net.payment("b").completePurchase(answer(p1, s1.issued, d1))).state).to.equal(PurchaseState.PURCHASE_STATE_PROVEN);
      expect(await failure(net.payment("a").completePurchase(answer(p2, s2.issued, d2)))).to.include({ code: "UNAVAILABLE", reason: "IN_DOUBT" });
      // p4 never gets its DEBIT command: RECEIVED, to be ended.
      const p4 = await net.offerAt("client-shop");
      expect(await failure(net.payment("a").processDrawRequest(await drawRequestFor(net.card, p4)))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "NO_PSAM_ATTACHED",
      });
      expect(await stateOf(p4)).to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);

      // Past the proof time and the RECEIVED bound, both sweep (on their own, and here both at once).
      await waitFor(async () => (await stateOf(p3)) === PurchaseState.PURCHASE_STATE_IN_DOUBT, 15_000, "p3 in doubt");
      await waitFor(async () => (await stateOf(p4)) === PurchaseState.PURCHASE_STATE_REFUSED, 15_000, "p4 ended");
      await Promise.all([net.replica("a").recovery.sweep(), net.replica("b").recovery.sweep()]);
      expect(await net.stepCount(p3, "no_proof_in_time")).to.equal(1);
      expect(await net.stepCount(p4, "draw_request_abandoned")).to.equal(1);

      // The PSAMs are back: both replicas hear it at once, and both sweep.
      await net.startHost();
      await Promise.all([net.replica("a").recovery.sweep(), net.replica("b").recovery.sweep()]);
      await completed(p1, "p1's proof in its PSAM's batch");
      await completed(p2, "p2 ruled on by its PSAM");
      await Promise.all([net.replica("a").recovery.sweep(), net.replica("b").recovery.sweep()]);
      expect(await net.stepCount(p1, "recorded_in_batch")).to.equal(1);
      expect(await net.stepCount(p2, "purchase_confirmed")).to.equal(1);

      // p3's card never debited, as its log shows: reversed in its PSAM.
      const f = await failure(
        net.payment("b").completePurchase(completeRequest(p3, { sw: 0, raw: Buffer.alloc(0), token: s3.issued.completionToken, logProvesNoDebit: true })),
      );
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_REFUSED" });
      expect(await net.balance()).to.equal(before - amountOf(p1) - amountOf(p2));
      expect(await net.psams()).to.deep.equal({ counter: t0.counter + 3, pending: t0.pending, batch: t0.batch + 2 });
    });
  });

  describe("after all of the above", () => {
    it("leaves no purchase in a state that is not final, and the money adds up: each card paid exactly its completed purchases, each in a batch", async () => {
      await waitFor(async () => Object.keys(await net.nonFinal()).length === 0, 15_000, "every purchase final");
      const rows = await net.rows();
      const completedRows = rows.filter((r) => r.state === "COMPLETED");
      const demoPurse = (await net.card.readPurse()).purseId.toString("hex");
      const paidBy = (purse: string) => completedRows.filter((r) => r.purse_id === purse).reduce((n, r) => n + Number(r.amount_minor), 0);
      expect(await net.balance()).to.equal(10_000 - paidBy(demoPurse));
      const psams = await net.psams();
      expect(psams.pending, "open debits").to.equal(0);
      expect(psams.batch, "batch records").to.equal(completedRows.length);
      // Each signed command is a completed or reversed purchase's, or one never recorded, whose purchase was ended and its debit reversed.
      const unrecorded = await net.sql.query<{ transaction_id: string }>(
        "SELECT DISTINCT e.transaction_id FROM purchase_events e JOIN purchases p USING (transaction_id) WHERE p.state = 'REFUSED' AND e.step = 'orphan_debit_reversed'",
      );
      expect(psams.counter, "DEBIT commands signed").to.equal(
        rows.filter((r) => r.state === "COMPLETED" || r.state === "REVERSED").length + unrecorded.rows.length,
      );
    });
  });
});

describe("contract: replicas started without --replica, with fewer lock connections than draw requests", function () {
  this.timeout(120_000);
  let net: Replicas;
  const LOCK_POOL = 2;
  const DRAWS = 8;

  before(async function () {
    this.timeout(120_000);
    // No --replica: each names itself HOSTNAME-PID (-2 for the second in this process). Two lock connections each.
    net = await startReplicas(this, { unnamed: true, lockPoolSize: LOCK_POOL, maxUnansweredPerPurse: 20, maxPsamWaitMs: 5_000 });
  });
  after(async () => net?.close());

  /** Its stderr lines while `during` runs. */
  async function stderrOf(during: (lines: string[]) => Promise<void>): Promise<string[]> {
    const lines: string[] = [];
    const write = process.stderr.write.bind(process.stderr);
    process.stderr.write = (chunk: string | Uint8Array, ...rest: never[]) => {
      lines.push(String(chunk));
      return write(chunk, ...rest);
    };
    try {
      await during(lines);
    } finally {
      process.stderr.write = write;
    }
    return lines;
  }

  it("each takes HOSTNAME-PID as its replica id on PostgreSQL: both are welcomed by the concentrator", async () => {
    const streams = (await net.paymentStreams()).filter((p) => p.paymentServerId === "payment-1");
    expect(streams).to.have.length(2);
    const own = `${hostname().replace(/[^A-Za-z0-9._-]/g, "-")}-${process.pid}`.replace(/[.]/g, "\\.");
    for (const s of streams) expect(s.replicaId).to.match(new RegExp(`^${own}(-\\d+)?$`));
    expect(new Set(streams.map((s) => s.replicaId)).size, "distinct replica ids").to.equal(2);
  });

  it("one more started with a replica id already connected is refused by the concentrator, and says why: give each replica its own --replica", async () => {
    const taken = defined((await net.paymentStreams())[0], "a stream").replicaId;
    const lines = await stderrOf(async (lines) => {
      const third = await startPaymentServer({ ...net.config("a"), replicaId: taken });
      try {
        await waitFor(
          () => lines.some((l) => / payment error .*give each replica its own --replica/.test(l) && l.includes(taken)),
          15_000,
          "the refusal logged",
        );
        // Its health says why it cannot serve, so that an operator looking at a balancer's view of it knows.
        await waitFor(() => lines.some((l) => / payment warn not serving .*give each replica its own --replica/.test(l)), 15_000, "its health's reason");
      } finally {
        await third.close();
      }
    });
    expect(lines.filter((l) => l.includes("give each replica its own --replica")).length).to.be.above(0);
    // The two it would have replaced are still there.
    expect((await net.paymentStreams()).filter((p) => p.paymentServerId === "payment-1")).to.have.length(2);
  });

  it(`${DRAWS} draw requests waiting for a PSAM at a replica with ${LOCK_POOL} lock connections hold none: the card answers that free the PSAMs go through at once, and every draw request gets its DEBIT command within its deadline`, async () => {
    const card = net.card;
    const before = await net.balance();
    const amountOf = (o: PaymentOffer) => termsOf(o).amountMinor;
    // Both PSAMs held by A for the card's answers (PSAM_VERIFIES); the card has answered both.
    const held: { o: PaymentOffer; req: ReturnType<typeof completeRequest> }[] = [];
    for (let i = 0; i < 2; i++) {
      const o = await net.offerAt("demo-shop");
      const issued = openIssued(o, await net.payment("a").processDrawRequest(await drawRequestFor(card, o)));
      const d = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), amountOf(o)));
      expect(d.sw).to.equal(SW.OK);
      held.push({ o, req: completeRequest(o, { sw: d.sw, raw: d.raw, token: issued.completionToken }) });
    }
    expect(net.replica("a").pool.counts()).to.include({ free: 0, leased: 2 });
    // More draw requests than A's lock connections, all at once (SERVER_COMPARES): each waits for a PSAM.
    const offers = await Promise.all(Array.from({ length: DRAWS }, () => net.offerAt("server-shop")));
    const requests = [];
    for (const o of offers) requests.push(await drawRequestFor(card, o));
    const DEADLINE_MS = 6_000;
    const sent = Date.now();
    const draws = requests.map(async (r, i) => {
      const call = net.payment("a").processDrawRequest(r, { deadline: new Date(sent + DEADLINE_MS) });
      try {
        const res = await call;
        return { ms: Date.now() - sent, issued: openIssued(defined(offers[i], "its offer"), res) };
      } catch {
        return { ms: Date.now() - sent, refused: await failure(call) };
      }
    });
    await waitFor(() => net.replica("a").pool.waiting() === DRAWS, 5_000, "every draw request waiting for a PSAM");
    // The card's answers reach A: no lock connection is taken by the waiting draw requests, so they go through at once.
    const asked = Date.now();
    const done = await Promise.all(held.map((h) => net.payment("a").completePurchase(h.req)));
    const completeMs = Date.now() - asked;
    held.forEach((h, i) => expect(openResultC(h.o, defined(done[i], "its answer")).state).to.be.oneOf(PAID));
    expect(completeMs, "ms for both CompletePurchase calls").to.be.below(1_500);
    const outcomes = await Promise.all(draws);
    for (const x of outcomes) expect(x.ms, "ms to an answer").to.be.below(DEADLINE_MS);
    expect(
      outcomes.filter((x) => "refused" in x).map((x) => ("refused" in x ? x.refused : undefined)),
      "refusals",
    ).to.deep.equal([]);
    expect(outcomes.filter((x) => "issued" in x)).to.have.length(DRAWS);
    expect(await net.balance()).to.equal(before - held.reduce((n, h) => n + amountOf(h.o), 0));
  });

  it(`with both of A's ${LOCK_POOL} lock connections held by steps under way, CompletePurchase and ReportCardSignature of made-up transactions are answered NOT_FOUND at once`, async () => {
    const a = net.replica("a");
    // Two draw requests stopped in their step, each holding its lock (and so one of A's two lock connections).
    let resume!: () => void;
    const stopped = new Promise<void>((r) => (resume = r));
    let inStep = 0;
    a.store.beforeWrite = async (_id, steps) => {
      if (!steps.some((s) => s.step === "debit_command_issued")) return;
      inStep++;
      await stopped;
    };
    try {
      const offers = await Promise.all([net.offerAt("server-shop"), net.offerAt("server-shop")]);
      const requests = [];
      for (const o of offers) requests.push(await drawRequestFor(net.card, o));
      const draws = requests.map((r) => net.payment("a").processDrawRequest(r));
      await waitFor(() => inStep === 2, 5_000, "both draw requests in their step");
      const madeUp = { value: randomUUID() };
      const started = Date.now();
      const complete = await failure(
        net.payment("a").completePurchase({ transactionId: madeUp, cardAnswer: { iv: Buffer.alloc(12), ciphertext: Buffer.alloc(32) } }, { deadline: 3_000 }),
      );
      const report = await failure(net.payment("a").reportCardSignature({ transactionId: madeUp, debitResponse: Buffer.alloc(17) }, { deadline: 3_000 }));
      expect(Date.now() - started, "ms for both answers").to.be.below(1_000);
      for (const f of [complete, report]) {
        expect(f).to.include({ code: "NOT_FOUND", reason: "NOT_FOUND" });
        expect(f.details).to.contain(`transaction ${madeUp.value} is unknown to this payment server`);
      }
      resume();
      for (const [i, d] of draws.entries()) expect(openIssued(defined(offers[i], "its offer"), await d).debitCommand).to.have.length.above(0);
    } finally {
      a.store.beforeWrite = undefined;
      resume();
    }
  });
});
