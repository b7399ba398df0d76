// Contract of netpurse.merchant.v1.MerchantValidationService: the real
// validation service on loopback with a key file made by the operator tool.
// The test plays the payment server's part: it holds the operator's copy of
// the merchant's key and seals debit results M with it.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { ConfirmationMode, type Money } from "../../gen/netpurse/card/v1/card.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { DebitResultM, DebitResultStatus } from "../../gen/netpurse/payment/v1/payment.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { open, seal, transactionKey } from "../../lib/protocol/encryption-layer.js";
import { DebitResponse } from "../../lib/protocol/purse.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { registerMerchant } from "../../services/operator/operator.js";
import { MerchantRegistry } from "../../services/payment/merchants.js";
import { failure, flipBit } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";

describe("contract: netpurse.merchant.v1.MerchantValidationService", () => {
  let dir: string, cleanup: () => Promise<void>;
  let server: Awaited<ReturnType<typeof startMerchantValidation>>;
  let client: ReturnType<typeof makeClient>;
  let operator: MerchantRegistry;
  const makeClient = (address: string) => clientFactory().create(MerchantValidationServiceDefinition, openChannel(address));
  const price: Money = { amountMinor: 1234n, currency: 978, exponent: 2 };

  before(async () => {
    ({ dir, cleanup } = await tempDir());
    const common = { paymentDir: join(dir, "payment"), validationDir: join(dir, "validation") };
    await registerMerchant({ ...common, merchantId: "shop-a", name: "A", mode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES });
    await registerMerchant({ ...common, merchantId: "shop-m", name: "M", mode: ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES });
    operator = new MerchantRegistry(join(dir, "payment", "merchants.json"));
    // Proof reports go nowhere here (no payment server): they wait in the outbox.
    server = await startMerchantValidation({ listen: "127.0.0.1:0", dir: join(dir, "validation"), paymentServer: "127.0.0.1:9", reportEveryMs: 3_600_000 });
    client = makeClient(server.address);
  });
  after(async () => {
    await server?.close();
    await cleanup();
  });

  /** An order with its keys from the service, and a debit result M sealed as the payment server would. */
  async function order(merchant = "shop-a", m: Partial<DebitResultM> = {}) {
    const txn = randomUUID();
    const keys = await client.issueTransactionKeys({ transactionId: { value: txn }, merchantId: { value: merchant } });
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
      issuedAt: new Date(),
      ...m,
    };
    return {
      keys,
      derived,
      terms: { transactionId: { value: txn }, merchantId: { value: merchant }, amount: price, keyNonce: keys.keyNonce },
      sealed: seal(derived, "DEBIT_RESULT_M", txn, DebitResultM.encode(result).finish()),
    };
  }

  it("issues each transaction's keys: a fresh nonce and TSK, and the TSK sealed under the derived key", async () => {
    const a = await order();
    const b = await order();
    expect(a.keys.keyNonce).to.have.length(16);
    expect(Buffer.from(a.keys.keyNonce).equals(Buffer.from(b.keys.keyNonce))).to.equal(false);
    const tsk = open(a.derived, "SESSION_KEY", a.terms.transactionId.value, a.keys.encryptedSessionKey);
    expect(tsk!.equals(Buffer.from(a.keys.transactionSessionKey))).to.equal(true);
    expect(await failure(client.issueTransactionKeys({ transactionId: { value: randomUUID() }, merchantId: { value: "nobody" } }))).to.include({
      code: "PERMISSION_DENIED",
      reason: "UNKNOWN_MERCHANT",
    });
  });

  it("accepts a genuine, confirmed debit result that matches the order", async () => {
    const o = await order();
    const r = await client.validateConfirmation({ order: o.terms, debitResultM: o.sealed });
    expect(r.transactionId).to.deep.equal(o.terms.transactionId);
    expect(r.psamCounter).to.equal(17);
    expect(r.confirmationMode).to.equal(ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES);
  });

  it("refuses a result it cannot open: another order's nonce, another merchant's key, a flipped bit", async () => {
    const o = await order();
    const other = await order();
    expect(await failure(client.validateConfirmation({ order: { ...o.terms, keyNonce: other.keys.keyNonce }, debitResultM: o.sealed }))).to.include({
      reason: "SEAL_BROKEN",
    });
    expect(await failure(client.validateConfirmation({ order: o.terms, debitResultM: other.sealed }))).to.include({ reason: "SEAL_BROKEN" });
    expect(await failure(client.validateConfirmation({ order: { ...o.terms, merchantId: { value: "shop-m" } }, debitResultM: o.sealed }))).to.include({
      reason: "SEAL_BROKEN",
    });
    for (const where of ["iv", "ciphertext", "tag"] as const) {
      expect(await failure(client.validateConfirmation({ order: o.terms, debitResultM: flipBit(o.sealed, where) })), where).to.include({
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
      const f = await failure(client.validateConfirmation({ order: o.terms, debitResultM: o.sealed }));
      expect(f, field).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
      expect(f.details).to.contain(field);
    }
    // A result issued before the card signed is not a confirmation in a mode where the PSAM or the server compares.
    const early = await order("shop-a", { status: DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED });
    expect(await failure(client.validateConfirmation({ order: early.terms, debitResultM: early.sealed }))).to.include({ reason: "CONFIRMATION_MISMATCH" });
  });

  it("MERCHANT_COMPARES: compares the card's raw answer with the expected signature, and queues the proof for the payment server", async () => {
    const expected = Buffer.from("0011223344556677", "hex");
    const issued = { status: DebitResultStatus.DEBIT_RESULT_STATUS_DEBIT_COMMAND_ISSUED, expectedCardSignature: expected };
    const answer = (sig: Buffer, result = 0) => DebitResponse.encode({ result, counter: 5, balance: 100, cardSignature: sig });
    const o = await order("shop-m", issued);
    expect(await failure(client.validateConfirmation({ order: o.terms, debitResultM: o.sealed }))).to.include({ code: "INVALID_ARGUMENT" });
    expect(await failure(client.validateConfirmation({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(Buffer.alloc(8)) }))).to.include({
      reason: "BAD_SIGNATURE",
    });
    expect(await failure(client.validateConfirmation({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(expected, 1) }))).to.include({
      reason: "BAD_SIGNATURE",
    });
    expect((await server.reporter.rows()).length).to.equal(0);
    const ok = await client.validateConfirmation({ order: o.terms, debitResultM: o.sealed, debitResponse: answer(expected) });
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
      const f = await failure(client.validateConfirmation(req));
      expect(f.code, field).to.equal("INVALID_ARGUMENT");
      expect(f.details).to.contain(field);
    }
  });
});
