// Contract of netpurse.merchant.v1.MerchantValidationService: the real
// validation service on loopback with a key file made by the operator tool.
// The test plays the payment server's part: it holds the operator's copy of
// the merchant's key and seals debit results M with it.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { ConfirmationMode, SessionKeyGrant, type Money } from "../../gen/netpurse/card/v1/card.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { DebitResultM, DebitResultStatus } from "../../gen/netpurse/payment/v1/payment.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { open, seal, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { DebitResponse, cardProofDigest } from "../../lib/protocol/purse.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { registerMerchant } from "../../services/operator/operator.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import { failure, flipBit } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";
import { testSecurity, type TestSecurity } from "../support/network.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { defined } from "../support/offers.js";

describe("contract: netpurse.merchant.v1.MerchantValidationService", () => {
  let dir: string, cleanup: () => Promise<void>;
  let server: Awaited<ReturnType<typeof startMerchantValidation>>;
  let operator: MerchantRegistry;
  let security: TestSecurity;
  type ValidationClient = Client<typeof MerchantValidationServiceDefinition, DeadlineOptions>;
  const clients = new Map<string, ValidationClient>();
  /** A client holding merchant `id`'s certificate ("" for none). */
  async function as(id: string): Promise<ValidationClient> {
    let c = clients.get(id);
    if (!c) {
      const sec = id === "" ? security.cardholder : await security.of("merchant", id);
      c = clientFactory().create(MerchantValidationServiceDefinition, openChannel(server.address, sec.channel({ kind: "validation" })));
      clients.set(id, c);
    }
    return c;
  }
  /** Each merchant calls for itself, with its own certificate. */
  const issueKeys = async (req: Parameters<ValidationClient["issueTransactionKeys"]>[0]) =>
    (await as(req.merchantId?.value ?? "shop-a")).issueTransactionKeys(req);
  const validate = async (req: Parameters<ValidationClient["validateConfirmation"]>[0]) =>
    (await as(req.order?.merchantId?.value ?? "shop-a")).validateConfirmation(req);
  const price: Money = { amountMinor: 1234n, currency: 978, exponent: 2 };
  /** The offer's terms IssueTransactionKeys seals with the session key: the price, and an expiry 15 minutes ahead. */
  const terms = () => ({ amount: price, expiresAt: new Date(Date.now() + 15 * 60_000) });

  before(async () => {
    ({ dir, cleanup } = await tempDir());
    const common = { paymentDir: join(dir, "payment"), validationDir: join(dir, "validation") };
    await registerMerchant({ ...common, merchantId: "shop-a", name: "A", mode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES });
    await registerMerchant({ ...common, merchantId: "shop-m", name: "M", mode: ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES });
    operator = new MerchantRegistry(join(dir, "payment", "merchants.json"));
    // Proof reports go nowhere here (no payment server): they wait in the outbox.
    await CertificateAuthority.init(pkiDirOf(dir));
    security = await testSecurity(dir);
    server = await startMerchantValidation({
      security: await security.of("validation", "validation-1"),
      listen: "127.0.0.1:0",
      dir: join(dir, "validation"),
      paymentServer: "127.0.0.1:9",
      reportEveryMs: 3_600_000,
    });
  });
  after(async () => {
    await server?.close();
    await cleanup();
  });

  /** An order with its keys from the service, and a debit result M sealed as the payment server would. */
  async function order(merchant = "shop-a", m: Partial<DebitResultM> | ((transactionId: string) => Partial<DebitResultM>) = {}) {
    const txn = randomUUID();
    const keys = await issueKeys({ transactionId: { value: txn }, merchantId: { value: merchant }, ...terms() });
    const shared = (await operator.get(merchant))!.key;
    const derived = transactionKey(shared, merchant, txn, keys.keyNonce);
    const mode = (await operator.get(merchant))!.mode;
    const result: DebitResultM = {
      transactionId: { value: txn },
      merchantId: { value: merchant },
      amount: price,
      purseId: { value: Buffer.from("0102030405060708", "hex") },
      psamId: { value: Buffer.from("a1b2c3d4", "hex") },
      psamCounter: 17,
      confirmationMode: mode,
      status: DebitResultStatus.DEBIT_RESULT_STATUS_CONFIRMED,
      expectedCardSignature: Buffer.alloc(0),
      expectedCardSignatureDigest: Buffer.alloc(0),
      issuedAt: new Date(),
      ...(typeof m === "function" ? m(txn) : m),
    };
    return {
      keys,
      derived,
      terms: { transactionId: { value: txn }, merchantId: { value: merchant }, amount: price, keyNonce: keys.keyNonce },
      sealed: seal(derived, "DEBIT_RESULT_M", txn, DebitResultM.encode(result).finish()),
    };
  }

  it("issues each transaction's keys: a fresh nonce and TSK, and the TSK sealed with the offer's terms under the derived key", async () => {
    const a = await order();
    const b = await order();
    expect(a.keys.keyNonce).to.have.length(16);
    expect(Buffer.from(a.keys.keyNonce).equals(Buffer.from(b.keys.keyNonce))).to.equal(false);
    const plain = open(a.derived, "SESSION_KEY", a.terms.transactionId.value, a.keys.encryptedSessionKey);
    const grant = SessionKeyGrant.decode(defined(plain, "the opened ETSK"));
    expect(Buffer.from(grant.transactionSessionKey).equals(Buffer.from(a.keys.transactionSessionKey))).to.equal(true);
    expect(grant.merchantId).to.deep.equal({ value: "shop-a" });
    expect(grant.amount).to.deep.equal(price);
    expect(defined(grant.expiresAt, "the grant's expiry").getTime()).to.be.within(Date.now() + 14 * 60_000, Date.now() + 15 * 60_000);
    expect(await failure(issueKeys({ transactionId: { value: randomUUID() }, merchantId: { value: "nobody" }, ...terms() }))).to.include({
      code: "PERMISSION_DENIED",
      reason: "UNKNOWN_MERCHANT",
    });
  });

  it("issues keys only for an offer's amount a card can pay and an expiry in the next hour (INVALID_ARGUMENT naming the field)", async () => {
    const now = Date.now();
    const cases: [Record<string, unknown>, string][] = [
      [{ amount: undefined }, "amount"],
      [{ amount: { ...price, amountMinor: 0n } }, "amount.amount_minor"],
      [{ amount: { ...price, amountMinor: 1n << 32n } }, "amount.amount_minor"],
      [{ amount: { ...price, currency: 0 } }, "amount.currency"],
      [{ amount: { ...price, exponent: 5 } }, "amount.exponent"],
      [{ expiresAt: undefined }, "expires_at"],
      [{ expiresAt: new Date(now - 1_000) }, "expires_at"],
      [{ expiresAt: new Date(now + 2 * 60 * 60_000) }, "expires_at"],
    ];
    for (const [bad, field] of cases) {
      const f = await failure(issueKeys({ transactionId: { value: randomUUID() }, merchantId: { value: "shop-a" }, ...terms(), ...bad }));
      expect(f.code, field).to.equal("INVALID_ARGUMENT");
      expect(f.details, field).to.contain(field);
    }
    // One hour ahead is the longest granted.
    await issueKeys({
      transactionId: { value: randomUUID() },
      merchantId: { value: "shop-a" },
      amount: price,
      expiresAt: new Date(now + 60 * 60_000),
    });
  });

  it("accepts a genuine, confirmed debit result that matches the order", async () => {
    const o = await order();
    const r = await validate({ order: o.terms, debitResultM: o.sealed });
    expect(r.transactionId).to.deep.equal(o.terms.transactionId);
    expect(r.psamCounter).to.equal(17);
    expect(r.confirmationMode).to.equal(ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES);
  });

  it("refuses a result it cannot open: another order's nonce, another merchant's key, a flipped bit", async () => {
    const o = await order();
    const other = await order();
    expect(await failure(validate({ order: { ...o.terms, keyNonce: other.keys.keyNonce }, debitResultM: o.sealed }))).to.include({
      reason: "SEAL_BROKEN",
    });
    expect(await failure(validate({ order: o.terms, debitResultM: other.sealed }))).to.include({ reason: "SEAL_BROKEN" });
    expect(await failure(validate({ order: { ...o.terms, merchantId: { value: "shop-m" } }, debitResultM: o.sealed }))).to.include({
      reason: "SEAL_BROKEN",
    });
    for (const where of ["iv", "ciphertext", "tag"] as const) {
      expect(await failure(validate({ order: o.terms, debitResultM: flipBit(o.sealed, where) })), where).to.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
    }
  });

  it("refuses a genuine result of other terms or of another mode (CONFIRMATION_MISMATCH), naming what differs", async () => {
    const cases: [Partial<DebitResultM>, string][] = [
      [{ amount: { ...price, amountMinor: 1233n } }, "amount"],
      [{ amount: { ...price, currency: 840 } }, "amount"],
      [{ merchantId: { value: "shop-x" } }, "merchant_id"],
      [{ confirmationMode: ConfirmationMode.CONFIRMATION_MODE_SERVER_COMPARES }, "confirmation mode"],
    ];
    for (const [m, field] of cases) {
      const o = await order("shop-a", m);
      const f = await failure(validate({ order: o.terms, debitResultM: o.sealed }));
      expect(f, field).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
      expect(f.details).to.contain(field);
    }
    // A result issued before the card signed is not a confirmation in a mode where the PSAM or the server compares.
    const early = await order("shop-a", { status: DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED });
    expect(await failure(validate({ order: early.terms, debitResultM: early.sealed }))).to.include({ reason: "CONFIRMATION_MISMATCH" });
  });

  it("MERCHANT_COMPARES: compares the card's raw answer with the expected signature, and queues the proof for the payment server", async () => {
    const expected = Buffer.from("0011223344556677", "hex");
    const issued = (txn: string) => ({
      status: DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED,
      expectedCardSignatureDigest: cardProofDigest(txn, expected),
    });
    const answer = (sig: Buffer, result = 0) => DebitResponse.encode({ result, counter: 5, balance: 100, cardSignature: sig });
    const o = await order("shop-m", issued);
    expect(await failure(validate({ order: o.terms, debitResultM: o.sealed }))).to.include({ code: "INVALID_ARGUMENT" });
    expect(await failure(validate({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(Buffer.alloc(8)) }))).to.include({
      reason: "BAD_SIGNATURE",
    });
    expect(await failure(validate({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(expected, 1) }))).to.include({
      reason: "BAD_SIGNATURE",
    });
    expect((await server.reporter.rows()).length).to.equal(0);
    const ok = await validate({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(expected) });
    expect(ok.confirmationMode).to.equal(ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES);
    const rows = await server.reporter.rows();
    expect(rows.map((r) => r.transaction_id)).to.deep.equal([o.terms.transactionId.value]);
    expect(rows[0]!.state).to.equal("QUEUED"); // the payment server is not reachable here: it waits, it is not lost
  });

  it("answers INVALID_ARGUMENT for malformed requests, naming the field", async () => {
    const o = await order();
    const cases: [Record<string, unknown>, string][] = [
      [{ debitResultM: o.sealed }, "order"],
      [{ order: o.terms }, "debit_result_m"],
      [{ order: { ...o.terms, keyNonce: Buffer.alloc(3) }, debitResultM: o.sealed }, "order.key_nonce"],
      [{ order: { ...o.terms, transactionId: { value: "nope" } }, debitResultM: o.sealed }, "order.transaction_id"],
      [{ order: { ...o.terms, amount: undefined }, debitResultM: o.sealed }, "order.amount"],
      [{ order: { ...o.terms, amount: { ...price, currency: 70_000 } }, debitResultM: o.sealed }, "order.amount.currency"],
      [{ order: { ...o.terms, amount: { ...price, exponent: 300 } }, debitResultM: o.sealed }, "order.amount.exponent"],
      [{ order: o.terms, debitResultM: o.sealed, debitResponse: Buffer.alloc(5) }, "debit_response"],
    ];
    for (const [req, field] of cases) {
      const f = await failure(validate(req));
      expect(f.code, field).to.equal("INVALID_ARGUMENT");
      expect(f.details).to.contain(field);
    }
  });

  it("serves merchants only, each with its own key: another merchant's certificate or none gets nothing", async () => {
    const req = { transactionId: { value: randomUUID() }, merchantId: { value: "shop-m" }, ...terms() };
    expect(await failure((await as("shop-a")).issueTransactionKeys(req))).to.include({ code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" });
    expect(await failure((await as("")).issueTransactionKeys(req, { deadline: 3_000 })))
      .to.have.property("code")
      .that.is.oneOf(["UNAVAILABLE", "DEADLINE_EXCEEDED"]); // no certificate, no TLS connection
    const o = await order("shop-m");
    expect(await failure((await as("shop-a")).validateConfirmation({ order: o.terms, debitResultM: o.sealed }))).to.include({
      code: "PERMISSION_DENIED",
      reason: "NOT_ALLOWED",
    });
    expect(await issueKeys(req)).to.have.property("encryptedSessionKey"); // its own merchant: served
  });
});
