// Contract of a benefits site (docs/loyalty.md): netpurse.benefits.v1
// BenefitsService (rewards, points granted by enrolled merchants, their
// credit to a real software card's points purse through the programme's
// security module) and the site's MerchantService (rewards ordered, released
// through the real merchant validation service), the real site server on
// loopback inside the real test network; and a shop enrolled in the
// programme, which puts the site's grant in its receipt.

import { expect } from "chai";
import Database from "better-sqlite3";
import type { Client } from "nice-grpc";
import { randomBytes, randomUUID } from "node:crypto";
import { copyFile } from "node:fs/promises";
import { join } from "node:path";
import { BenefitsServiceDefinition, GrantState, RewardKind } from "../../gen/netpurse/benefits/v1/benefits.js";
import { ConfirmationMode, type Money, type PointsGrant } from "../../gen/netpurse/card/v1/card.js";
import { MerchantServiceDefinition, OrderState, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { DebitResultM, DebitResultStatus } from "../../gen/netpurse/payment/v1/payment.js";
import { withOriginalAmount } from "../../client/card/purse-reader.js";
import type { CardFile } from "../../client/card/software-card.js";
import { readState } from "../../lib/apdu/state-log.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { txnId } from "../../lib/ids.js";
import { seal, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { LoadCommand, loadS2, LoadResponse, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import type { Security } from "../../lib/pki/security.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import type { ShopFile } from "../../services/merchant/shop.js";
import { startMerchant } from "../../services/merchant/server.js";
import { registerMerchant } from "../../services/operator/operator.js";
import { startBenefits } from "../../services/benefits/server.js";
import { BENEFITS_DB, PROGRAMME_HSM_FILE, writeDemoSite } from "../../services/benefits/site.js";
import { completeRequest, drawRequestFor, failure, openCard, openIssued } from "../support/card-client.js";
import { makeCard, makeIssuer, makeProgramme, makeProgrammeHsm, SKYWAYS, tempDir } from "../support/fixtures.js";
import { defined, termsOf } from "../support/offers.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

const SITE = "skyways";
/** The enrolled shop's rate: points per euro (the rate times the amount, rounded down). */
const RATE = 10;
const eur = (minor: number): Money => ({ amountMinor: BigInt(minor), currency: 978, exponent: 2 });

describe("contract: a benefits site (netpurse.benefits.v1.BenefitsService and its MerchantService)", function () {
  this.timeout(60_000);
  let net: Network;
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  let siteDir: string;
  let site: Awaited<ReturnType<typeof startBenefits>>;
  let siteValidation: Awaited<ReturnType<typeof startMerchantValidation>>;
  /** The key the payment operator shares with the site (its registry entry). */
  let siteKey: Buffer;
  const cards: Record<"member" | "stranger" | "plain" | "full", { path: string; purse: string }> = {} as never;
  const channels: { close(): void }[] = [];
  let asCardholder: Client<typeof BenefitsServiceDefinition>;
  let asEnrolled: Client<typeof BenefitsServiceDefinition>;
  let siteShop: Client<typeof MerchantServiceDefinition>;

  const startSite = async (listen = "127.0.0.1:0") =>
    startBenefits({
      security: await net.security.of("merchant", SITE),
      listen,
      dir: siteDir,
      validation: siteValidation.address,
      paymentServer: net.payment.address,
    });
  const benefitsAs = (security: Pick<Security, "channel">) => {
    const c = openChannel(site.address, security.channel({ kind: "merchant", id: SITE }));
    channels.push(c);
    return clientFactory().create(BenefitsServiceDefinition, c);
  };
  const purseOf = async (path: string) => (await readState<CardFile>(path)).purseId;

  before(async () => {
    net = await startNetwork();
    ({ dir, cleanup } = await tempDir("netpurse-benefits-"));
    issuer = await makeIssuer(dir);
    await makeProgramme(issuer);
    const made: [keyof typeof cards, Parameters<typeof makeCard>[2]][] = [
      ["member", { points: [{ programme: SKYWAYS, value: 500 }] }],
      ["stranger", { points: [{ programme: SKYWAYS, value: 0 }] }],
      ["plain", {}],
      ["full", { points: [{ programme: SKYWAYS, value: 990, maxBalance: 1_000 }] }],
    ];
    for (const [name, o] of made) {
      const path = await makeCard(issuer, dir, { name, ...o });
      cards[name] = { path, purse: await purseOf(path) };
    }
    // The site, registered at the operator as a merchant, with a validation service that holds its key.
    siteDir = join(dir, "benefits", SITE);
    const validationDir = join(dir, "validation");
    await registerMerchant({
      paymentDir: join(dir, "payment"),
      validationDir,
      merchantId: SITE,
      name: "Skyways benefits",
      mode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
    });
    siteKey = Buffer.from(
      defined((await readJson<{ merchants: { merchantId: string; sharedKey: string }[] }>(join(validationDir, "keys.json"))).merchants[0], "the key").sharedKey,
      "hex",
    );
    siteValidation = await startMerchantValidation({
      security: await net.security.of("validation", "validation-1"),
      listen: "127.0.0.1:0",
      dir: validationDir,
      paymentServer: net.payment.address,
    });
    await writeDemoSite(siteDir, {
      memberPurseIds: [cards.member.purse, cards.full.purse, await purseOf(net.cardPath)],
      enrolled: [{ merchantId: "demo-shop", pointsPerUnit: RATE }],
    });
    await copyFile(await makeProgrammeHsm(issuer, dir), join(siteDir, PROGRAMME_HSM_FILE));
    site = await startSite();
    asCardholder = benefitsAs(net.security.cardholder);
    asEnrolled = benefitsAs(await net.security.of("merchant", "demo-shop"));
    const shopChannel = openChannel(site.address, net.security.cardholder.channel({ kind: "merchant", id: SITE }));
    channels.push(shopChannel);
    siteShop = clientFactory().create(MerchantServiceDefinition, shopChannel);
  });
  after(async () => {
    for (const c of channels) c.close();
    await site?.close();
    await siteValidation?.close();
    await issuer?.close();
    await net?.close();
    await cleanup?.();
  });

  /** The grants the site keeps for a purchase of a merchant (what an auditor would count). */
  const grantsOf = (merchant: string, transaction: string) => {
    const db = new Database(join(siteDir, BENEFITS_DB), { readonly: true });
    try {
      return (db.prepare("SELECT COUNT(*) AS n FROM grants WHERE merchant_id = ? AND transaction_id = ?").get(merchant, transaction) as { n: number }).n;
    } finally {
      db.close();
    }
  };
  const allGrants = () => {
    const db = new Database(join(siteDir, BENEFITS_DB), { readonly: true });
    try {
      return (db.prepare("SELECT COUNT(*) AS n FROM grants").get() as { n: number }).n;
    } finally {
      db.close();
    }
  };
  /** A grant from the enrolled shop for a purchase of `paidMinor` euro cents by `purse`. */
  const grant = async (purse: string, paidMinor = 1_234): Promise<PointsGrant> =>
    defined(
      (await asEnrolled.grantPoints({ transactionId: txnId(randomUUID()), purseId: { value: Buffer.from(purse, "hex") }, amount: eur(paidMinor) })).grant,
      "a grant",
    );
  /** The card's INITIALIZE FOR LOAD as the cardholder's client makes it for a grant: exactly the grant's points, site, time and id. */
  const commandFor = (g: PointsGrant, change: Partial<LoadInitCommand> = {}): LoadInitCommand => ({
    amount: Number(defined(g.points, "the grant's points").amountMinor),
    currency: g.programme,
    bankId: g.siteId,
    dateTime: Math.floor(defined(g.grantedAt, "the grant's time").getTime() / 1000),
    transactionRef: defined(g.grantId, "the grant id").value,
    ...change,
  });
  const pointsOn = async (path: string) => {
    const purse = (await (await openCard(path)).readPointsPurses()).find((p) => p.currency === SKYWAYS);
    return defined(purse, "the card's Skyways purse").balance;
  };

  describe("ListRewards", () => {
    it("gives the site, the programme and the rewards with their prices: points in the programme's code, an authentication 0 in 999", async () => {
      const r = await asCardholder.listRewards({});
      expect(r.siteId?.value).to.equal(SITE);
      expect(r.siteName).to.equal("Skyways benefits");
      expect(r.programme).to.deep.equal({ code: SKYWAYS, name: "Skyways Miles" });
      expect(r.rewards.map((x) => [x.rewardId, x.kind, x.price])).to.deep.equal([
        ["lounge", RewardKind.REWARD_KIND_POINTS, { amountMinor: 2_000n, currency: SKYWAYS, exponent: 0 }],
        ["upgrade", RewardKind.REWARD_KIND_POINTS, { amountMinor: 15_000n, currency: SKYWAYS, exponent: 0 }],
        ["booking", RewardKind.REWARD_KIND_AUTHENTICATION, { amountMinor: 0n, currency: 999, exponent: 0 }],
      ]);
    });
  });

  describe("GrantPoints", () => {
    it("grants an enrolled merchant's buyer its rate times the amount paid, rounded down; the same purchase again gets the same grant", async () => {
      const transactionId = txnId(randomUUID());
      const purseId = { value: Buffer.from(cards.member.purse, "hex") };
      const first = defined((await asEnrolled.grantPoints({ transactionId, purseId, amount: eur(1_299) })).grant, "a grant");
      expect(first.points).to.deep.equal({ amountMinor: 129n, currency: SKYWAYS, exponent: 0 }); // EUR 12.99 × 10 = 129.9
      expect(first).to.deep.include({ programme: SKYWAYS, siteId: SITE, siteAddress: site.address });
      expect(first.purseId?.value).to.deep.equal(purseId.value);
      expect(first.grantId?.value).to.match(/^[0-9a-f-]{36}$/);
      expect(defined(first.grantedAt, "the grant's time").getMilliseconds()).to.equal(0);
      const again = await asEnrolled.grantPoints({ transactionId, purseId, amount: eur(1_299) });
      expect(again.grant).to.deep.equal(first);
      expect(grantsOf("demo-shop", transactionId.value)).to.equal(1);
    });

    it("refuses the same transaction for another card or amount (ALREADY_EXISTS, TRANSACTION_ID_REUSED), a purchase worth no points, and malformed fields", async () => {
      const transactionId = txnId(randomUUID());
      const purseId = { value: Buffer.from(cards.member.purse, "hex") };
      await asEnrolled.grantPoints({ transactionId, purseId, amount: eur(5_000) });
      const stranger = { value: Buffer.from(cards.stranger.purse, "hex") };
      expect(await failure(asEnrolled.grantPoints({ transactionId, purseId: stranger, amount: eur(5_000) }))).to.include({
        code: "ALREADY_EXISTS",
        reason: "TRANSACTION_ID_REUSED",
      });
      expect(await failure(asEnrolled.grantPoints({ transactionId, purseId, amount: eur(6_000) }))).to.include({
        code: "ALREADY_EXISTS",
        reason: "TRANSACTION_ID_REUSED",
      });
      // 9 cents × 10 = 0.9 points: none.
      const cheap = txnId(randomUUID());
      expect(await failure(asEnrolled.grantPoints({ transactionId: cheap, purseId, amount: eur(9) }))).to.include({ code: "FAILED_PRECONDITION" });
      expect(grantsOf("demo-shop", cheap.value)).to.equal(0);
      const bad: [string, Parameters<typeof asEnrolled.grantPoints>[0], string][] = [
        ["points are not money", { transactionId: txnId(randomUUID()), purseId, amount: { amountMinor: 100n, currency: SKYWAYS, exponent: 0 } }, "amount"],
        ["an authentication is not money", { transactionId: txnId(randomUUID()), purseId, amount: { amountMinor: 0n, currency: 999, exponent: 0 } }, "amount"],
        ["a 7-byte purse id", { transactionId: txnId(randomUUID()), purseId: { value: randomBytes(7) }, amount: eur(100) }, "purse_id"],
        ["no transaction id", { purseId, amount: eur(100) }, "transaction_id"],
        ["no amount", { transactionId: txnId(randomUUID()), purseId }, "amount"],
      ];
      for (const [what, req, field] of bad) {
        const f = await failure(asEnrolled.grantPoints(req));
        expect(f, what).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
        expect(f.details, what).to.contain(field);
      }
    });

    it("only for enrolled merchants: another merchant's or another kind's certificate is PERMISSION_DENIED (NOT_ALLOWED), no certificate UNAUTHENTICATED; nothing is granted", async () => {
      const before = allGrants();
      const req = { transactionId: txnId(randomUUID()), purseId: { value: Buffer.from(cards.member.purse, "hex") }, amount: eur(10_000) };
      const callers: [string, Pick<Security, "channel">, { code: string; reason: string }][] = [
        ["a merchant not enrolled", await net.security.of("merchant", "server-shop"), { code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" }],
        ["the site itself", await net.security.of("merchant", SITE), { code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" }],
        ["the operator", await net.security.of("operator", "operator"), { code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" }],
        ["a cardholder (no certificate)", net.security.cardholder, { code: "UNAUTHENTICATED", reason: "UNAUTHENTICATED" }],
      ];
      for (const [who, security, refusal] of callers) expect(await failure(benefitsAs(security).grantPoints(req)), who).to.include(refusal);
      expect(allGrants()).to.equal(before);
    });
  });

  describe("IssuePointsCredit and ConfirmPointsCredit: the grant collected onto a real card", () => {
    it("INITIALIZE FOR LOAD, IssuePointsCredit, LOAD, ConfirmPointsCredit: the points are on the card once; confirming again gives the same answer", async () => {
      const g = await grant(cards.member.purse, 2_500); // EUR 25.00: 250 points
      const before = await pointsOn(cards.member.path);
      const card = await openCard(cards.member.path);
      const init = await card.initializeForLoad(commandFor(g));
      expect(init.parsed.currency).to.equal(SKYWAYS);
      const { loadCommand } = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: init.raw });
      const loaded = await card.load(Buffer.from(loadCommand));
      expect(loaded.sw).to.equal(0x9000);
      expect(await pointsOn(cards.member.path)).to.equal(before + 250);
      const confirmed = await asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: loaded.raw });
      expect(confirmed.state).to.equal(GrantState.GRANT_STATE_CREDITED);
      expect(confirmed.balance).to.deep.equal({ amountMinor: BigInt(before + 250), currency: SKYWAYS, exponent: 0 });
      expect(defined(confirmed.creditedAt, "the credit's time").getTime()).to.be.closeTo(Date.now(), 5_000);
      expect(await asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: loaded.raw })).to.deep.equal(confirmed);
      // Nothing more is signed for it.
      const next = await card.initializeForLoad(commandFor(g));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: next.raw }))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "GRANT_ALREADY_CREDITED",
      });
      expect(await pointsOn(cards.member.path)).to.equal(before + 250);
    });

    it("the same card answer again gets the same LOAD command; while the card's counter has not moved, a new answer gets a new command", async () => {
      const g = await grant(cards.member.purse, 1_000); // 100 points
      const before = await pointsOn(cards.member.path);
      const card = await openCard(cards.member.path);
      const first = await card.initializeForLoad(commandFor(g));
      const c1 = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: first.raw });
      expect((await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: first.raw })).loadCommand).to.deep.equal(c1.loadCommand);
      // The first command never reached the card: a new INITIALIZE FOR LOAD (same counter, new challenge) gets a new command,
      // and the first, made for the session the card left, is refused by the card (which ends that session too).
      const second = await card.initializeForLoad(commandFor(g));
      expect(second.parsed.counter).to.equal(first.parsed.counter);
      const c2 = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: second.raw });
      expect(Buffer.from(c2.loadCommand).equals(Buffer.from(c1.loadCommand))).to.equal(false);
      expect((await card.load(Buffer.from(c1.loadCommand))).sw, "the first command, in the second's session").to.equal(0x6982);
      expect(await pointsOn(cards.member.path)).to.equal(before);
      const third = await card.initializeForLoad(commandFor(g));
      const c3 = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: third.raw });
      const loaded = await card.load(Buffer.from(c3.loadCommand));
      expect(loaded.sw).to.equal(0x9000);
      expect((await asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: loaded.raw })).state).to.equal(GrantState.GRANT_STATE_CREDITED);
      expect(await pointsOn(cards.member.path)).to.equal(before + 100);
    });

    it("a second credit after the card took the first (its counter moved) is GRANT_ALREADY_CREDITED; the first is still confirmed; the points are credited once", async () => {
      const g = await grant(cards.member.purse, 3_000); // 300 points
      const before = await pointsOn(cards.member.path);
      const card = await openCard(cards.member.path);
      const init = await card.initializeForLoad(commandFor(g));
      const { loadCommand } = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: init.raw });
      const loaded = await card.load(Buffer.from(loadCommand)); // the answer is "lost": not confirmed yet
      expect(loaded.sw).to.equal(0x9000);
      const again = await card.initializeForLoad(commandFor(g));
      expect(again.parsed.counter).to.equal(init.parsed.counter + 1);
      expect(await failure(asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: again.raw }))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "GRANT_ALREADY_CREDITED",
      });
      expect((await asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: loaded.raw })).balance?.amountMinor).to.equal(BigInt(before + 300));
      expect(await pointsOn(cards.member.path)).to.equal(before + 300);
    });

    it("another card's answer for the grant is PERMISSION_DENIED (NOT_ALLOWED); nothing is signed", async () => {
      const g = await grant(cards.member.purse);
      const other = await (await openCard(cards.stranger.path)).initializeForLoad(commandFor(g));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: other.raw }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "NOT_ALLOWED",
      });
      // No credit was signed: there is none to confirm.
      expect(await failure(asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: Buffer.alloc(LoadResponse.size) }))).to.include({
        code: "NOT_FOUND",
      });
      expect(await pointsOn(cards.stranger.path)).to.equal(0);
    });

    it("an S1 that does not verify for the grant (other points asked of the card, or an altered answer) is PERMISSION_DENIED (BAD_SIGNATURE)", async () => {
      const g = await grant(cards.member.purse);
      const card = await openCard(cards.member.path);
      const more = await card.initializeForLoad(commandFor(g, { amount: 1_000_000 }));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: more.raw }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "BAD_SIGNATURE",
      });
      const genuine = await card.initializeForLoad(commandFor(g));
      const altered = Buffer.from(genuine.raw);
      altered[altered.length - 1]! ^= 1; // a bit of S1
      expect(await failure(asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: altered }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "BAD_SIGNATURE",
      });
    });

    it("a LOAD command the client made up (S2 under a key that is not the programme's) is refused by the card; nothing is credited", async () => {
      const g = await grant(cards.member.purse, 10_000);
      const before = await pointsOn(cards.member.path);
      const card = await openCard(cards.member.path);
      const init: { parsed: LoadInit } = await card.initializeForLoad(commandFor(g));
      const fields = {
        amount: 1_000,
        currency: SKYWAYS,
        hsmId: randomBytes(4),
        hsmCounter: 1,
        dateTime: commandFor(g).dateTime,
        transactionRef: defined(g.grantId, "the grant id").value,
      };
      const minted = LoadCommand.encode({ ...fields, s2: loadS2(randomBytes(16), init.parsed, fields) });
      expect((await card.load(minted)).sw).to.equal(0x6982);
      expect(await pointsOn(cards.member.path)).to.equal(before);
      // And the site has signed nothing for the grant.
      expect(await failure(asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: Buffer.alloc(LoadResponse.size) }))).to.include({
        code: "NOT_FOUND",
      });
    });

    it("an answer the card did not make is PERMISSION_DENIED (BAD_SIGNATURE) and the grant stays to confirm", async () => {
      const g = await grant(cards.member.purse, 1_000);
      const card = await openCard(cards.member.path);
      const init = await card.initializeForLoad(commandFor(g));
      const { loadCommand } = await asCardholder.issuePointsCredit({ grantId: g.grantId, initializeResponse: init.raw });
      const loaded = await card.load(Buffer.from(loadCommand));
      const forged = Buffer.from(loaded.raw);
      forged[forged.length - 1]! ^= 1; // a bit of S3
      expect(await failure(asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: forged }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "BAD_SIGNATURE",
      });
      expect((await asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: loaded.raw })).state).to.equal(GrantState.GRANT_STATE_CREDITED);
      // Once confirmed, another answer is not the one that confirmed it.
      expect(await failure(asCardholder.confirmPointsCredit({ grantId: g.grantId, loadResponse: forged }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "BAD_SIGNATURE",
      });
    });

    it("a card without room is FAILED_PRECONDITION (MAX_BALANCE_EXCEEDED); a card without the programme's purse CURRENCY_MISMATCH; nothing is signed", async () => {
      const full = await grant(cards.full.purse, 2_000); // 200 points onto 990 of at most 1,000
      const init = await (await openCard(cards.full.path)).initializeForLoad(commandFor(full));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: full.grantId, initializeResponse: init.raw }))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "MAX_BALANCE_EXCEEDED",
      });
      expect(await pointsOn(cards.full.path)).to.equal(990);
      const plain = await grant(cards.plain.purse);
      const money = await (await openCard(cards.plain.path)).initializeForLoad(commandFor(plain));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: plain.grantId, initializeResponse: money.raw }))).to.include({
        code: "FAILED_PRECONDITION",
        reason: "CURRENCY_MISMATCH",
      });
    });

    it("an unknown grant is NOT_FOUND; malformed requests INVALID_ARGUMENT naming the field", async () => {
      const unknown = txnId(randomUUID());
      const init = await (await openCard(cards.member.path)).initializeForLoad(commandFor(await grant(cards.member.purse)));
      expect(await failure(asCardholder.issuePointsCredit({ grantId: unknown, initializeResponse: init.raw }))).to.include({ code: "NOT_FOUND" });
      expect(await failure(asCardholder.confirmPointsCredit({ grantId: unknown, loadResponse: Buffer.alloc(LoadResponse.size) }))).to.include({
        code: "NOT_FOUND",
      });
      const bad: [string, () => Promise<unknown>, string][] = [
        ["a short card answer", () => asCardholder.issuePointsCredit({ grantId: unknown, initializeResponse: init.raw.subarray(1) }), "initialize_response"],
        ["no grant id", () => asCardholder.issuePointsCredit({ initializeResponse: init.raw }), "grant_id"],
        ["a grant id that is no UUID", () => asCardholder.issuePointsCredit({ grantId: { value: "lounge" }, initializeResponse: init.raw }), "grant_id"],
        [
          "a long LOAD answer",
          () => asCardholder.confirmPointsCredit({ grantId: unknown, loadResponse: Buffer.alloc(LoadResponse.size + 1) }),
          "load_response",
        ],
      ];
      for (const [what, call, field] of bad) {
        const f = await failure(call());
        expect(f, what).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
        expect(f.details, what).to.contain(field);
      }
    });
  });

  describe("the site's MerchantService: rewards ordered and released", () => {
    it("lists the rewards as products, and CreateOrder offers a points reward in points and an authentication as 0 in 999", async () => {
      const products = await siteShop.listProducts({});
      expect(products.merchantId?.value).to.equal(SITE);
      expect(products.products.map((p) => [p.productId, p.price])).to.deep.equal([
        ["lounge", { amountMinor: 2_000n, currency: SKYWAYS, exponent: 0 }],
        ["upgrade", { amountMinor: 15_000n, currency: SKYWAYS, exponent: 0 }],
        ["booking", { amountMinor: 0n, currency: 999, exponent: 0 }],
      ]);
      const lounge = defined((await siteShop.createOrder({ productId: "lounge" })).offer, "an offer");
      expect(lounge.amount).to.deep.equal({ amountMinor: 2_000n, currency: SKYWAYS, exponent: 0 });
      expect(lounge).to.deep.include({ merchantAddress: site.address, paymentServerAddress: net.payment.address, merchantName: "Skyways benefits" });
      expect(lounge.merchantId?.value).to.equal(SITE);
      const booking = defined((await siteShop.createOrder({ productId: "booking" })).offer, "an offer");
      expect(booking.amount).to.deep.equal({ amountMinor: 0n, currency: 999, exponent: 0 });
      expect(booking.transactionSessionKey).to.have.length(32);
      for (const o of [lounge, booking])
        expect((await siteShop.getOrder({ transactionId: o.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    /**
     * A debit result M sealed as the payment server seals it, with the key
     * the operator shares with the site: it stands in for a redemption or an
     * authentication through the payment network (tested end to end in
     * test/contract/payment-loyalty.test.ts), so that the real validation
     * service accepts it and the site's release hook decides.
     */
    const resultM = (offer: PaymentOffer, purse: string, status?: DebitResultStatus) => {
      const { id } = termsOf(offer);
      const amount = defined(offer.amount, "the offer's amount");
      const m: DebitResultM = {
        transactionId: txnId(id),
        merchantId: offer.merchantId,
        amount,
        purseId: { value: Buffer.from(purse, "hex") },
        psamId: { value: Buffer.from("a0000001", "hex") },
        psamCounter: 7,
        confirmationMode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
        status: status ?? (amount.currency === 999 ? DebitResultStatus.DEBIT_RESULT_STATUS_AUTHENTICATED : DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED),
        expectedCardSignature: Buffer.alloc(0),
        expectedCardSignatureDigest: Buffer.alloc(0),
        issuedAt: new Date(),
      };
      return seal(transactionKey(siteKey, SITE, id, offer.keyNonce), "DEBIT_RESULT_M", id, DebitResultM.encode(m).finish());
    };

    it("an authentication by a card linked to no member is PERMISSION_DENIED (NOT_A_MEMBER): nothing released, the order stays OFFERED", async () => {
      const offer = defined((await siteShop.createOrder({ productId: "booking" })).offer, "an offer");
      expect(await failure(siteShop.completeOrder({ transactionId: offer.transactionId, debitResultM: resultM(offer, cards.stranger.purse) }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "NOT_A_MEMBER",
      });
      expect((await siteShop.getOrder({ transactionId: offer.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_OFFERED);
    });

    it("an authentication by a member's card shows the member's booking, once; a payment's confirmation does not stand for it", async () => {
      const offer = defined((await siteShop.createOrder({ productId: "booking" })).offer, "an offer");
      const paidInstead = resultM(offer, cards.member.purse, DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED);
      expect(await failure(siteShop.completeOrder({ transactionId: offer.transactionId, debitResultM: paidInstead }))).to.include({
        code: "PERMISSION_DENIED",
        reason: "CONFIRMATION_MISMATCH",
      });
      expect((await siteShop.getOrder({ transactionId: offer.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_OFFERED);
      const m = resultM(offer, cards.member.purse);
      const r = defined((await siteShop.completeOrder({ transactionId: offer.transactionId, debitResultM: m })).receipt, "a receipt");
      expect(r.goods).to.equal("member 100234 Ana Silva: booking NP4821 LIS→AMS 12 Dec");
      expect(r.amount).to.deep.equal({ amountMinor: 0n, currency: 999, exponent: 0 });
      expect(r.pointsGrant).to.equal(undefined);
      expect(defined((await siteShop.completeOrder({ transactionId: offer.transactionId, debitResultM: m })).receipt, "the receipt").goods).to.equal(r.goods);
      expect((await siteShop.getOrder({ transactionId: offer.transactionId })).order?.state).to.equal(OrderState.ORDER_STATE_PAID);
    });

    it("a points reward releases a voucher naming the member; a card linked to no member gets its voucher too (the points were the entitlement)", async () => {
      const forMember = defined((await siteShop.createOrder({ productId: "lounge" })).offer, "an offer");
      const r1 = defined(
        (await siteShop.completeOrder({ transactionId: forMember.transactionId, debitResultM: resultM(forMember, cards.member.purse) })).receipt,
        "a receipt",
      );
      expect(r1.goods).to.match(/^Lounge pass voucher [0-9A-F]{4}(-[0-9A-F]{4}){3} for member 100234 Ana Silva$/);
      expect(r1.amount).to.deep.equal({ amountMinor: 2_000n, currency: SKYWAYS, exponent: 0 });
      const forStranger = defined((await siteShop.createOrder({ productId: "lounge" })).offer, "an offer");
      const r2 = defined(
        (await siteShop.completeOrder({ transactionId: forStranger.transactionId, debitResultM: resultM(forStranger, cards.stranger.purse) })).receipt,
        "a receipt",
      );
      expect(r2.goods).to.match(/^Lounge pass voucher [0-9A-F]{4}(-[0-9A-F]{4}){3}$/);
    });
  });

  describe("earning points: a shop enrolled in the programme", () => {
    const shops: { close(): Promise<void> }[] = [];
    after(async () => {
      for (const s of shops) await s.close();
    });

    /** A merchant server of the demo shop (enrolled at the site) over a fresh merchant.db, with `loyalty` in its shop.json. */
    async function enrolledShop(siteAddress: string) {
      const { dir: shopDir, cleanup: done } = await tempDir("netpurse-enrolled-");
      const shopFile = await readJson<ShopFile>(join(net.paths.merchant("demo-shop"), "shop.json"));
      await writeJsonAtomic(join(shopDir, "shop.json"), { ...shopFile, loyalty: { siteAddress, programme: SKYWAYS, siteId: SITE } });
      const server = await startMerchant({
        security: await net.security.of("merchant", "demo-shop"),
        listen: "127.0.0.1:0",
        dir: shopDir,
        validation: net.validation.address,
        paymentServer: net.payment.address,
      });
      const channel = openChannel(server.address, net.security.cardholder.channel({ kind: "merchant" }));
      shops.push({
        async close() {
          channel.close();
          await server.close();
          await done();
        },
      });
      return clientFactory().create(MerchantServiceDefinition, channel);
    }

    /** Pays an order of the shop through the real payment network with the demo card; returns the offer and its debit result M. */
    async function paid(shop: Client<typeof MerchantServiceDefinition>, product = "ebook-grpc") {
      const offer = defined((await shop.createOrder({ productId: product })).offer, "an offer");
      const card = await openCard(net.cardPath);
      const issued = openIssued(offer, await net.clients.payment.processDrawRequest(await drawRequestFor(card, offer)));
      const debit = await card.debit(withOriginalAmount(Buffer.from(issued.debitCommand), termsOf(offer).amountMinor));
      const done = await net.clients.payment.completePurchase(completeRequest(offer, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
      return { offer, debitResultM: defined(done.debitResultM, "debit result M") };
    }

    it("puts the site's grant for the purchase in the receipt: the card that paid, the rate times the amount; a repeat gets the same grant", async () => {
      const shop = await enrolledShop(site.address);
      const { offer, debitResultM } = await paid(shop); // EUR 9.90: 99 points
      const r1 = defined((await shop.completeOrder({ transactionId: offer.transactionId, debitResultM })).receipt, "a receipt");
      expect(r1.goods).to.match(/^licence key /);
      const g = defined(r1.pointsGrant, "the points grant");
      expect(g).to.deep.include({ programme: SKYWAYS, siteId: SITE, siteAddress: site.address });
      expect(g.points).to.deep.equal({ amountMinor: 99n, currency: SKYWAYS, exponent: 0 });
      expect(Buffer.from(defined(g.purseId, "the grant's purse").value).toString("hex")).to.equal(await purseOf(net.cardPath));
      const r2 = await shop.completeOrder({ transactionId: offer.transactionId, debitResultM });
      expect(r2.receipt?.pointsGrant).to.deep.equal(g);
      expect(grantsOf("demo-shop", termsOf(offer).id)).to.equal(1);
    });

    it("a site that cannot be reached never withholds the goods: the receipt goes without a grant, and the next CompleteOrder gets it and keeps it", async () => {
      const shop = await enrolledShop(site.address);
      const bought = await paid(shop, "ebook-smart-cards"); // EUR 2.50: 25 points
      const address = site.address;
      await site.close();
      try {
        const first = await shop.completeOrder({ transactionId: bought.offer.transactionId, debitResultM: bought.debitResultM });
        expect(defined(first.receipt, "a receipt").goods).to.match(/^licence key /);
        expect(first.receipt?.pointsGrant).to.equal(undefined);
      } finally {
        site = await startSite(address);
      }
      // The shop's channel to the site reconnects within a second: a CompleteOrder after that gets the grant.
      let again = await shop.completeOrder({ transactionId: bought.offer.transactionId, debitResultM: bought.debitResultM });
      await waitFor(
        async () =>
          (again = await shop.completeOrder({ transactionId: bought.offer.transactionId, debitResultM: bought.debitResultM })).receipt?.pointsGrant !==
          undefined,
        5_000,
        "a CompleteOrder that gets the grant",
      );
      const g = defined(again.receipt?.pointsGrant, "the grant asked again");
      expect(g.points?.amountMinor).to.equal(25n);
      // Stored with the receipt: the buyer sees it in the order.
      const { order } = await shop.getOrder({ transactionId: bought.offer.transactionId, accessSecret: again.accessSecret });
      expect(order?.receipt?.pointsGrant).to.deep.equal(g);
      expect(order?.receipt?.goods).to.equal(again.receipt?.goods);
    });
  });
});
