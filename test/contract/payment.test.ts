// Contract of netpurse.payment.v1.PaymentService: the real payment server on
// loopback, with a real concentrator, terminal host and software PSAMs behind
// it, driven through the generated client by a cardholder's client that can
// misbehave.

import { expect } from "chai";
import { join } from "node:path";
import { randomUUID } from "node:crypto";
import { PurchaseState, type DrawRequest } from "../../gen/netpurse/payment/v1/payment.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { SW } from "../../lib/apdu/apdu.js";
import { hexOf } from "../../lib/ids.js";
import { confirmationMacValid } from "../../lib/protocol/confirmation.js";
import { DebitCommand, DebitResponse, InitializeForPurchaseResponse } from "../../lib/protocol/purse.js";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import { drawRequestFor, failure, openCard } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

describe("contract: netpurse.payment.v1.PaymentService", function () {
  this.timeout(60_000);
  let net: Network;
  let card: PurseReader;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], holdTimeoutMs: 30_000 });
    card = await openCard(net.cardPath);
  });
  after(async () => net?.close());

  const offer = async (product = "ebook-smart-cards"): Promise<PaymentOffer> => (await net.clients.merchant.createOrder({ productId: product })).offer!;
  const balance = async (r: PurseReader = card) => (await r.readPurse()).balance;
  async function psams() {
    const r = await net.clients.concentrator.listTerminals({});
    const out = new Map<string, { counter: number; pending: number; batch: number }>();
    for (const t of r.terminals) for (const s of t.slots) out.set(hexOf(s.psamId?.value), { counter: s.psamCounter, pending: s.pendingDebits.length, batch: s.batchCount });
    return out;
  }
  const totals = async () => {
    let counter = 0,
      pending = 0,
      batch = 0;
    for (const s of (await psams()).values()) {
      counter += s.counter;
      pending += s.pending;
      batch += s.batch;
    }
    return { counter, pending, batch };
  };

  /** A full purchase by the book; returns what each step gave. */
  async function purchase(o: PaymentOffer, reader: PurseReader = card) {
    const dr = await drawRequestFor(reader, o);
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: dr });
    const debit = await reader.debit(withOriginalAmount(Buffer.from(issued.debitCommand), Number(o.amount!.amountMinor)));
    const done = await net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken });
    return { dr, issued, debit, done };
  }

  it("turns a draw request into a PSAM-signed DEBIT command and a proven debit into a merchant confirmation", async () => {
    const o = await offer();
    const before = await balance();
    const t0 = await totals();
    const { issued, debit, done } = await purchase(o);
    expect(issued.transactionId?.value).to.equal(o.transactionId!.value);
    expect(issued.debitCommand).to.have.length(DebitCommand.size);
    expect(issued.terminalId).to.equal("terminal-1");
    expect(debit.sw).to.equal(SW.OK);
    expect(await balance()).to.equal(before - 250);
    expect(Number(done.newBalance!.amountMinor)).to.equal(before - 250);

    const c = done.confirmation!;
    expect(c.transactionId?.value).to.equal(o.transactionId!.value);
    expect(c.merchantId?.value).to.equal("demo-shop");
    expect(c.amount).to.deep.equal(o.amount);
    expect(hexOf(c.psamId?.value)).to.equal(hexOf(issued.psamId?.value));
    const key = (await new MerchantRegistry(join(net.paths.payment, "merchants.json")).get("demo-shop"))!.key;
    const fields = {
      transactionId: c.transactionId!.value,
      merchantId: c.merchantId!.value,
      amount: 250,
      currency: 978,
      exponent: 2,
      purseId: Buffer.from(c.purseId!.value),
      psamId: Buffer.from(c.psamId!.value),
      psamCounter: c.psamCounter,
      confirmedAtMs: c.confirmedAt!.getTime(),
    };
    expect(confirmationMacValid(key, fields, c.mac)).to.equal(true);
    expect(confirmationMacValid(key, { ...fields, amount: 251 }, c.mac)).to.equal(false);

    const t1 = await totals();
    expect(t1.counter - t0.counter).to.equal(1);
    expect(t1.batch - t0.batch).to.equal(1);
    expect(t1.pending).to.equal(0);

    const { purchase: rec } = await net.clients.payment.getPurchase({ transactionId: o.transactionId });
    expect(rec!.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec!.events.map((e) => e.step)).to.deep.equal(["draw_request_received", "psam_assigned", "debit_command_issued", "debit_response_received", "purchase_confirmed"]);
    const stored = await net.hosts.get("terminal-1")!.host.data.transactions();
    expect(stored.find((x) => x.transaction_id === o.transactionId!.value)).to.include({ amount_minor: 250, merchant_id: "demo-shop" });
  });

  describe("a malformed draw request gets INVALID_ARGUMENT naming the field, and changes nothing", () => {
    const cases: [string, (d: DrawRequest) => unknown, string][] = [
      ["missing transaction id", (d) => (d.transactionId = undefined), "draw_request.transaction_id"],
      ["a transaction id that is not a UUID", (d) => (d.transactionId = { value: "order-1" }), "draw_request.transaction_id"],
      ["missing merchant id", (d) => (d.merchantId = undefined), "draw_request.merchant_id"],
      ["an oversized merchant id", (d) => (d.merchantId = { value: "m".repeat(17) }), "draw_request.merchant_id"],
      ["missing amount", (d) => (d.amount = undefined), "draw_request.amount"],
      ["a zero amount", (d) => (d.amount = { ...d.amount!, amountMinor: 0n }), "draw_request.amount.amount_minor"],
      ["an amount beyond 4 bytes", (d) => (d.amount = { ...d.amount!, amountMinor: 1n << 32n }), "draw_request.amount.amount_minor"],
      ["a currency out of range", (d) => (d.amount = { ...d.amount!, currency: 1000 }), "draw_request.amount.currency"],
      ["an exponent that is not the card's", (d) => (d.amount = { ...d.amount!, exponent: 3 }), "draw_request.amount.exponent"],
      ["no confirmation mode", (d) => (d.confirmationMode = 0), "draw_request.confirmation_mode"],
      ["an oversized ATR", (d) => (d.cardAtr = Buffer.alloc(40, 0x3b)), "draw_request.card_atr"],
      ["an ATR with a bad TS byte", (d) => (d.cardAtr = Buffer.from("0011", "hex")), "draw_request.card_atr"],
      ["a short INITIALIZE response", (d) => (d.initializeResponse = Buffer.from(d.initializeResponse).subarray(1)), "draw_request.initialize_response"],
      ["an oversized INITIALIZE response", (d) => (d.initializeResponse = Buffer.alloc(1000)), "draw_request.initialize_response"],
      ["an INITIALIZE response with a bad date", (d) => (d.initializeResponse = Buffer.from(d.initializeResponse).fill(0xff, 20, 24)), "draw_request.initialize_response"],
    ];
    for (const [name, mutate, field] of cases) {
      it(name, async () => {
        const o = await offer();
        const dr = await drawRequestFor(card, o);
        mutate(dr);
        const t0 = await totals();
        const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }));
        expect(f.code).to.equal("INVALID_ARGUMENT");
        expect(f.reason).to.equal("INVALID_FIELD");
        expect(f.details).to.contain(field);
        expect((await totals()).counter).to.equal(t0.counter);
      });
    }

    it("no draw request at all", async () => {
      const f = await failure(net.clients.payment.processDrawRequest({}));
      expect(f).to.include({ code: "INVALID_ARGUMENT" });
      expect(f.details).to.contain("draw_request");
    });

    it("a message beyond the 64 KiB bound is refused by the transport", async () => {
      const dr = await drawRequestFor(card, await offer());
      dr.cardAtr = Buffer.alloc(70_000, 0x3b);
      expect((await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }))).code).to.equal("RESOURCE_EXHAUSTED");
    });
  });

  it("refuses an unknown merchant with PERMISSION_DENIED", async () => {
    const o = await offer();
    const dr = await drawRequestFor(card, { ...o, merchantId: { value: "nobody" } });
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "UNKNOWN_MERCHANT" });
  });

  it("stops a client that lies about the balance at the PSAM (FAILED_PRECONDITION), nothing debited", async () => {
    const { offer: o } = await net.clients.merchant.createOrder({ productId: "ebook-grpc" });
    const poor = await newCard({ value: 500, name: "poor" });
    const before = await balance(poor);
    const t0 = await totals();
    const dr = await drawRequestFor(poor, o!);
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
    expect(await balance(poor)).to.equal(before);
    expect((await totals()).counter).to.equal(t0.counter);
    const { purchase: rec } = await net.clients.payment.getPurchase({ transactionId: o!.transactionId });
    expect(rec!.state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
    // The same draw request again gets the same refusal, without a second PSAM exchange.
    expect(await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }))).to.deep.equal(f);
    expect((await totals()).counter).to.equal(t0.counter);
  });

  it("a client that forges a higher balance gets a DEBIT command the card declines with proof; the PSAM reverses it", async () => {
    const o = (await net.clients.merchant.createOrder({ productId: "ebook-grpc" })).offer!;
    const poor = await newCard({ value: 500, name: "liar" });
    const forged = (raw: Buffer) => InitializeForPurchaseResponse.encode({ ...InitializeForPurchaseResponse.decode(raw), balance: 99_999 });
    const t0 = await totals();
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(poor, o, forged) });
    const debit = await poor.debit(Buffer.from(issued.debitCommand));
    expect(debit.parsed!.result).to.equal(1);
    const f = await failure(net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
    expect(await balance(poor)).to.equal(500);
    const t1 = await totals();
    expect(t1.pending).to.equal(0);
    expect(t1.batch).to.equal(t0.batch);
    expect((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!.state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
  });

  it("refuses an expired card (FAILED_PRECONDITION CARD_EXPIRED)", async () => {
    const old = await newCard({ expiry: "2024-06-30", name: "expired" });
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(old, await offer()) }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CARD_EXPIRED" });
    expect(await balance(old)).to.equal(10_000);
  });

  it("refuses a card in another currency (FAILED_PRECONDITION CURRENCY_MISMATCH), at the server and at the PSAM", async () => {
    const usd = await newCard({ currency: 840, name: "usd" });
    const o = await offer();
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(usd, o) }));
    expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
    // An offer in the card's currency, which no PSAM here accepts.
    const o2 = await offer();
    const g = await failure(net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(usd, { ...o2, amount: { ...o2.amount!, currency: 840 } }) }));
    expect(g).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
    expect(g.details).to.contain("no PSAM in the pool accepts currency 840");
    expect(await balance(usd)).to.equal(10_000);
  });

  it("a changed amount in the DEBIT command is refused by the card and the PSAM transaction is reversed", async () => {
    const o = await offer("ebook-grpc");
    const before = await balance();
    const t0 = await totals();
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) });
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 1)); // a client that pays 0.01 instead
    expect(debit.sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect((await totals()).pending).to.equal(t0.pending + 1);
    const f = await failure(net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: Buffer.alloc(0), completionToken: issued.completionToken }));
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

  it("answers the same draw request twice alike, with one debit", async () => {
    const o = await offer();
    const dr = await drawRequestFor(card, o);
    const t0 = await totals();
    const a = await net.clients.payment.processDrawRequest({ drawRequest: dr });
    const b = await net.clients.payment.processDrawRequest({ drawRequest: dr });
    expect(Buffer.from(b.debitCommand).equals(Buffer.from(a.debitCommand))).to.equal(true);
    expect(Buffer.from(b.completionToken).equals(Buffer.from(a.completionToken))).to.equal(true);
    expect((await totals()).counter).to.equal(t0.counter + 1);
    const before = await balance();
    const debit = await card.debit(Buffer.from(a.debitCommand));
    const req = { transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: a.completionToken };
    const c1 = await net.clients.payment.completePurchase(req);
    const c2 = await net.clients.payment.completePurchase(req);
    expect(Buffer.from(c2.confirmation!.mac).equals(Buffer.from(c1.confirmation!.mac))).to.equal(true);
    expect(await balance()).to.equal(before - 250);
    expect((await totals()).batch).to.equal(t0.batch + 1);
    // The same id with another card answer.
    const other = { ...req, debitResponse: Buffer.from(debit.raw).fill(0, 9) };
    expect((await failure(net.clients.payment.completePurchase(other))).code).to.equal("ALREADY_EXISTS");
  });

  it("the same transaction id with other content gets ALREADY_EXISTS", async () => {
    const o = await offer();
    await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) });
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, { ...o, amount: { ...o.amount!, amountMinor: 1n } }) }));
    expect(f).to.include({ code: "ALREADY_EXISTS", reason: "TRANSACTION_ID_REUSED" });
  });

  it("only the client that sent the draw request can complete it: another party's card error does not reverse the purchase", async () => {
    const o = await offer();
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) });
    expect(issued.completionToken).to.have.length(16);
    const t0 = await totals();
    for (const completionToken of [Buffer.alloc(0), Buffer.alloc(16), Buffer.from(issued.completionToken).map((b, i) => (i ? b : b ^ 1))]) {
      const f = await failure(net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: 0x6982, debitResponse: Buffer.alloc(0), completionToken: Buffer.from(completionToken) }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "WRONG_COMPLETION_TOKEN" });
    }
    expect((await totals()).pending).to.equal(t0.pending);
    expect((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!.state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED);
    const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), 250));
    const done = await net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken });
    expect(done.confirmation!.psamCounter).to.equal(issued.psamCounter);
  });

  it("does not ask a PSAM when the caller's deadline leaves too little time (DEADLINE_EXCEEDED, nothing signed)", async () => {
    const o = await offer();
    const t0 = await totals();
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) }, { deadline: 600 }));
    expect(f.code).to.equal("DEADLINE_EXCEEDED");
    expect((await totals()).counter).to.equal(t0.counter);
  });

  it("records a debit the card proves even when the client overstated the card's balance", async () => {
    const o = await offer();
    const before = await balance();
    const overstated = (raw: Buffer) => InitializeForPurchaseResponse.encode({ ...InitializeForPurchaseResponse.decode(raw), balance: before + 5_000 });
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o, overstated) });
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    expect(debit.parsed!.result).to.equal(0);
    const done = await net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken });
    expect(done.newBalance!.amountMinor).to.equal(BigInt(before - 250));
    expect(await balance()).to.equal(before - 250);
  });

  it("a card signature that does not verify gets PERMISSION_DENIED and the PSAM reverses", async () => {
    const o = await offer();
    const t0 = await totals();
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) });
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    const tampered = Buffer.from(debit.raw);
    tampered[DebitResponse.offset("cardSignature")]! ^= 0x80;
    const f = await failure(net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: SW.OK, debitResponse: tampered, completionToken: issued.completionToken }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    const t1 = await totals();
    expect(t1.batch).to.equal(t0.batch);
    expect(t1.pending).to.equal(t0.pending);
  });

  it("CompletePurchase refuses malformed answers, unknown and not-yet-issued transactions", async () => {
    const unknown = { value: randomUUID() };
    expect(await failure(net.clients.payment.completePurchase({ transactionId: unknown, cardStatusWord: SW.OK, debitResponse: Buffer.alloc(17) }))).to.include({
      code: "NOT_FOUND",
    });
    expect((await failure(net.clients.payment.completePurchase({ transactionId: unknown, cardStatusWord: 7, debitResponse: Buffer.alloc(0) }))).details).to.contain("card_status_word");
    expect((await failure(net.clients.payment.completePurchase({ transactionId: unknown, cardStatusWord: SW.OK, debitResponse: Buffer.alloc(3) }))).details).to.contain("debit_response");
    expect((await failure(net.clients.payment.completePurchase({ transactionId: unknown, cardStatusWord: 0x6982, debitResponse: Buffer.alloc(17) }))).details).to.contain("debit_response");
    expect((await failure(net.clients.payment.completePurchase({ cardStatusWord: SW.OK, debitResponse: Buffer.alloc(17) }))).details).to.contain("transaction_id");
  });

  it("GetPurchase answers NOT_FOUND for an unknown transaction and INVALID_ARGUMENT for a bad id", async () => {
    expect((await failure(net.clients.payment.getPurchase({ transactionId: { value: randomUUID() } }))).code).to.equal("NOT_FOUND");
    expect((await failure(net.clients.payment.getPurchase({ transactionId: { value: "x" } }))).code).to.equal("INVALID_ARGUMENT");
  });

  async function newCard(o: { value?: number; expiry?: string; currency?: number; name: string }): Promise<PurseReader> {
    const issuer = await Issuer.open(net.paths.issuer);
    try {
      const path = join(net.paths.cards, `${o.name}.card.json`);
      await issuer.personaliseCard({ path, currency: o.currency ?? 978, exponent: 2, initialValue: o.value ?? 10_000, maxBalance: 50_000, expiry: o.expiry ?? "2031-12-31" });
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
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, first) }); // holds the only PSAM
    const second = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const other = await openCard(net.cardPath);
    const dr = await drawRequestFor(other, second);
    const started = Date.now();
    const f = await failure(net.clients.payment.processDrawRequest({ drawRequest: dr }, { deadline: 1_500 }));
    expect(f).to.include({ code: "RESOURCE_EXHAUSTED", reason: "NO_PSAM_FREE" });
    expect(Date.now() - started).to.be.below(1_500);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await net.clients.payment.completePurchase({ transactionId: first.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken }); // PSAM back to the pool
    const retry = await net.clients.payment.processDrawRequest({ drawRequest: dr }, { deadline: 5_000 });
    expect(retry.debitCommand).to.have.length(DebitCommand.size);
  });
});

