// Contract: the offer binds the draw request (issue #9). The merchant's
// validation service seals the offer's merchant, amount and expiry with the
// transaction session key (the ETSK holds a SessionKeyGrant); the payment
// server refuses a draw request of other terms (PERMISSION_DENIED,
// OFFER_MISMATCH) or after the expiry (FAILED_PRECONDITION, OFFER_EXPIRED)
// before it records anything or asks a PSAM, so the card is never debited.
// A draw request it already recorded gets its recorded answer after the
// expiry too.

import { expect } from "chai";
import { join } from "node:path";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { ErrorReason, SessionKeyGrant } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState, type DrawRequest } from "../../gen/netpurse/payment/v1/payment.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { open, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import { requireGrantedTerms } from "../../services/payment/transaction-keys.js";
import { completeRequest, drawRequestFor, failure, openCard, openIssued, openResultC, plainDrawRequest, sealDrawRequest } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined, grantedOffer, termsOf } from "../support/offers.js";
import { psamTotals } from "../support/payment.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** Waits until just after the offer's expiry. */
const pastExpiry = (o: PaymentOffer) => sleep(Math.max(0, termsOf(o).expiresAt.getTime() - Date.now()) + 50);

describe("contract: the offer binds the draw request (SessionKeyGrant)", function () {
  this.timeout(60_000);
  let net: Network;
  let card: PurseReader;
  let totals: ReturnType<typeof psamTotals>;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], holdTimeoutMs: 30_000 });
    card = await openCard(net.cardPath);
    totals = psamTotals(net);
  });
  after(async () => net?.close());

  const offer = async (product = "ebook-grpc"): Promise<PaymentOffer> =>
    defined((await net.clients.merchant.createOrder({ productId: product })).offer, "an offer");
  const purse = async () => {
    const p = await card.readPurse();
    return { balance: p.balance, counter: p.counter };
  };
  const notRecorded = async (o: PaymentOffer) =>
    expect((await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }))).code, "GetPurchase").to.equal("NOT_FOUND");
  const state = async (o: PaymentOffer) => defined((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase, "the purchase").state;

  /** A purchase of the offer's own terms, to the end. */
  async function pay(o: PaymentOffer, issuedAlready?: ReturnType<typeof openIssued>) {
    const issued = issuedAlready ?? openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), termsOf(o).amountMinor));
    const done = await net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    expect(openResultC(o, done).state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
  }

  it("the ETSK holds the TSK with the offer's merchant, amount and expiry, which only the operator's copy of the key opens", async () => {
    const o = await offer();
    const { id } = termsOf(o);
    const merchant = defined(o.merchantId, "the offer's merchant id").value;
    const key = defined(await new MerchantRegistry(join(net.paths.payment, "merchants.json")).get(merchant), "the merchant's registration").key;
    const plain = open(transactionKey(key, merchant, id, o.keyNonce), "SESSION_KEY", id, o.encryptedSessionKey);
    const grant = SessionKeyGrant.decode(defined(plain, "the opened ETSK"));
    expect(Buffer.from(grant.transactionSessionKey).equals(Buffer.from(o.transactionSessionKey))).to.equal(true);
    expect(grant.merchantId).to.deep.equal(o.merchantId);
    expect(grant.amount).to.deep.equal(o.amount);
    expect(grant.expiresAt?.getTime()).to.equal(termsOf(o).expiresAt.getTime());
    // The client, holding only the TSK, can neither open nor remake it.
    expect(open(Buffer.from(o.transactionSessionKey), "SESSION_KEY", id, o.encryptedSessionKey)).to.equal(undefined);
  });

  describe("a draw request of other terms than the offer's: PERMISSION_DENIED OFFER_MISMATCH, nothing recorded, nothing debited", () => {
    const amountOf = (d: DrawRequest) => defined(d.amount, "the draw request's amount");
    const cases: [string, (d: DrawRequest) => void][] = [
      ["a lowered amount", (d) => (d.amount = { ...amountOf(d), amountMinor: 1n })],
      ["a raised amount", (d) => (d.amount = { ...amountOf(d), amountMinor: amountOf(d).amountMinor + 100n })],
      ["another currency", (d) => (d.amount = { ...amountOf(d), currency: 840 })],
      ["another merchant id (a registered merchant)", (d) => (d.merchantId = { value: "client-shop" })],
    ];
    for (const [name, mutate] of cases) {
      it(name, async () => {
        const o = await offer();
        const dr = await plainDrawRequest(card, o);
        mutate(dr);
        const p0 = await purse();
        const t0 = await totals();
        const f = await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)));
        expect(f).to.include({ code: "PERMISSION_DENIED", reason: "OFFER_MISMATCH" });
        expect(f.details).to.contain("nothing was recorded or debited");
        expect(await purse(), "the card's balance and counter").to.deep.equal(p0);
        expect(await totals(), "the PSAMs' counters, open debits and batches").to.deep.equal(t0);
        await notRecorded(o);
        // The same request again: refused alike, still nothing recorded.
        expect(await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)))).to.deep.equal(f);
        await notRecorded(o);
        // The offer's own terms still go through afterwards.
        await pay(o);
        expect((await purse()).balance).to.equal(p0.balance - termsOf(o).amountMinor);
      });
    }

    it("another exponent (compared too, though the server refuses an exponent other than the card's first)", () => {
      const grant = { merchantId: "demo-shop", amount: { amountMinor: 99n, currency: 978, exponent: 2 }, expiresAt: new Date() };
      let refused: unknown;
      try {
        requireGrantedTerms(grant, { merchantId: "demo-shop", amount: 99, currency: 978, exponent: 3 });
      } catch (e) {
        refused = e;
      }
      expect(refused).to.be.instanceOf(NetpurseError);
      expect((refused as NetpurseError).reason).to.equal(ErrorReason.ERROR_REASON_OFFER_MISMATCH);
      expect(() => requireGrantedTerms(grant, { merchantId: "demo-shop", amount: 99, currency: 978, exponent: 2 })).to.not.throw();
    });
  });

  describe("the offer's expiry", () => {
    it("a new draw request after it: FAILED_PRECONDITION OFFER_EXPIRED, nothing recorded, nothing debited", async () => {
      const o = await grantedOffer(net, await offer(), { expiresInMs: 1_000 });
      const req = await drawRequestFor(card, o); // made in time, sent too late
      await pastExpiry(o);
      const p0 = await purse();
      const t0 = await totals();
      const f = await failure(net.clients.payment.processDrawRequest(req));
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "OFFER_EXPIRED" });
      expect(await purse()).to.deep.equal(p0);
      expect(await totals()).to.deep.equal(t0);
      await notRecorded(o);
    });

    it("a draw request recorded in time and retried after it gets its recorded answer: the same DEBIT command, which completes", async () => {
      const o = await grantedOffer(net, await offer(), { expiresInMs: 1_500 });
      const req = await drawRequestFor(card, o);
      const t0 = await totals();
      const first = openIssued(o, await net.clients.payment.processDrawRequest(req));
      await pastExpiry(o);
      const again = openIssued(o, await net.clients.payment.processDrawRequest(req));
      expect(again).to.deep.equal(first);
      expect((await totals()).counter).to.equal(t0.counter + 1); // one DEBIT command, not two
      const before = (await purse()).balance;
      await pay(o, first);
      expect((await purse()).balance).to.equal(before - termsOf(o).amountMinor);
    });

    it("a draw request recorded without a DEBIT command is not run again after it: refused for good, no PSAM asked", async () => {
      const o = await grantedOffer(net, await offer(), { expiresInMs: 2_000 });
      const req = await drawRequestFor(card, o);
      const t0 = await totals();
      // Recorded, then given up before a PSAM was asked (too little time left before the caller's deadline).
      expect((await failure(net.clients.payment.processDrawRequest(req, { deadline: 600 }))).code).to.equal("DEADLINE_EXCEEDED");
      await waitFor(async () => (await state(o)) === PurchaseState.PURCHASE_STATE_RECEIVED, 5_000, "the draw request to be recorded");
      await pastExpiry(o);
      const f = await failure(net.clients.payment.processDrawRequest(req));
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "OFFER_EXPIRED" });
      expect(await state(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      expect(await failure(net.clients.payment.processDrawRequest(req))).to.deep.equal(f);
      expect((await totals()).counter).to.equal(t0.counter);
    });
  });
});
