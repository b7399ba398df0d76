// Contract of netpurse.payment.v1.PaymentService in mode PSAM_VERIFIES: the
// real payment server on loopback, with a real concentrator, terminal host
// and software PSAMs behind it, driven through the generated client by a
// cardholder's client that can misbehave. (The other modes and the attacks
// on the encryption layer: payment-modes.test.ts.)

import { expect } from "chai";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { DebitResultStatus, PaymentServiceDefinition, PurchaseState, type DrawRequest } from "../../gen/netpurse/payment/v1/payment.js";
import type { Channel } from "nice-grpc";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { SW } from "../../lib/apdu/apdu.js";
import { hexOf } from "../../lib/ids.js";
import { open } from "../../lib/protocol/encryption-layer.js";
import { DebitCommand, DebitResponse } from "../../lib/protocol/purse.js";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { Issuer } from "../../services/issuer/issuer.js";
import {
  alteredInit,
  cardPurchaseKey,
  completeRequest,
  drawRequestFor,
  failure,
  openCard,
  openIssued,
  openResultC,
  plainDrawRequest,
  resignedInit,
  sealDrawRequest,
} from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { grantedOffer } from "../support/offers.js";
import { openResultM, psamTotals } from "../support/payment.js";

describe("contract: netpurse.payment.v1.PaymentService (PSAM_VERIFIES)", function () {
  this.timeout(60_000);
  let net: Network;
  let card: PurseReader;
  let totals: ReturnType<typeof psamTotals>;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], holdTimeoutMs: 30_000 });
    card = await openCard(net.cardPath);
    totals = psamTotals(net);
  });
  const channels: Channel[] = [];
  after(async () => {
    for (const c of channels) c.close();
    await net?.close();
  });

  const offer = async (product = "ebook-smart-cards"): Promise<PaymentOffer> => (await net.clients.merchant.createOrder({ productId: product })).offer!;
  const balance = async (r: PurseReader = card) => (await r.readPurse()).balance;
  const state = async (o: PaymentOffer) => (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!.state;

  async function issue(o: PaymentOffer, reader: PurseReader = card, patch?: (raw: Buffer) => Buffer) {
    const req = await drawRequestFor(reader, o, patch);
    const r = await net.clients.payment.processDrawRequest(req);
    return { req, r, issued: openIssued(o, r) };
  }

  const complete = (o: PaymentOffer, token: Uint8Array, a: { sw: number; raw: Buffer }) =>
    net.clients.payment.completePurchase(completeRequest(o, { ...a, token }));

  /** A full purchase by the book; returns what each step gave. */
  async function purchase(o: PaymentOffer, reader: PurseReader = card) {
    const { issued, r } = await issue(o, reader);
    const debit = await reader.debit(withOriginalAmount(Buffer.from(issued.debitCommand), Number(o.amount!.amountMinor)));
    const done = await complete(o, issued.completionToken, debit);
    return { r, issued, debit, done };
  }

  it("turns a sealed draw request into a PSAM-signed DEBIT command, and a proven debit into debit results C and M", async () => {
    const o = await offer();
    const before = await balance();
    const t0 = await totals();
    const { r, issued, debit, done } = await purchase(o);
    expect(r.transactionId?.value).to.equal(o.transactionId!.value);
    expect(r.debitResultM).to.equal(undefined); // two round trips in this mode: M comes with the confirmation
    expect(issued.debitCommand).to.have.length(DebitCommand.size);
    expect(issued.terminalId).to.equal("terminal-1");
    expect(issued.expectedCardSignature).to.have.length(0); // the PSAM keeps it to itself in this mode
    expect(debit.sw).to.equal(SW.OK);
    expect(await balance()).to.equal(before - 250);

    const c = openResultC(o, done);
    expect(c.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(Number(c.newBalance!.amountMinor)).to.equal(before - 250);
    const m = await openResultM(net, o, done.debitResultM);
    expect(m).to.deep.include({
      transactionId: o.transactionId,
      merchantId: o.merchantId,
      amount: o.amount,
      psamCounter: issued.psamCounter,
      status: DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED,
    });
    expect(hexOf(m.psamId?.value)).to.equal(hexOf(issued.psamId?.value));
    // The client cannot read debit result M: it is not sealed under the TSK.
    expect(open(Buffer.from(o.transactionSessionKey), "DEBIT_RESULT_M", o.transactionId!.value, done.debitResultM)).to.equal(undefined);

    const t1 = await totals();
    expect(t1.counter - t0.counter).to.equal(1);
    expect(t1.batch - t0.batch).to.equal(1);
    expect(t1.pending).to.equal(0);

    const { purchase: rec } = await net.clients.payment.getPurchase({ transactionId: o.transactionId });
    expect(rec!.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec!.events.map((e) => e.step)).to.deep.equal([
      "draw_request_received",
      "psam_assigned",
      "debit_command_issued",
      "debit_response_received",
      "psam_released",
      "purchase_confirmed",
    ]);
    expect(rec!.events.find((e) => e.step === "psam_released")!.detail).to.match(/held \d+ ms/);
    const stored = await net.hosts.get("terminal-1")!.host.data.transactions();
    expect(stored.find((x) => x.transaction_id === o.transactionId!.value)).to.include({ amount_minor: 250, merchant_id: "demo-shop" });
  });

  describe("a malformed draw request gets INVALID_ARGUMENT naming the field, and changes nothing", () => {
    const cases: [string, (d: DrawRequest) => unknown, string][] = [
      ["a transaction id that is not the request's", (d) => (d.transactionId = { value: randomUUID() }), "draw_request.transaction_id"],
      ["missing merchant id", (d) => (d.merchantId = undefined), "draw_request.merchant_id"],
      ["an oversized merchant id", (d) => (d.merchantId = { value: "m".repeat(17) }), "draw_request.merchant_id"],
      ["missing amount", (d) => (d.amount = undefined), "draw_request.amount"],
      ["a zero amount", (d) => (d.amount = { ...d.amount!, amountMinor: 0n }), "draw_request.amount.amount_minor"],
      ["an amount beyond 4 bytes", (d) => (d.amount = { ...d.amount!, amountMinor: 1n << 32n }), "draw_request.amount.amount_minor"],
      ["a currency out of range", (d) => (d.amount = { ...d.amount!, currency: 65_536 }), "draw_request.amount.currency"],
      ["an exponent that is not the card's", (d) => (d.amount = { ...d.amount!, exponent: 3 }), "draw_request.amount.exponent"],
      ["no confirmation mode", (d) => (d.confirmationMode = 0), "draw_request.confirmation_mode"],
      ["another confirmation mode than the merchant's", (d) => (d.confirmationMode = 4), "draw_request.confirmation_mode"],
      ["an oversized ATR", (d) => (d.cardAtr = Buffer.alloc(40, 0x3b)), "draw_request.card_atr"],
      ["an ATR with a bad TS byte", (d) => (d.cardAtr = Buffer.from("0011", "hex")), "draw_request.card_atr"],
      ["a short INITIALIZE response", (d) => (d.initializeResponse = Buffer.from(d.initializeResponse).subarray(1)), "draw_request.initialize_response"],
      ["an oversized INITIALIZE response", (d) => (d.initializeResponse = Buffer.alloc(1000)), "draw_request.initialize_response"],
      [
        "an INITIALIZE response with a bad date",
        (d) => (d.initializeResponse = Buffer.from(d.initializeResponse).fill(0xff, 20, 24)),
        "draw_request.initialize_response",
      ],
      ["too many card log records", (d) => (d.cardLog = Array.from({ length: 9 }, () => Buffer.alloc(51))), "draw_request.card_log"],
      ["a card log record of the wrong size", (d) => (d.cardLog = [Buffer.alloc(50)]), "draw_request.card_log[0]"],
    ];
    for (const [name, mutate, field] of cases) {
      it(name, async () => {
        const o = await offer();
        const dr = await plainDrawRequest(card, o);
        mutate(dr);
        const t0 = await totals();
        const f = await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)));
        expect(f.code).to.equal("INVALID_ARGUMENT");
        expect(f.reason).to.equal("INVALID_FIELD");
        expect(f.details).to.contain(field);
        expect((await totals()).counter).to.equal(t0.counter);
      });
    }

    it("missing or malformed clear fields", async () => {
      const o = await offer();
      const req = await drawRequestFor(card, o);
      for (const [bad, field] of [
        [{ ...req, transactionId: { value: "order-1" } }, "transaction_id"],
        [{ ...req, keyNonce: Buffer.alloc(3) }, "key_nonce"],
        [{ ...req, encryptedSessionKey: undefined }, "encrypted_session_key"],
        [{ ...req, drawRequest: undefined }, "draw_request"],
      ] as const) {
        const f = await failure(net.clients.payment.processDrawRequest(bad));
        expect(f.code, field).to.equal("INVALID_ARGUMENT");
        expect(f.details).to.contain(field);
      }
    });

    it("a message beyond the 64 KiB bound is refused by the transport", async () => {
      const o = await offer();
      const dr = await plainDrawRequest(card, o);
      dr.cardAtr = Buffer.alloc(70_000, 0x3b);
      expect((await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)))).code).to.equal("RESOURCE_EXHAUSTED");
    });
  });

  it("refuses an unknown merchant with PERMISSION_DENIED", async () => {
    const o = await offer();
    const req = await drawRequestFor(card, o);
    const f = await failure(net.clients.payment.processDrawRequest({ ...req, merchantId: { value: "nobody" } }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "UNKNOWN_MERCHANT" });
  });

  it("stops a client that lies about the balance at the PSAM (FAILED_PRECONDITION), nothing debited", async () => {
    const o = (await net.clients.merchant.createOrder({ productId: "ebook-grpc" })).offer!;
    const poor = await newCard({ value: 500, name: "poor" });
    const before = await balance(poor);
    const t0 = await totals();
    const req = await drawRequestFor(poor, o);
    const f = await failure(net.clients.payment.processDrawRequest(req));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
    expect(await balance(poor)).to.equal(before);
    expect((await totals()).counter).to.equal(t0.counter);
    expect(await state(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
    // The same draw request again gets the same refusal, without a second PSAM exchange.
    expect(await failure(net.clients.payment.processDrawRequest(req))).to.deep.equal(f);
    expect((await totals()).counter).to.equal(t0.counter);
  });

  it("a client that forges a higher balance is refused at the PSAM: the card's cryptogram does not verify (PERMISSION_DENIED), nothing signed", async () => {
    const o = await offer("ebook-grpc");
    const poor = await newCard({ value: 500, name: "liar" });
    const t0 = await totals();
    const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(poor, o, (raw) => alteredInit(raw, { balance: 99_999 }))));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    expect(await totals()).to.deep.equal(t0);
    expect(await state(o)).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
    expect(await balance(poor)).to.equal(500);
  });

  it("a higher balance signed with the card's own key gets a DEBIT command the card declines with proof; the PSAM reverses it", async () => {
    // Only a client holding the card's key could send it: this reaches the card's own balance check, behind the PSAM's.
    const o = await offer("ebook-grpc");
    const poor = await newCard({ value: 500, name: "keyholder" });
    const key = await cardPurchaseKey(join(net.paths.cards, "keyholder.card.json"));
    const forged = (raw: Buffer) => resignedInit(key, raw, { balance: 99_999 });
    const t0 = await totals();
    const { issued } = await issue(o, poor, forged);
    const debit = await poor.debit(Buffer.from(issued.debitCommand));
    expect(debit.parsed!.result).to.equal(1);
    const f = await failure(complete(o, issued.completionToken, debit));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
    expect(await balance(poor)).to.equal(500);
    const t1 = await totals();
    expect(t1.pending).to.equal(0);
    expect(t1.batch).to.equal(t0.batch);
    expect(await state(o)).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
  });

  it("records a debit the card proves even when the client overstated the card's balance (signed with the card's own key)", async () => {
    const o = await offer();
    const before = await balance();
    const key = await cardPurchaseKey(net.cardPath);
    const overstated = (raw: Buffer) => resignedInit(key, raw, { balance: before + 5_000 });
    const { issued } = await issue(o, card, overstated);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    expect(debit.parsed!.result).to.equal(0);
    const done = await complete(o, issued.completionToken, debit);
    expect(openResultC(o, done).newBalance!.amountMinor).to.equal(BigInt(before - 250));
    expect(await balance()).to.equal(before - 250);
  });

  it("refuses an expired card (FAILED_PRECONDITION CARD_EXPIRED)", async () => {
    const old = await newCard({ expiry: "2024-06-30", name: "expired" });
    const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(old, await offer())));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_EXPIRED" });
    expect(await balance(old)).to.equal(10_000);
  });

  it("refuses a card in another currency (FAILED_PRECONDITION CURRENCY_MISMATCH), at the server and at the PSAM", async () => {
    const usd = await newCard({ currency: 840, name: "usd" });
    const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(usd, await offer())));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
    // An offer in the card's currency (granted by the merchant's validation service), which no PSAM here accepts.
    const o2 = await grantedOffer(net, await offer(), { amount: { amountMinor: 250n, currency: 840, exponent: 2 } });
    const g = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(usd, o2)));
    expect(g).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
    expect(g.details).to.contain("no PSAM in the pool accepts currency 840");
    expect(await balance(usd)).to.equal(10_000);
  });

  it("a changed amount in the DEBIT command is refused by the card and the PSAM transaction is reversed", async () => {
    const o = await offer("ebook-grpc");
    const before = await balance();
    const t0 = await totals();
    const { issued } = await issue(o);
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 1)); // a client that pays 0.01 instead
    expect(debit.sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect((await totals()).pending).to.equal(t0.pending + 1);
    const f = await failure(complete(o, issued.completionToken, { sw: debit.sw, raw: Buffer.alloc(0) }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_REFUSED" });
    expect(await balance()).to.equal(before);
    const t1 = await totals();
    expect(t1.pending).to.equal(t0.pending);
    expect(t1.batch).to.equal(t0.batch);
    const rec = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
    expect(rec.events.map((e) => e.step)).to.include("reversed_card_error");
  });

  it("a replayed DEBIT command is refused by the card; the purchase counts once", async () => {
    const o = await offer();
    const { issued } = await purchase(o);
    const before = await balance();
    const replay = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 250));
    expect(replay.sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    await card.initializeForPurchase();
    expect((await card.debit(Buffer.from(issued.debitCommand))).sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await balance()).to.equal(before);
  });

  it("answers the same draw request twice alike, with one debit, and the same card answer twice alike", async () => {
    const o = await offer();
    const req = await drawRequestFor(card, o);
    const t0 = await totals();
    const a = openIssued(o, await net.clients.payment.processDrawRequest(req));
    const b = openIssued(o, await net.clients.payment.processDrawRequest(req));
    expect(b).to.deep.equal(a);
    expect((await totals()).counter).to.equal(t0.counter + 1);
    const before = await balance();
    const debit = await card.debit(Buffer.from(a.debitCommand));
    const c1 = await complete(o, a.completionToken, debit);
    const c2 = await complete(o, a.completionToken, debit);
    expect((await openResultM(net, o, c2.debitResultM)).psamCounter).to.equal((await openResultM(net, o, c1.debitResultM)).psamCounter);
    expect(openResultC(o, c2)).to.deep.equal(openResultC(o, c1));
    expect(await balance()).to.equal(before - 250);
    expect((await totals()).batch).to.equal(t0.batch + 1);
    // The same id with another card answer.
    expect((await failure(complete(o, a.completionToken, { sw: debit.sw, raw: Buffer.from(debit.raw).fill(0, 9) }))).code).to.equal("ALREADY_EXISTS");
  });

  it("the same transaction id with other content gets ALREADY_EXISTS", async () => {
    const o = await offer();
    await net.clients.payment.processDrawRequest(await drawRequestFor(card, o));
    // The same offer with the card's answer to a second INITIALIZE (a new challenge).
    const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
    expect(f).to.include({ code: "ALREADY_EXISTS", reason: "TRANSACTION_ID_REUSED" });
    // Other terms than the offer's are refused before the transaction is even looked up (offer-binding.test.ts).
    const g = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, { ...o, amount: { ...o.amount!, amountMinor: 1n } })));
    expect(g).to.include({ code: "PERMISSION_DENIED", reason: "OFFER_MISMATCH" });
  });

  it("only the client that sent the draw request can complete it: another party's card error does not reverse the purchase", async () => {
    const o = await offer();
    const { issued } = await issue(o);
    expect(issued.completionToken).to.have.length(16);
    const t0 = await totals();
    for (const token of [Buffer.alloc(0), Buffer.alloc(16), Buffer.from(issued.completionToken).map((b, i) => (i ? b : b ^ 1))]) {
      const f = await failure(complete(o, Buffer.from(token), { sw: 0x6982, raw: Buffer.alloc(0) }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "WRONG_COMPLETION_TOKEN" });
    }
    expect((await totals()).pending).to.equal(t0.pending);
    expect(await state(o)).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED);
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 250));
    const done = await complete(o, issued.completionToken, debit);
    expect((await openResultM(net, o, done.debitResultM)).psamCounter).to.equal(issued.psamCounter);
  });

  it("does not ask a PSAM when the caller's deadline leaves too little time (DEADLINE_EXCEEDED, nothing signed)", async () => {
    const o = await offer();
    const t0 = await totals();
    const f = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, o), { deadline: 600 }));
    expect(f.code).to.equal("DEADLINE_EXCEEDED");
    expect((await totals()).counter).to.equal(t0.counter);
  });

  it("a card signature that does not verify gets PERMISSION_DENIED and the PSAM reverses", async () => {
    const o = await offer();
    const t0 = await totals();
    const { issued } = await issue(o);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    const tampered = Buffer.from(debit.raw);
    tampered[DebitResponse.offset("cardSignature")]! ^= 0x80;
    const f = await failure(complete(o, issued.completionToken, { sw: SW.OK, raw: tampered }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    const t1 = await totals();
    expect(t1.batch).to.equal(t0.batch);
    expect(t1.pending).to.equal(t0.pending);
  });

  it("CompletePurchase refuses malformed answers, unknown and not-yet-issued transactions", async () => {
    const unknown = await offer(); // an offer never sent to the payment server
    expect(await failure(complete(unknown, Buffer.alloc(16), { sw: SW.OK, raw: Buffer.alloc(17) }))).to.include({ code: "NOT_FOUND" });
    const o = await offer();
    const { issued } = await issue(o);
    const t = issued.completionToken;
    expect((await failure(complete(o, t, { sw: 7, raw: Buffer.alloc(0) }))).details).to.contain("card_status_word");
    expect((await failure(complete(o, t, { sw: SW.OK, raw: Buffer.alloc(3) }))).details).to.contain("debit_response");
    expect((await failure(complete(o, t, { sw: 0x6982, raw: Buffer.alloc(17) }))).details).to.contain("debit_response");
    expect((await failure(net.clients.payment.completePurchase({ transactionId: o.transactionId }))).details).to.contain("card_answer");
  });

  it("GetPurchase answers NOT_FOUND for an unknown transaction and INVALID_ARGUMENT for a bad id", async () => {
    expect((await failure(net.clients.payment.getPurchase({ transactionId: { value: randomUUID() } }))).code).to.equal("NOT_FOUND");
    expect((await failure(net.clients.payment.getPurchase({ transactionId: { value: "x" } }))).code).to.equal("INVALID_ARGUMENT");
  });

  it("strangers read nothing: GetPurchase needs the operator's certificate, and tells no one else whether a transaction exists", async () => {
    const o = await offer("song-1");
    await purchase(o);
    const as = async (kind: "cardholder" | "merchant") => {
      const channel = openChannel(
        net.payment.address,
        (kind === "cardholder" ? net.security.cardholder : await net.security.of("merchant", "demo-shop")).channel({ kind: "payment" }),
      );
      channels.push(channel);
      return clientFactory().create(PaymentServiceDefinition, channel);
    };
    const unknown = { value: randomUUID() };
    for (const [who, expected] of [
      ["cardholder", { code: "UNAUTHENTICATED", reason: "UNAUTHENTICATED" }],
      ["merchant", { code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" }],
    ] as const) {
      const client = await as(who);
      const known = await failure(client.getPurchase({ transactionId: o.transactionId }));
      expect(known, who).to.deep.include(expected);
      // The same refusal, word for word, for a transaction the server never saw: no detail, not even its existence.
      expect(await failure(client.getPurchase({ transactionId: unknown })), who).to.deep.equal(known);
    }
    expect((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase?.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
  });

  async function newCard(o: { value?: number; expiry?: string; currency?: number; name: string }): Promise<PurseReader> {
    const issuer = await Issuer.open(net.paths.issuer);
    try {
      const path = join(net.paths.cards, `${o.name}.card.json`);
      await issuer.personaliseCard({
        path,
        currency: o.currency ?? 978,
        exponent: 2,
        initialValue: o.value ?? 10_000,
        maxBalance: 50_000,
        expiry: o.expiry ?? "2031-12-31",
      });
      return openCard(path);
    } finally {
      await issuer.close();
    }
  }
});

describe("contract: PaymentService under PSAM shortage", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], holdTimeoutMs: 30_000 });
  });
  after(async () => net?.close());

  it("gives RESOURCE_EXHAUSTED when no PSAM is free within the caller's deadline, and serves the retry once one is", async () => {
    const card = await openCard(net.cardPath);
    const first = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const issued = openIssued(first, await net.clients.payment.processDrawRequest(await drawRequestFor(card, first))); // holds the only PSAM
    const second = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const other = await openCard(net.cardPath);
    const req = await drawRequestFor(other, second);
    const started = Date.now();
    const f = await failure(net.clients.payment.processDrawRequest(req, { deadline: 1_500 }));
    expect(f).to.include({ code: "RESOURCE_EXHAUSTED", reason: "NO_PSAM_FREE" });
    expect(Date.now() - started).to.be.below(1_500);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await net.clients.payment.completePurchase(completeRequest(first, { sw: debit.sw, raw: debit.raw, token: issued.completionToken })); // PSAM back to the pool
    const retry = openIssued(second, await net.clients.payment.processDrawRequest(req, { deadline: 5_000 }));
    expect(retry.debitCommand).to.have.length(DebitCommand.size);
  });
});

