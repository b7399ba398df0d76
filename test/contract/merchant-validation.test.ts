// Contract of netpurse.merchant.v1.MerchantValidationService: the real
// validation service on loopback with a key file made by the operator tool.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import type { PurchaseConfirmation } from "../../gen/netpurse/payment/v1/payment.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { readJson } from "../../lib/files.js";
import { confirmationMac } from "../../lib/protocol/confirmation.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { registerMerchant } from "../../services/operator/operator.js";
import { failure } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";

describe("contract: netpurse.merchant.v1.MerchantValidationService", () => {
  let dir: string, cleanup: () => Promise<void>;
  let server: Awaited<ReturnType<typeof startMerchantValidation>>;
  let key: Buffer;
  let client: ReturnType<typeof makeClient>;
  const makeClient = (address: string) => clientFactory().create(MerchantValidationServiceDefinition, openChannel(address));

  before(async () => {
    ({ dir, cleanup } = await tempDir());
    const common = { paymentDir: join(dir, "payment"), validationDir: join(dir, "validation"), mode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES };
    await registerMerchant({ ...common, merchantId: "shop-a", name: "A" });
    await registerMerchant({ ...common, merchantId: "shop-b", name: "B" });
    const keys = await readJson<{ merchants: { merchantId: string; sharedKey: string }[] }>(join(dir, "validation", "keys.json"));
    key = Buffer.from(keys.merchants.find((m) => m.merchantId === "shop-a")!.sharedKey, "hex");
    server = await startMerchantValidation({ listen: "127.0.0.1:0", dir: join(dir, "validation") });
    client = makeClient(server.address);
  });
  after(async () => {
    await server?.close();
    await cleanup();
  });

  function confirmation(k: Buffer = key, merchant = "shop-a") {
    const txn = randomUUID();
    const at = new Date();
    const c: PurchaseConfirmation = {
      transactionId: { value: txn },
      merchantId: { value: merchant },
      amount: { amountMinor: 1234n, currency: 978, exponent: 2 },
      purseId: { value: Buffer.from("0102030405060708", "hex") },
      psamId: { value: Buffer.from("a1b2c3d4", "hex") },
      psamCounter: 17,
      confirmedAt: at,
      mac: confirmationMac(k, {
        transactionId: txn,
        merchantId: merchant,
        amount: 1234,
        currency: 978,
        exponent: 2,
        purseId: Buffer.from("0102030405060708", "hex"),
        psamId: Buffer.from("a1b2c3d4", "hex"),
        psamCounter: 17,
        confirmedAtMs: at.getTime(),
      }),
    };
    return { c, order: { transactionId: c.transactionId, merchantId: c.merchantId, amount: c.amount } };
  }

  it("accepts a genuine confirmation that matches the order", async () => {
    const { c, order } = confirmation();
    const r = await client.validateConfirmation({ confirmation: c, order });
    expect(r.transactionId).to.deep.equal(c.transactionId);
    expect(r.psamCounter).to.equal(17);
    expect(Buffer.from(r.purseId!.value).toString("hex")).to.equal("0102030405060708");
  });

  it("refuses a confirmation made with another merchant's key, or for a merchant it holds no key for", async () => {
    const other = confirmation(Buffer.alloc(32, 9));
    expect(await failure(client.validateConfirmation({ confirmation: other.c, order: other.order }))).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    const unknown = confirmation(key, "shop-z");
    const f = await failure(client.validateConfirmation({ confirmation: unknown.c, order: unknown.order }));
    expect(f).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    expect(f.details).to.contain("shop-z");
  });

  it("refuses every single-bit change of the MAC", async () => {
    const { c, order } = confirmation();
    for (let bit = 0; bit < c.mac.length * 8; bit += 37) {
      const mac = Buffer.from(c.mac);
      mac[bit >> 3]! ^= 1 << (bit & 7);
      expect((await failure(client.validateConfirmation({ confirmation: { ...c, mac }, order }))).reason).to.equal("BAD_SIGNATURE");
    }
  });

  it("refuses a genuine confirmation of other terms (CONFIRMATION_MISMATCH), naming the field", async () => {
    const { c, order } = confirmation();
    const cases: [typeof order, string][] = [
      [{ ...order, transactionId: { value: randomUUID() } }, "transaction_id"],
      [{ ...order, merchantId: { value: "shop-b" } }, "merchant_id"],
      [{ ...order, amount: { ...order.amount!, amountMinor: 1235n } }, "amount"],
      [{ ...order, amount: { ...order.amount!, currency: 840 } }, "amount"],
      [{ ...order, amount: { ...order.amount!, exponent: 3 } }, "amount"],
    ];
    for (const [o, field] of cases) {
      const f = await failure(client.validateConfirmation({ confirmation: c, order: o }));
      expect(f).to.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
      expect(f.details).to.contain(field);
    }
  });

  it("answers INVALID_ARGUMENT for malformed requests, naming the field", async () => {
    const { c, order } = confirmation();
    const cases: [Record<string, unknown>, string][] = [
      [{ order }, "confirmation"],
      [{ confirmation: c }, "order"],
      [{ confirmation: { ...c, mac: Buffer.alloc(5) }, order }, "confirmation.mac"],
      [{ confirmation: { ...c, psamId: { value: Buffer.alloc(3) } }, order }, "confirmation.psam_id"],
      [{ confirmation: { ...c, purseId: undefined }, order }, "confirmation.purse_id"],
      [{ confirmation: { ...c, transactionId: { value: "nope" } }, order }, "confirmation.transaction_id"],
      [{ confirmation: { ...c, confirmedAt: undefined }, order }, "confirmation.confirmed_at"],
      [{ confirmation: c, order: { ...order, amount: undefined } }, "order.amount"],
      [{ confirmation: { ...c, amount: { ...c.amount!, currency: 70_000 } }, order }, "confirmation.amount.currency"],
      [{ confirmation: { ...c, amount: { ...c.amount!, exponent: 300 } }, order }, "confirmation.amount.exponent"],
      [{ confirmation: { ...c, confirmedAt: new Date(-5_000) }, order }, "confirmation.confirmed_at"],
      [{ confirmation: c, order: { ...order, amount: { ...order.amount!, currency: 0 } } }, "order.amount.currency"],
    ];
    for (const [req, field] of cases) {
      const f = await failure(client.validateConfirmation(req));
      expect(f.code, field).to.equal("INVALID_ARGUMENT");
      expect(f.details).to.contain(field);
    }
  });
});
