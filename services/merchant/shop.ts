// The demo shop of digital goods: its catalogue file, orders in its own
// database, goods released exactly once against a validated confirmation.

import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { randomBytes, randomUUID } from "node:crypto";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ConfirmationMode, confirmationModeFromJSON } from "../../gen/netpurse/card/v1/card.js";
import {
  OrderState,
  Receipt,
  type CompleteOrderRequest,
  type CompleteOrderResponse,
  type CreateOrderResponse,
  type GetOrderResponse,
  type ListProductsResponse,
  type MerchantServiceImplementation,
  type Product,
} from "../../gen/netpurse/merchant/v1/merchant.js";
import type { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { invalidField, notFound, passOn } from "../../lib/grpc/errors.js";
import { merchantId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import type { Db } from "../../lib/store/db.js";

/** The shop's catalogue file. */
export interface ShopFile {
  merchantId: string;
  name: string;
  /** A ConfirmationMode name; the payment operator must have registered the merchant with the same. */
  confirmationMode: string;
  currency: number;
  exponent: number;
  products: { productId: string; name: string; description: string; priceMinor: number }[];
}

export const MERCHANT_MIGRATIONS = [
  `CREATE TABLE orders (
     transaction_id TEXT PRIMARY KEY,
     product_id TEXT NOT NULL,
     amount_minor INTEGER NOT NULL,
     currency INTEGER NOT NULL,
     exponent INTEGER NOT NULL,
     state TEXT NOT NULL,
     created_at TEXT NOT NULL,
     expires_at TEXT NOT NULL,
     receipt BLOB,
     paid_at TEXT
   );`,
  `ALTER TABLE orders ADD COLUMN key_nonce BLOB;`,
];

interface OrderRow {
  transaction_id: string;
  product_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  state: "OFFERED" | "PAID";
  created_at: string;
  expires_at: string;
  receipt: Buffer | null;
  key_nonce: Buffer | null;
}

export interface ShopOptions {
  shop: ShopFile;
  db: Db;
  validation: Client<typeof MerchantValidationServiceDefinition, DeadlineOptions>;
  /** Advertised in offers: where clients send draw requests. */
  paymentServerAddress: string;
  /** Advertised in offers: where clients bring the confirmation. */
  merchantAddress: () => string;
  offerTtlMs: number;
  log: Logger;
}

export class Shop {
  readonly mode: ConfirmationMode;

  constructor(private readonly o: ShopOptions) {
    this.mode = confirmationModeFromJSON(o.shop.confirmationMode);
  }

  private products(): Product[] {
    const s = this.o.shop;
    return s.products.map((p) => ({ productId: p.productId, name: p.name, description: p.description, price: money(p.priceMinor, s.currency, s.exponent) }));
  }

  readonly service: MerchantServiceImplementation = {
    listProducts: async (): Promise<ListProductsResponse> => ({
      merchantId: merchantId(this.o.shop.merchantId),
      merchantName: this.o.shop.name,
      products: this.products(),
    }),
    createOrder: async (req) => this.createOrder(req.productId ?? ""),
    completeOrder: async (req) => this.completeOrder(req),
    getOrder: async (req) => this.getOrder(requireTransactionId(req.transactionId)),
  };

  private async createOrder(productId: string): Promise<CreateOrderResponse> {
    if (!productId) throw invalidField("product_id", "missing");
    const p = this.o.shop.products.find((x) => x.productId === productId);
    if (!p) throw notFound(`no product "${productId.slice(0, 64)}" in ${this.o.shop.name}; ListProducts shows what is on sale`);
    const id = randomUUID();
    const now = new Date();
    const expires = new Date(now.getTime() + this.o.offerTtlMs);
    const s = this.o.shop;
    // The transaction's keys come from the validation service, the only part of the shop that holds the shared key.
    const keys = await this.o.validation
      .issueTransactionKeys({ transactionId: txnId(id), merchantId: merchantId(s.merchantId) }, { deadline: DEFAULT_DEADLINE_MS })
      .catch((e) => passOn(e, "cannot make the transaction's keys"));
    await this.o.db.run(
      "INSERT INTO orders (transaction_id, product_id, amount_minor, currency, exponent, state, created_at, expires_at, key_nonce) VALUES (?, ?, ?, ?, ?, 'OFFERED', ?, ?, ?)",
      [id, p.productId, p.priceMinor, s.currency, s.exponent, now.toISOString(), expires.toISOString(), Buffer.from(keys.keyNonce)],
    );
    this.o.log.info("order created", { transaction: id, product: p.productId, amount: p.priceMinor });
    return {
      offer: {
        transactionId: txnId(id),
        merchantId: merchantId(s.merchantId),
        merchantName: s.name,
        amount: money(p.priceMinor, s.currency, s.exponent),
        description: p.name,
        paymentServerAddress: this.o.paymentServerAddress,
        merchantAddress: this.o.merchantAddress(),
        confirmationMode: this.mode,
        expiresAt: expires,
        keyNonce: keys.keyNonce,
        transactionSessionKey: keys.transactionSessionKey,
        encryptedSessionKey: keys.encryptedSessionKey,
      },
    };
  }

  private async completeOrder(req: CompleteOrderRequest): Promise<CompleteOrderResponse> {
    const id = requireTransactionId(req.transactionId);
    if (!req.debitResultM) throw invalidField("debit_result_m", "missing");
    const order = await this.o.db.get<OrderRow>("SELECT * FROM orders WHERE transaction_id = ?", [id]);
    if (!order) throw notFound(`no order ${id} at ${this.o.shop.name}`);
    // Every result is validated, a repeat too: a forged one never sees a receipt.
    const validated = await this.o.validation
      .validateConfirmation(
        {
          order: {
            transactionId: txnId(id),
            merchantId: merchantId(this.o.shop.merchantId),
            amount: money(order.amount_minor, order.currency, order.exponent),
            keyNonce: order.key_nonce ?? Buffer.alloc(0),
          },
          debitResultM: req.debitResultM,
          debitResponse: req.debitResponse,
        },
        { deadline: DEFAULT_DEADLINE_MS },
      )
      .catch((e) => passOn(e, "payment not accepted"));
    if (order.state === "PAID") return { receipt: Receipt.decode(order.receipt!) };
    const product = this.o.shop.products.find((p) => p.productId === order.product_id)!;
    const receipt: Receipt = {
      transactionId: txnId(id),
      merchantId: merchantId(this.o.shop.merchantId),
      merchantName: this.o.shop.name,
      productId: product.productId,
      productName: product.name,
      amount: money(order.amount_minor, order.currency, order.exponent),
      goods: `licence key ${randomBytes(10).toString("hex").toUpperCase().match(/.{5}/g)!.join("-")}`,
      releasedAt: new Date(),
      psamId: validated.psamId,
      psamCounter: validated.psamCounter,
    };
    const r = await this.o.db.run("UPDATE orders SET state = 'PAID', receipt = ?, paid_at = ? WHERE transaction_id = ? AND state = 'OFFERED'", [
      Buffer.from(Receipt.encode(receipt).finish()),
      new Date().toISOString(),
      id,
    ]);
    if (r.changes === 0) {
      // Released by a concurrent call: answer with what it released.
      const again = (await this.o.db.get<OrderRow>("SELECT * FROM orders WHERE transaction_id = ?", [id]))!;
      return { receipt: Receipt.decode(again.receipt!) };
    }
    this.o.log.info("goods released", { transaction: id, product: product.productId });
    return { receipt };
  }

  private async getOrder(id: string): Promise<GetOrderResponse> {
    const o = await this.o.db.get<OrderRow>("SELECT * FROM orders WHERE transaction_id = ?", [id]);
    if (!o) throw notFound(`no order ${id} at ${this.o.shop.name}`);
    return {
      order: {
        transactionId: txnId(id),
        productId: o.product_id,
        amount: money(o.amount_minor, o.currency, o.exponent),
        state: o.state === "PAID" ? OrderState.ORDER_STATE_PAID : OrderState.ORDER_STATE_OFFERED,
        createdAt: new Date(o.created_at),
        receipt: o.receipt ? Receipt.decode(o.receipt) : undefined,
      },
    };
  }
}
