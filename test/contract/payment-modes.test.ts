// The confirmation modes of FIG. 6-8 and the encryption layer of FIG. 9,
// through the real payment server, merchants and merchant validation
// service: who compares the card's signature, when the PSAM is released, how
// the card's proof still reaches the PSAM's batch, and every attack on the
// sealed messages, each leaving the goods unreleased and no money created,
// lost or settled twice.

import { expect } from "chai";
import { randomBytes } from "node:crypto";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { OrderState, type MerchantServiceDefinition, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { DebitResultStatus, PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import type { Sealed } from "../../gen/netpurse/card/v1/card.js";
import { SW } from "../../lib/apdu/apdu.js";
import { open } from "../../lib/protocol/encryption-layer.js";
import { DebitResponse, cardProofDigest } from "../../lib/protocol/purse.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import {
  completeRequest,
  drawRequestFor,
  failure,
  flipBit,
  openCard,
  openIssued,
  openResultC,
  plainDrawRequest,
  sealDrawRequest,
} from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { openResultM, psamTotals } from "../support/payment.js";

type Merchant = Client<typeof MerchantServiceDefinition, DeadlineOptions>;

describe("contract: confirmation modes and the encryption layer", function () {
  this.timeout(90_000);
  let net: Network;
  let card: PurseReader;
  let totals: ReturnType<typeof psamTotals>;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], proofTimeoutMs: 1_500, sweepEveryMs: 300 });
    card = await openCard(net.cardPath);
    totals = psamTotals(net);
  });
  after(async () => net?.close());

  const shop = (id: string): Merchant => net.merchants[id]!;
  const offerAt = async (id: string, product = "song-1"): Promise<PaymentOffer> => (await shop(id).createOrder({ productId: product })).offer!;
  const purchase = async (o: PaymentOffer) => (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!;
  const orderState = async (id: string, o: PaymentOffer) => (await shop(id).getOrder({ transactionId: o.transactionId })).order!.state;
  const balance = async () => (await card.readPurse()).balance;

  async function issue(o: PaymentOffer, reader: PurseReader = card) {
    const r = await net.clients.payment.processDrawRequest(await drawRequestFor(reader, o));
    return { r, issued: openIssued(o, r) };
  }

  describe("SERVER_COMPARES (FIG. 6)", () => {
    it("releases the PSAM with the DEBIT command, compares at the payment server, and records the card's proof after", async () => {
      const o = await offerAt("server-shop");
      const t0 = await totals();
      const { r, issued } = await issue(o);
      expect(r.debitResultM).to.equal(undefined); // two round trips: M comes with the ruling
      expect(issued.expectedCardSignature).to.have.length(0); // the payment server keeps it
      expect(net.payment.pool.counts().leased).to.equal(0); // released as soon as the PSAM answered
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const done = await net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
      expect(openResultC(o, done).state).to.be.oneOf([PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED]);
      const m = await openResultM(net, o, done.debitResultM);
      expect(m.status).to.equal(DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED);
      const receipt = await shop("server-shop").completeOrder({ transactionId: o.transactionId, debitResultM: done.debitResultM });
      expect(receipt.receipt!.goods).to.match(/^licence key/);
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the proof in the PSAM's batch");
      const t1 = await totals();
      expect(t1.batch - t0.batch).to.equal(1);
      expect(t1.pending).to.equal(t0.pending);
      const events = (await purchase(o)).events;
      expect(events.map((e) => e.step)).to.deep.equal([
        "draw_request_received",
        "psam_assigned",
        "debit_command_issued",
        "psam_released",
        "debit_response_received",
        "card_signature_matched",
        "recorded_in_batch",
      ]);
      // One commit each: the DEBIT command's record carries the PSAM's hold, the card's answer its proof.
      const at = (step: string) => events.find((e) => e.step === step)!.time?.getTime();
      expect(at("psam_assigned")).to.equal(at("debit_command_issued")).and.to.equal(at("psam_released"));
      expect(at("debit_response_received")).to.equal(at("card_signature_matched"));
      expect(events.find((e) => e.step === "psam_released")!.detail).to.match(/^PSAM [0-9a-f]{8} held \d+ ms/);
    });

    it("a card answer that is not the expected debit goes to the PSAM, which rules (here: a bad signature, reversed)", async () => {
      const o = await offerAt("server-shop");
      const t0 = await totals();
      const { issued } = await issue(o);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const bad = Buffer.from(debit.raw);
      bad[DebitResponse.offset("cardSignature")]! ^= 0x01;
      const f = await failure(net.clients.payment.completePurchase(completeRequest(o, { sw: SW.OK, raw: bad, token: issued.completionToken })));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
      expect((await totals()).batch).to.equal(t0.batch);
    });

    it("the expected signature with another balance or counter is not the expected debit: no balance the card never had is recorded", async () => {
      for (const field of ["balance", "counter"] as const) {
        const o = await offerAt("server-shop");
        const t0 = await totals();
        const { issued } = await issue(o);
        const debit = await card.debit(Buffer.from(issued.debitCommand));
        const real = DebitResponse.decode(debit.raw);
        const lying = DebitResponse.encode({ ...real, [field]: real[field] + 1_000 });
        const f = await failure(net.clients.payment.completePurchase(completeRequest(o, { sw: SW.OK, raw: lying, token: issued.completionToken })));
        expect(f, field).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
        const rec = await purchase(o);
        expect(rec.state, field).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
        expect(
          rec.events.map((e) => e.step),
          field,
        ).to.not.include("card_signature_matched");
        expect((await totals()).batch, field).to.equal(t0.batch);
      }
    });
  });

  describe("CLIENT_COMPARES (FIG. 7)", () => {
    it("one round trip: the client compares, the merchant releases, the client's report brings the proof to the batch", async () => {
      const o = await offerAt("client-shop");
      const t0 = await totals();
      const before = await balance();
      const { r, issued } = await issue(o);
      expect(issued.expectedCardSignature).to.have.length(0); // the signature itself never leaves the payment server
      expect(issued.expectedCardSignatureDigest).to.have.length(16);
      expect(r.debitResultM).to.not.equal(undefined);
      expect((await openResultM(net, o, r.debitResultM)).status).to.equal(DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED);
      expect(net.payment.pool.counts().leased).to.equal(0);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      expect(cardProofDigest(o.transactionId!.value, debit.parsed!.cardSignature).equals(Buffer.from(issued.expectedCardSignatureDigest))).to.equal(true);
      const receipt = await shop("client-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM });
      expect(receipt.receipt!.goods).to.match(/^licence key/);
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED); // nothing proven yet
      const ack = await net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: debit.raw });
      expect(ack.state).to.be.oneOf([PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED]);
      // Reported twice: acknowledged again, counted once.
      await net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: debit.raw });
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the proof in the PSAM's batch");
      expect((await totals()).batch - t0.batch).to.equal(1);
      expect(await balance()).to.equal(before - 99);
    });
  });

  describe("MERCHANT_COMPARES (FIG. 8)", () => {
    it("one round trip: the expected signature travels sealed for the merchant, who compares and reports the proof", async () => {
      const o = await offerAt("merchant-shop");
      const t0 = await totals();
      const { r, issued } = await issue(o);
      expect(issued.expectedCardSignature).to.have.length(0); // not for the client
      expect(open(Buffer.from(o.transactionSessionKey), "DEBIT_RESULT_M", o.transactionId!.value, r.debitResultM)).to.equal(undefined); // nor readable by it
      const m = await openResultM(net, o, r.debitResultM);
      expect(m.expectedCardSignature).to.have.length(0);
      expect(m.expectedCardSignatureDigest).to.have.length(16);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const receipt = await shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM, debitResponse: debit.raw });
      expect(receipt.receipt!.goods).to.match(/^licence key/);
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the merchant's report to reach the batch");
      expect((await totals()).batch - t0.batch).to.equal(1);
      const outbox = await net.validation.reporter.rows();
      expect(outbox.find((x) => x.transaction_id === o.transactionId!.value)).to.include({ state: "ACKNOWLEDGED" });
    });

    it("a card answer whose signature is not the expected one gets no goods", async () => {
      const o = await offerAt("merchant-shop");
      const { r, issued } = await issue(o);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const bad = Buffer.from(debit.raw);
      bad[DebitResponse.offset("cardSignature")]! ^= 0x10;
      const f = await failure(shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM, debitResponse: bad }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect(await orderState("merchant-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
      const missing = await failure(shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM }));
      expect(missing.code).to.equal("INVALID_ARGUMENT");
      // The true answer still works (the card did pay).
      await shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM, debitResponse: debit.raw });
    });
  });

  describe("attacks on the encryption layer: refused, no goods, no money moved", () => {
    it("a forged debit result M", async () => {
      const o = await offerAt("merchant-shop");
      const forged: Sealed = { iv: randomBytes(12), ciphertext: randomBytes(80) };
      const f = await failure(shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: forged, debitResponse: Buffer.alloc(17) }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      expect(await orderState("merchant-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    it("a debit result M of another transaction, and a confirmation replayed to another order", async () => {
      const paid = await offerAt("client-shop");
      const { r, issued } = await issue(paid);
      await card.debit(Buffer.from(issued.debitCommand));
      await shop("client-shop").completeOrder({ transactionId: paid.transactionId, debitResultM: r.debitResultM });
      const other = await offerAt("client-shop");
      const f = await failure(shop("client-shop").completeOrder({ transactionId: other.transactionId, debitResultM: r.debitResultM }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      expect(await orderState("client-shop", other)).to.equal(OrderState.ORDER_STATE_OFFERED);
      // Replayed to the same order: the same receipt, the goods once.
      const a = await shop("client-shop").completeOrder({ transactionId: paid.transactionId, debitResultM: r.debitResultM });
      const b = await shop("client-shop").completeOrder({ transactionId: paid.transactionId, debitResultM: r.debitResultM });
      expect(b.receipt!.goods).to.equal(a.receipt!.goods);
    });

    it("an ETSK of another transaction", async () => {
      const o = await offerAt("demo-shop");
      const other = await offerAt("demo-shop");
      const req = await drawRequestFor(card, o);
      const f = await failure(net.clients.payment.processDrawRequest({ ...req, encryptedSessionKey: other.encryptedSessionKey }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      expect(f.details).to.contain("ETSK");
      expect((await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }))).code).to.equal("NOT_FOUND");
    });

    it("one flipped bit in the nonce, the ciphertext or the tag of every sealed message", async () => {
      const t0 = await totals();
      for (const where of ["iv", "ciphertext", "tag"] as const) {
        // ETSK and draw request, at the payment server.
        const o = await offerAt("merchant-shop");
        const req = await drawRequestFor(card, o);
        expect(
          await failure(net.clients.payment.processDrawRequest({ ...req, encryptedSessionKey: flipBit(req.encryptedSessionKey!, where) })),
          `ETSK ${where}`,
        ).to.include({ reason: "SEAL_BROKEN" });
        expect(
          await failure(net.clients.payment.processDrawRequest({ ...req, drawRequest: flipBit(req.drawRequest!, where) })),
          `draw request ${where}`,
        ).to.include({ reason: "SEAL_BROKEN" });
        // DEBIT command, at the client; debit result M, at the merchant.
        const r = await net.clients.payment.processDrawRequest(req);
        expect(() => openIssued(o, { ...r, debitCommand: flipBit(r.debitCommand!, where) }), `DEBIT command ${where}`).to.throw(/does not open/);
        const issued = openIssued(o, r);
        const debit = await card.debit(Buffer.from(issued.debitCommand));
        expect(
          await failure(
            shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: flipBit(r.debitResultM!, where), debitResponse: debit.raw }),
          ),
          `M ${where}`,
        ).to.include({
          reason: "SEAL_BROKEN",
        });
        expect(await orderState("merchant-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
        await shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM, debitResponse: debit.raw }); // the genuine one still pays
        // The card's answer, at the payment server; debit result C, at the client.
        const o2 = await offerAt("server-shop");
        const i2 = openIssued(o2, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o2)));
        const d2 = await card.debit(Buffer.from(i2.debitCommand));
        const good = completeRequest(o2, { sw: d2.sw, raw: d2.raw, token: i2.completionToken });
        expect(
          await failure(net.clients.payment.completePurchase({ ...good, cardAnswer: flipBit(good.cardAnswer!, where) })),
          `card answer ${where}`,
        ).to.include({ reason: "SEAL_BROKEN" });
        const done = await net.clients.payment.completePurchase(good);
        expect(() => openResultC(o2, { ...done, debitResultC: flipBit(done.debitResultC!, where) }), `C ${where}`).to.throw(/does not open/);
      }
      await waitFor(async () => (await totals()).pending === t0.pending, 10_000, "every proof recorded");
      expect((await totals()).batch - t0.batch).to.equal(6); // the six genuine purchases, once each
    });

    it("a client that changes the amount or the merchant id of the draw request", async () => {
      const o = await offerAt("merchant-shop", "ebook-grpc");
      // Cheaper: the ETSK binds the offer's amount, so the payment server refuses before any PSAM signs (nothing debited).
      const dr = await plainDrawRequest(card, o);
      dr.amount = { ...dr.amount!, amountMinor: 1n };
      const t0 = await totals();
      const before = (await card.readPurse()).balance;
      const f = await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "OFFER_MISMATCH" });
      expect(f.details).to.contain("amount");
      expect((await totals()).counter).to.equal(t0.counter);
      expect((await card.readPurse()).balance).to.equal(before);
      expect(await orderState("merchant-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
      // Another merchant: this offer's ETSK does not open under that merchant's key.
      const o2 = await offerAt("merchant-shop");
      const req = await drawRequestFor(card, o2);
      const g = await failure(net.clients.payment.processDrawRequest({ ...req, merchantId: { value: "client-shop" } }));
      expect(g).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
    });

    it("the wrong merchant's key: a result for one merchant taken to another", async () => {
      const o = await offerAt("merchant-shop");
      const { r, issued } = await issue(o);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const elsewhere = await offerAt("client-shop");
      const f = await failure(
        shop("client-shop").completeOrder({ transactionId: elsewhere.transactionId, debitResultM: r.debitResultM, debitResponse: debit.raw }),
      );
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      expect(await orderState("client-shop", elsewhere)).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    it("a card signature reported for the wrong transaction", async () => {
      const a = await offerAt("client-shop");
      const b = await offerAt("client-shop");
      const ia = (await issue(a)).issued;
      const da = await card.debit(Buffer.from(ia.debitCommand));
      await issue(b);
      const t0 = await totals();
      const f = await failure(net.clients.payment.reportCardSignature({ transactionId: b.transactionId, debitResponse: da.raw }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect((await purchase(b)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED);
      expect((await totals()).batch).to.equal(t0.batch);
      await net.clients.payment.reportCardSignature({ transactionId: a.transactionId, debitResponse: da.raw });
      expect(
        (await failure(net.clients.payment.reportCardSignature({ transactionId: a.transactionId, debitResponse: Buffer.from(da.raw).fill(1, 9) }))).code,
      ).to.equal("ALREADY_EXISTS");
    });
  });

  describe("a debit never proven in time is in doubt, and settled from the card at its next contact", () => {
    it("a debit the card made but nobody reported: found in the card's log with its next draw request", async () => {
      const o = await offerAt("client-shop");
      const { issued } = await issue(o);
      await card.debit(Buffer.from(issued.debitCommand)); // and the client goes away
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_IN_DOUBT, 10_000, "no proof in time");
      await new Promise((r) => setTimeout(r, 1_000));
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_IN_DOUBT); // never inferred
      const next = await offerAt("demo-shop");
      const dr = await plainDrawRequest(card, next);
      dr.cardLog = await card.readLogRaw(4);
      await net.clients.payment.processDrawRequest(sealDrawRequest(next, dr));
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "settled from the card's log");
      expect((await purchase(o)).events.map((e) => e.step)).to.include("card_signature_reported");
    });

    it("a debit the card never made: reversed only once a later proven transaction shows the card's counter never moved", async () => {
      const openDebits = async (o: PaymentOffer) =>
        (await net.clients.concentrator.listTerminals({})).terminals
          .flatMap((t) => t.slots)
          .flatMap((x) => x.pendingDebits)
          .filter((p) => p.transactionId?.value === o.transactionId!.value).length;
      const o = await offerAt("client-shop");
      await issue(o); // the client goes away before the card sees DEBIT
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_IN_DOUBT, 10_000, "no proof in time");
      expect(await openDebits(o)).to.equal(1);
      // The card's next purchase starts at the same counter, and is proven.
      const next = await offerAt("server-shop");
      const { issued } = await issue(next);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      await net.clients.payment.completePurchase(completeRequest(next, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_REVERSED, 10_000, "the never-made debit to be reversed");
      expect((await purchase(o)).events.map((e) => e.step)).to.include.members(["proven_not_debited", "reversed_never_debited"]);
      await waitFor(async () => (await openDebits(o)) === 0, 10_000, "its debit no longer open in the PSAM");
    });
  });

  describe("a comparator outside the payment operator cannot forge the card's proof", () => {
    /** An answer made up from what the comparator was given, without the card. */
    const madeUp = async (signature: Buffer) => {
      const p = await card.readPurse();
      return DebitResponse.encode({ result: 0, counter: p.counter + 1, balance: p.balance - 99, cardSignature: signature });
    };

    it("CLIENT_COMPARES: the client learns only a digest of the expected signature; a proof made up from it is refused and nothing is recorded", async () => {
      const o = await offerAt("client-shop");
      const t0 = await totals();
      const before = await balance();
      const { issued } = await issue(o); // the card never sees the DEBIT command
      const digest = Buffer.from(issued.expectedCardSignatureDigest);
      for (const guess of [digest.subarray(0, 8), digest.subarray(8, 16), randomBytes(8)]) {
        const f = await failure(net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: await madeUp(guess) }));
        expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      }
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED); // nothing proven
      expect((await totals()).batch).to.equal(t0.batch); // nothing in a PSAM's batch for clearing to pay
      expect(await balance()).to.equal(before);
    });

    it("MERCHANT_COMPARES: the merchant's debit result M holds only the digest; a made-up answer is refused by the validation service and the payment server", async () => {
      const o = await offerAt("merchant-shop");
      const t0 = await totals();
      const { r } = await issue(o);
      const m = await openResultM(net, o, r.debitResultM); // all a merchant holding its key can read
      expect(m.expectedCardSignature).to.have.length(0);
      const forged = await madeUp(Buffer.from(m.expectedCardSignatureDigest).subarray(0, 8));
      expect(
        await failure(shop("merchant-shop").completeOrder({ transactionId: o.transactionId, debitResultM: r.debitResultM, debitResponse: forged })),
      ).to.include({
        code: "PERMISSION_DENIED",
      });
      expect(await failure(net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: forged }))).to.include({
        reason: "BAD_SIGNATURE",
      });
      expect(await orderState("merchant-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED); // no goods
      expect((await totals()).batch).to.equal(t0.batch);
    });
  });
});
