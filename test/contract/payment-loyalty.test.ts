// Contract: authentication and points redemption through the real payment
// server (docs/loyalty.md, FIG. 16). A draw of 0 in currency 999 has an
// authentication PSAM verify the card's presence in each confirmation mode:
// the purchase ends COMPLETED with nothing paid and no batch record, and the
// merchant's debit result M says AUTHENTICATED with the purse id. A draw in a
// programme's points debits the card's points purse and lands in the points
// PSAM's batch in the programme's code. Every attack leaves the card, the
// PSAMs' batches and the merchant's goods as they were.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { ConfirmationMode, type Money, type Sealed } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { DebitResultM, DebitResultStatus, PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { SW } from "../../lib/apdu/apdu.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, money } from "../../lib/money.js";
import { seal, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { diversifyPsamKey, Verdict, verdictMac } from "../../lib/protocol/psam.js";
import { cardProofDigest, DebitResult } from "../../lib/protocol/purse.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { psamRegistryPath } from "../../services/network/pki.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import { SoftwareSecurityModule, VERDICT_KEY_FILE, type VerdictKeyFile } from "../../services/payment/security-module.js";
import { completeRequest, drawRequestWith, failure, openCard, openIssued, openResultC, sealDrawRequest } from "../support/card-client.js";
import { makeCard, makeProgramme, SKYWAYS } from "../support/fixtures.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined, grantedOffer } from "../support/offers.js";
import { openResultM } from "../support/payment.js";

type Validation = Client<typeof MerchantValidationServiceDefinition, DeadlineOptions>;

const AUTHENTICATION: Money = money(0, AUTHENTICATION_CURRENCY, 0);
const points = (n: number): Money => money(n, SKYWAYS, 0);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const idOf = (o: PaymentOffer) => defined(o.transactionId, "the offer's transaction id").value;

/** The demo shop of each confirmation mode. */
const SHOPS = [
  ["PSAM_VERIFIES", "demo-shop"],
  ["SERVER_COMPARES", "server-shop"],
  ["CLIENT_COMPARES", "client-shop"],
  ["MERCHANT_COMPARES", "merchant-shop"],
] as const;
type Mode = (typeof SHOPS)[number][0];

/** The terminal host of the authentication PSAM and the points PSAM. */
const LOYALTY_TERMINAL = "terminal-loyalty";
const CARD_POINTS = 500;
const CARD_MONEY = 10_000;

describe("contract: authentication and points redemption through the payment server (FIG. 16)", function () {
  this.timeout(120_000);
  let net: Network;
  let card: PurseReader;
  let purseId: string;
  const validations = new Map<string, Validation>();
  const channels: ReturnType<typeof openChannel>[] = [];

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], proofTimeoutMs: 60_000, sweepEveryMs: 300 });
    // The issuer makes the programme, a card with money and points, and an authentication PSAM and a points PSAM for a terminal host of their own.
    const issuer = await Issuer.open(net.paths.issuer);
    let cardPath: string;
    try {
      await makeProgramme(issuer);
      cardPath = await makeCard(issuer, net.data, { name: "loyal", value: CARD_MONEY, points: [{ programme: SKYWAYS, value: CARD_POINTS }] });
      for (const [name, currency] of [
        ["authentication", AUTHENTICATION_CURRENCY],
        ["points", SKYWAYS],
      ] as const) {
        await issuer.provisionPsam({ path: join(net.paths.terminal(LOYALTY_TERMINAL), "psams", `${name}.psam.json`), currency, terminalId: LOYALTY_TERMINAL });
      }
      await issuer.exportPsamRegistry(psamRegistryPath(net.data));
    } finally {
      await issuer.close();
    }
    await sleep(2_500); // the concentrator follows the registry file within seconds
    await net.startHost({ id: LOYALTY_TERMINAL });
    await waitFor(() => net.payment.pool.counts().total === 3, 15_000, "the authentication and points PSAMs in the pool");
    card = await openCard(cardPath);
    purseId = (await card.readPurse()).purseId.toString("hex");
  });
  after(async () => {
    for (const c of channels) c.close();
    await net?.close();
  });

  /** The merchant validation service as merchant `shopId` calls it (each merchant may use only its own key). */
  async function validationAs(shopId: string): Promise<Validation> {
    let v = validations.get(shopId);
    if (!v) {
      const channel = openChannel(net.validation.address, (await net.security.of("merchant", shopId)).channel({ kind: "validation" }));
      channels.push(channel);
      v = clientFactory().create(MerchantValidationServiceDefinition, channel);
      validations.set(shopId, v);
    }
    return v;
  }

  /** An offer of `shopId` for `amount`, with keys its validation service grants for exactly these terms. */
  async function offerAt(shopId: string, amount: Money): Promise<PaymentOffer> {
    const template = defined((await defined(net.merchants[shopId], shopId).createOrder({ productId: "song-1" })).offer, "an offer");
    return grantedOffer(net, template, { amount, expiresInMs: 10 * 60_000 }, await validationAs(shopId));
  }

  /** ValidateConfirmation as the offer's merchant, for the offer's terms (or `terms` instead). */
  async function validate(o: PaymentOffer, m: Sealed | undefined, debitResponse: Buffer = Buffer.alloc(0), terms: Partial<{ amount: Money }> = {}) {
    const merchantId = defined(o.merchantId, "merchant id").value;
    return (await validationAs(merchantId)).validateConfirmation({
      order: { transactionId: o.transactionId, merchantId: o.merchantId, amount: terms.amount ?? o.amount, keyNonce: o.keyNonce },
      debitResultM: m,
      debitResponse,
    });
  }

  /** The card: money balance, points balance, transaction counter. */
  async function cardState() {
    const money = await card.readPurse();
    const pts = (await card.readPointsPurses()).find((p) => p.currency === SKYWAYS);
    return { money: money.balance, points: defined(pts, "the card's Skyways points purse").balance, counter: money.counter };
  }

  /** Batch records and PSAM counters of the PSAMs of one currency, as the concentrator reports them. */
  async function psams(currency: number) {
    const slots = (await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots).filter((s) => s.currencies.includes(currency));
    expect(slots, `a PSAM of currency ${currency} in the pool`).to.have.length.greaterThan(0);
    return {
      batch: slots.reduce((n, s) => n + s.batchCount, 0),
      counter: slots.reduce((n, s) => n + s.psamCounter, 0),
      pending: slots.reduce((n, s) => n + s.pendingDebits.length, 0),
    };
  }

  const purchase = async (o: PaymentOffer) => defined((await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase, "the purchase");
  const notRecorded = async (o: PaymentOffer) =>
    expect((await failure(net.clients.payment.getPurchase({ transactionId: o.transactionId }))).code, "GetPurchase").to.equal("NOT_FOUND");

  /** The draw request of the offer with the card opened on the purse of `currency` (the authentication application for 999). */
  async function draw(o: PaymentOffer, currency: number) {
    const init = await card.initializeForPurchase(currency);
    return sealDrawRequest(o, drawRequestWith(o, init.raw, card.answerToReset));
  }

  /** Has a PSAM sign the DEBIT command for the offer and the card execute it. */
  async function issueAndDebit(o: PaymentOffer, currency: number) {
    const r = await net.clients.payment.processDrawRequest(await draw(o, currency));
    const issued = openIssued(o, r);
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    expect(debit.sw, "the card's status word").to.equal(SW.OK);
    expect(defined(debit.parsed, "the card's answer").result, "the card's result").to.equal(DebitResult.DEBITED);
    return { r, issued, debit };
  }

  /**
   * The rest of the transaction as the client and merchant of the mode do
   * it: the debit result M the merchant validates, after the card's proof
   * reached the payment server (CompletePurchase, the client's report, or
   * the merchant's through its validation service).
   */
  async function finish(mode: Mode, o: PaymentOffer, t: Awaited<ReturnType<typeof issueAndDebit>>, expected: DebitResultStatus) {
    const token = t.issued.completionToken;
    if (mode === "PSAM_VERIFIES" || mode === "SERVER_COMPARES") {
      expect(t.r.debitResultM, "no debit result M before the card's answer").to.equal(undefined);
      const done = await net.clients.payment.completePurchase(completeRequest(o, { sw: t.debit.sw, raw: t.debit.raw, token }));
      const m = await openResultM(net, o, done.debitResultM);
      expect(m.status, "debit result M's status").to.equal(expected);
      expect(openResultC(o, done).state).to.be.oneOf([PurchaseState.PURCHASE_STATE_PROVEN, PurchaseState.PURCHASE_STATE_COMPLETED]);
      return { m, sealed: done.debitResultM, validated: await validate(o, done.debitResultM) };
    }
    // One round trip: M came with the DEBIT command, issued, with the expected signature's digest for the comparator.
    const m = await openResultM(net, o, t.r.debitResultM);
    expect(m.status, "the early debit result M").to.equal(DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED);
    if (mode === "CLIENT_COMPARES") {
      const digest = Buffer.from(t.issued.expectedCardSignatureDigest);
      expect(cardProofDigest(idOf(o), defined(t.debit.parsed, "answer").cardSignature).equals(digest), "the agent's comparison").to.equal(true);
      const validated = await validate(o, t.r.debitResultM);
      await net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: t.debit.raw });
      return { m, sealed: t.r.debitResultM, validated };
    }
    return { m, sealed: t.r.debitResultM, validated: await validate(o, t.r.debitResultM, t.debit.raw) }; // the service reports the proof itself
  }

  describe("an authentication (0 in currency 999) in each confirmation mode", () => {
    for (const [mode, shopId] of SHOPS) {
      it(`${mode}: the card proves its presence; M names the purse, the purchase is COMPLETED at 0 in 999, no money moves and no batch records it`, async () => {
        const o = await offerAt(shopId, AUTHENTICATION);
        const before = await cardState();
        const auth0 = await psams(AUTHENTICATION_CURRENCY);
        const money0 = await psams(978);
        const init = await card.initializeForPurchase(AUTHENTICATION_CURRENCY);
        expect(init.parsed).to.include({ currency: AUTHENTICATION_CURRENCY, exponent: 0, balance: 0 });
        const t = await issueAndDebit(o, AUTHENTICATION_CURRENCY);
        expect(t.debit.parsed).to.include({ balance: 0, counter: before.counter + 1 });
        const { m, validated } = await finish(mode, o, t, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED);
        expect(m.amount).to.deep.equal(AUTHENTICATION);
        expect(hexOf(m.purseId?.value), "the purse id in M").to.equal(purseId);
        expect(hexOf(validated.purseId?.value), "the purse id the merchant learns").to.equal(purseId);
        await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the authentication COMPLETED");
        const p = await purchase(o);
        expect(p.amount).to.deep.equal(AUTHENTICATION);
        expect(p.events.map((e) => e.step)).to.include("authenticated");
        const after = await cardState();
        expect(after, "the card: money and points unchanged, counter + 1").to.deep.equal({ ...before, counter: before.counter + 1 });
        const auth1 = await psams(AUTHENTICATION_CURRENCY);
        expect(auth1.counter - auth0.counter, "the authentication PSAM signed once").to.equal(1);
        expect(auth1.batch, "no batch record for an authentication").to.equal(auth0.batch);
        expect(auth1.pending, "no debit left open").to.equal(auth0.pending);
        expect(await psams(978), "the money PSAM untouched").to.deep.equal(money0);
        const stored = await defined(net.hosts.get(LOYALTY_TERMINAL), "the loyalty terminal").host.data.transactions();
        expect(
          stored.filter((x) => x.transaction_id === idOf(o)),
          "no payment record at the terminal host",
        ).to.have.length(0);
        if (mode === "MERCHANT_COMPARES") {
          await waitFor(
            async () => (await net.validation.reporter.rows()).some((x) => x.transaction_id === idOf(o) && x.state === "ACKNOWLEDGED"),
            10_000,
            "the merchant's report acknowledged",
          );
        }
      });
    }
  });

  describe("a redemption in points (programme 1001)", () => {
    for (const [mode, shopId] of [SHOPS[0], SHOPS[3]]) {
      it(`${mode}: the points purse pays, the points PSAM records it in its batch in 1001, the money purse is untouched`, async () => {
        const o = await offerAt(shopId, points(120));
        const before = await cardState();
        const pts0 = await psams(SKYWAYS);
        const t = await issueAndDebit(o, SKYWAYS);
        expect(t.debit.parsed).to.include({ balance: before.points - 120 });
        const { m, validated } = await finish(mode, o, t, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED);
        expect(m.amount).to.deep.equal(points(120));
        expect(hexOf(validated.purseId?.value)).to.equal(purseId);
        await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the redemption in the PSAM's batch");
        expect(await cardState()).to.deep.equal({ money: before.money, points: before.points - 120, counter: before.counter + 1 });
        expect((await psams(SKYWAYS)).batch - pts0.batch, "one batch record").to.equal(1);
        const stored = await defined(net.hosts.get(LOYALTY_TERMINAL), "the loyalty terminal").host.data.transactions();
        expect(stored.find((x) => x.transaction_id === idOf(o))).to.include({ amount_minor: 120, currency: SKYWAYS, merchant_id: shopId });
      });
    }
  });

  describe("the payment operator's security module: a verdict of the wrong kind is a forgery", () => {
    it("AUTHENTICATED verifies for a debit in 999 only, RECORDED never for one, even under the PSAM's genuine MAC", async () => {
      const checker = await SoftwareSecurityModule.open(net.paths.payment);
      const master = Buffer.from((JSON.parse(await readFile(join(net.paths.payment, VERDICT_KEY_FILE), "utf8")) as VerdictKeyFile).verdictMaster, "hex");
      const psamId = "0a0b0c0d";
      const verdictKey = diversifyPsamKey(master, Buffer.from(psamId, "hex"));
      const check = (currency: number, verdict: number) => {
        const f = {
          psamCounter: 7,
          transactionRef: randomUUID(),
          amount: currency === AUTHENTICATION_CURRENCY ? 0 : 120,
          currency,
          verdict,
          cardResult: 0,
          batchNumber: 1,
          cardSignature: Buffer.alloc(8, 7),
        };
        return checker.verdict(psamId, f, verdictMac(verdictKey, { ...f, psamId: Buffer.from(psamId, "hex") }));
      };
      const cases: [number, number, boolean][] = [
        [AUTHENTICATION_CURRENCY, Verdict.AUTHENTICATED, true],
        [AUTHENTICATION_CURRENCY, Verdict.DECLINED_BY_CARD, true],
        [AUTHENTICATION_CURRENCY, Verdict.RECORDED, false],
        [978, Verdict.RECORDED, true],
        [978, Verdict.AUTHENTICATED, false],
        [SKYWAYS, Verdict.RECORDED, true],
        [SKYWAYS, Verdict.AUTHENTICATED, false],
        [978, 0x03, false],
      ];
      for (const [currency, verdict, accepted] of cases) expect(check(currency, verdict), `verdict ${verdict} for currency ${currency}`).to.equal(accepted);
    });
  });

  describe("attacks and bad input: refused, nothing recorded, debited or released", () => {
    it("a draw request of 0 in money or of more than 0 in 999: INVALID_ARGUMENT naming the amount, nothing recorded", async () => {
      const before = await cardState();
      const counters = [await psams(978), await psams(AUTHENTICATION_CURRENCY)];
      for (const [name, offered, drawn, currency] of [
        ["0 in money", money(250, 978, 2), money(0, 978, 2), undefined],
        ["1 in 999", AUTHENTICATION, money(1, AUTHENTICATION_CURRENCY, 0), AUTHENTICATION_CURRENCY],
        ["0 in points", points(10), points(0), SKYWAYS],
      ] as const) {
        const o = await offerAt("demo-shop", offered);
        const init = await card.initializeForPurchase(currency);
        const dr = drawRequestWith(o, init.raw, card.answerToReset);
        dr.amount = drawn;
        const f = await failure(net.clients.payment.processDrawRequest(sealDrawRequest(o, dr)));
        expect(f, name).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
        expect(f.details, name).to.contain("draw_request.amount.amount_minor");
        await notRecorded(o);
      }
      expect([await psams(978), await psams(AUTHENTICATION_CURRENCY)], "no PSAM asked").to.deep.equal(counters);
      expect(await cardState()).to.deep.equal(before);
    });

    it("the merchant validation service grants keys for money, points and 0 in 999 only (INVALID_ARGUMENT naming the field)", async () => {
      const v = await validationAs("demo-shop");
      const ask = (amount: Money) =>
        v.issueTransactionKeys({
          transactionId: { value: randomUUID() },
          merchantId: { value: "demo-shop" },
          amount,
          expiresAt: new Date(Date.now() + 60_000),
        });
      for (const ok of [AUTHENTICATION, points(1), points(0xffffffff), money(1, 978, 2)]) await ask(ok);
      for (const [bad, field] of [
        [money(0, 978, 2), "amount.amount_minor"],
        [money(5, AUTHENTICATION_CURRENCY, 0), "amount.amount_minor"],
        [money(0, AUTHENTICATION_CURRENCY, 2), "amount.exponent"],
        [points(0), "amount.amount_minor"],
        [money(10, SKYWAYS, 2), "amount.exponent"],
        [money(10, 65_536, 0), "amount.currency"],
        [money(10, 0, 0), "amount.currency"],
      ] as const) {
        const f = await failure(ask(bad));
        expect(f, field).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
        expect(f.details, field).to.contain(field);
      }
    });

    it("a money card's answer to an authentication's offer: CURRENCY_MISMATCH, refused before any PSAM signs", async () => {
      const o = await offerAt("demo-shop", AUTHENTICATION);
      const before = await cardState();
      const auth0 = await psams(AUTHENTICATION_CURRENCY);
      const f = await failure(net.clients.payment.processDrawRequest(await draw(o, 978)));
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "CURRENCY_MISMATCH" });
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      expect(await psams(AUTHENTICATION_CURRENCY)).to.deep.equal(auth0);
      expect(await cardState()).to.deep.equal(before);
    });

    for (const [mode, shopId] of SHOPS) {
      it(`${mode}: the card's answer of one authentication replayed for another is refused; the other is not completed`, async () => {
        const first = await offerAt(shopId, AUTHENTICATION);
        const t1 = await issueAndDebit(first, AUTHENTICATION_CURRENCY);
        await finish(mode, first, t1, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED);
        const o = await offerAt(shopId, AUTHENTICATION);
        const r = await net.clients.payment.processDrawRequest(await draw(o, AUTHENTICATION_CURRENCY));
        const issued = openIssued(o, r); // the card never sees this DEBIT command: the old answer stands in for it
        const replay = t1.debit.raw;
        let f;
        if (mode === "PSAM_VERIFIES" || mode === "SERVER_COMPARES") {
          f = await failure(net.clients.payment.completePurchase(completeRequest(o, { sw: SW.OK, raw: replay, token: issued.completionToken })));
          expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
        } else if (mode === "CLIENT_COMPARES") {
          f = await failure(net.clients.payment.reportCardSignature({ transactionId: o.transactionId, debitResponse: replay }));
          expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED); // nothing proven
        } else {
          f = await failure(validate(o, r.debitResultM, replay));
          expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_DEBIT_COMMAND_ISSUED);
          expect(
            (await net.validation.reporter.rows()).some((x) => x.transaction_id === idOf(o)),
            "no proof queued",
          ).to.equal(false);
        }
        expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
        expect((await purchase(o)).events.map((e) => e.step)).to.not.include("authenticated");
      });
    }

    it("a lying client asks to redeem more points than the card holds: INSUFFICIENT_BALANCE at the PSAM, nothing debited", async () => {
      const before = await cardState();
      const pts0 = await psams(SKYWAYS);
      const o = await offerAt("demo-shop", points(before.points + 1));
      const f = await failure(net.clients.payment.processDrawRequest(await draw(o, SKYWAYS)));
      expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_BALANCE" });
      expect((await purchase(o)).state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      const pts1 = await psams(SKYWAYS);
      expect(pts1.batch).to.equal(pts0.batch);
      expect(pts1.pending).to.equal(pts0.pending);
      expect(await cardState()).to.deep.equal(before);
    });

    it("an authentication's debit result M is no confirmation for another merchant's order, nor for a payment", async () => {
      const o = await offerAt("demo-shop", AUTHENTICATION);
      const t = await issueAndDebit(o, AUTHENTICATION_CURRENCY);
      const { sealed } = await finish("PSAM_VERIFIES", o, t, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED);
      // Another merchant's order (its own transaction, or this transaction id under its key): the seal does not open.
      const elsewhere = await offerAt("server-shop", AUTHENTICATION);
      expect(await failure(validate(elsewhere, sealed))).to.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      expect(await failure(validate({ ...elsewhere, transactionId: o.transactionId }, sealed))).to.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      // The same merchant's order of money under this transaction: the terms differ.
      const f = await failure(validate(o, sealed, Buffer.alloc(0), { amount: money(250, 978, 2) }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
    });

    it("ValidateConfirmation: AUTHENTICATED only for an order of 0 in 999, CONFIRMED never for one (CONFIRMATION_MISMATCH)", async () => {
      // Results sealed with the merchant's genuine key, as only the payment server could: the status is checked against the order's kind.
      const key = defined(await new MerchantRegistry(join(net.paths.payment, "merchants.json")).get("demo-shop"), "demo-shop's key").key;
      const sealedAs = (o: PaymentOffer, status: DebitResultStatus) => {
        const id = idOf(o);
        const m: DebitResultM = {
          transactionId: o.transactionId,
          merchantId: o.merchantId,
          amount: o.amount,
          purseId: { value: Buffer.from(purseId, "hex") },
          psamId: { value: Buffer.from("00000001", "hex") },
          psamCounter: 1,
          confirmationMode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
          status,
          expectedCardSignature: Buffer.alloc(0),
          expectedCardSignatureDigest: Buffer.alloc(0),
          issuedAt: new Date(),
        };
        return seal(transactionKey(key, "demo-shop", id, o.keyNonce), "DEBIT_RESULT_M", id, DebitResultM.encode(m).finish());
      };
      const auth = await offerAt("demo-shop", AUTHENTICATION);
      const pay = await offerAt("demo-shop", money(250, 978, 2));
      const pointsOffer = await offerAt("demo-shop", points(10));
      expect(hexOf((await validate(auth, sealedAs(auth, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED))).purseId?.value)).to.equal(purseId);
      await validate(pay, sealedAs(pay, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED));
      await validate(pointsOffer, sealedAs(pointsOffer, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED));
      for (const [o, status, what] of [
        [auth, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED, "CONFIRMED for an authentication"],
        [pay, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED, "AUTHENTICATED for a payment"],
        [pointsOffer, DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED, "AUTHENTICATED for a redemption"],
      ] as const) {
        const f = await failure(validate(o, sealedAs(o, status)));
        expect(f, what).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
        expect(f.details, what).to.contain("status");
      }
    });
  });
});