describe("contract: PaymentService when a terminal answers too late", function () {
  this.timeout(60_000);
  let net: Network;
  before(async () => {
    net = await startNetwork({ terminals: [{ id: "t-slow", psams: 1, answerDelayMs: 2_500 }, { id: "t-fast", psams: 1 }], jobTimeoutMs: 1_000 });
  });
  after(async () => net?.close());

  it("gives the work to another PSAM, and reverses the open debit the slow PSAM reports later", async () => {
    const card = await openCard(net.cardPath);
    const o = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    const issued = await net.clients.payment.processDrawRequest({ drawRequest: await drawRequestFor(card, o) }, { deadline: 10_000 });
    expect(issued.terminalId).to.equal("t-fast");
    const first = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!.events.find((e) => e.step === "psam_assigned")!;
    expect(first.detail).to.contain("terminal t-slow"); // it went there first, and moved on when no answer came
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await net.clients.payment.completePurchase({ transactionId: o.transactionId, cardStatusWord: debit.sw, debitResponse: debit.raw, completionToken: issued.completionToken });
    // The slow PSAM did sign (its counter moved) a command nobody received; the payment server reverses it.
    const slow = net.hosts.get("t-slow")!.host.data;
    await waitFor(async () => (await slow.reversals()).length === 1, 20_000, "the slow PSAM's open debit to be reversed");
    const [reversal] = await slow.reversals();
    expect(reversal).to.include({ psam_counter: 1, transaction_id: o.transactionId!.value, reason: "reversed by payment server" });
    const slowSlot = async () => (await net.clients.concentrator.listTerminals({})).terminals.find((t) => t.terminalId === "t-slow")!.slots[0]!;
    await waitFor(async () => (await slowSlot()).psamCounter === 1 && (await slowSlot()).pendingDebits.length === 0, 20_000, "the slow PSAM to report no open debit");
    expect((await slowSlot()).batchCount).to.equal(0);
    const rec = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec.events.filter((e) => e.step === "psam_assigned")).to.have.length(2);
    expect((await card.readPurse()).balance).to.equal(10_000 - 99);
  });
});