describe("contract: PaymentService with no PSAM in its pool", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => (net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }] })));
  after(async () => net?.close());

  it("answers FAILED_PRECONDITION (NO_PSAM_ATTACHED) at once while no terminal host is attached, debits nothing, and serves the same draw request once one is", async () => {
    await net.hosts.get("terminal-1")?.close();
    await waitFor(() => net.payment.pool.counts().total === 0, 10_000, "the terminal's PSAM to leave the pool");
    const card = await openCard(net.cardPath);
    const before = (await card.readPurse()).balance;
    const { offer: o } = await net.clients.merchant.createOrder({ productId: "song-1" });
    if (!o) throw new Error("the merchant made no offer");
    const req = await drawRequestFor(card, o);
    const started = Date.now();
    const f = await failure(net.clients.payment.processDrawRequest(req, { deadline: 15_000 }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "NO_PSAM_ATTACHED" });
    expect(f.details).to.contain("no terminal host is attached");
    expect(Date.now() - started, "at once, not at the deadline").to.be.below(2_000);
    expect((await card.readPurse()).balance).to.equal(before);
    const { purchase } = await net.clients.payment.getPurchase({ transactionId: o.transactionId });
    expect(purchase?.state, "not a refusal: the pool may fill").to.equal(PurchaseState.PURCHASE_STATE_RECEIVED);
    expect(purchase?.events.map((e) => e.step)).to.include("no_psam_fits");

    await net.startHost({ id: "terminal-1" });
    await waitFor(() => net.payment.pool.counts().free === 1, 10_000, "the terminal's PSAM back in the pool");
    const issued = openIssued(o, await net.clients.payment.processDrawRequest(req, { deadline: 15_000 }));
    expect(issued.debitCommand).to.have.length(DebitCommand.size);
  });

  it("the cardholder's daemon asks again while the pool is empty for a moment (a terminal host restarting): the purchase goes through", async () => {
    await net.hosts.get("terminal-1")?.close();
    await waitFor(() => net.payment.pool.counts().total === 0, 10_000, "the terminal's PSAM to leave the pool");
    const before = (await net.clients.cardholder.getCard({})).purse?.balance?.amountMinor ?? -1n;
    const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
    if (!offer?.amount) throw new Error("the merchant made no offer");
    const paying = net.clients.cardholder.payOffer({ offer, approvedAmount: offer.amount, requestId: "" });
    await new Promise((r) => setTimeout(r, 300));
    await net.startHost({ id: "terminal-1" });
    const paid = await paying;
    expect(paid.receipt?.transactionId?.value).to.equal(offer.transactionId?.value);
    expect(paid.purse?.balance?.amountMinor).to.equal(before - offer.amount.amountMinor);
  });
});

describe("contract: PaymentService when a terminal answers too late", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => {
    net = await startNetwork({
      terminals: [
        { id: "t-slow", psams: 1, answerDelayMs: 2_500 },
        { id: "t-fast", psams: 1 },
      ],
      jobTimeoutMs: 1_000,
    });
  });
  after(async () => net?.close());

  it("gives the work to another PSAM, and reverses the open debit the slow PSAM reports later", async () => {
    const card = await openCard(net.cardPath);
    const o = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o), { deadline: 10_000 }));
    expect(issued.terminalId).to.equal("t-fast");
    const first = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!.events.find((e) => e.step === "psam_assigned")!;
    expect(first.detail).to.contain("terminal t-slow"); // it went there first, and moved on when no answer came
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    // The slow PSAM did sign (its counter moved) a command nobody received; the payment server reverses it.
    const slow = net.hosts.get("t-slow")!.host.data;
    await waitFor(async () => (await slow.reversals()).length === 1, 20_000, "the slow PSAM's open debit to be reversed");
    const [reversal] = await slow.reversals();
    expect(reversal).to.include({ psam_counter: 1, transaction_id: o.transactionId!.value, reason: "reversed by payment server" });
    const slowSlot = async () => (await net.clients.concentrator.listTerminals({})).terminals.find((t) => t.terminalId === "t-slow")!.slots[0]!;
    await waitFor(
      async () => (await slowSlot()).psamCounter === 1 && (await slowSlot()).pendingDebits.length === 0,
      20_000,
      "the slow PSAM to report no open debit",
    );
    expect((await slowSlot()).batchCount).to.equal(0);
    const rec = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec.events.filter((e) => e.step === "psam_assigned")).to.have.length(2);
    expect((await card.readPurse()).balance).to.equal(10_000 - 99);
  });
});

describe("contract: PaymentService when its store can no longer sync", function () {
  this.timeout(60_000);
  let net: Network;
  after(async () => net?.close());

  it("answers UNAVAILABLE, never an internal error, and records nothing more", async () => {
    // The fault injected is SQLite's (its log's sync): on SQLite whatever store the other tests run on.
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], database: false });
    const card = await openCard(net.cardPath);
    const o = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)); // the store's log is open and synced
    // Fault injection: the store's own descriptor of its log is closed under it, so its next fdatasync fails.
    const db = (net.payment.store as unknown as { db: { wal: { close(): Promise<void> } } }).db;
    await db.wal.close();
    const o2 = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const first = await failure(net.clients.payment.processDrawRequest(await drawRequestFor(card, o2)));
    expect(first.code).to.equal("UNAVAILABLE");
    const then = await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }));
    expect(then.code).to.equal("UNAVAILABLE");
    expect(then.details).to.match(/restart the service/);
  });
});
