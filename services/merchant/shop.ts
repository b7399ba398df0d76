// The demo shop of digital goods: its catalogue file, orders in its own
// database, goods released exactly once against a validated confirmation.
// Orders are bounded: at most maxUnpaidOrders are OFFERED at once; one not
// paid by its offer's expiry plus a grace period becomes EXPIRED, and an
// EXPIRED order is deleted after a retention period (a periodic sweep). A
// PAID order is kept. GetOrder shows the goods only to the buyer, who proves
// it with the access secret given with the receipt; anyone else who has the
// transaction id sees the order's state alone. What a paid order releases is
// the shop's release hook's (a licence key by default; a benefits site's
// rewards), and a shop enrolled in a loyalty programme has the programme's
// site grant the card points for each money order it releases.

import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { createHash, randomBytes, randomUUID, timingSafeEqual } from "node:crypto";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ConfirmationMode, confirmationModeFromJSON, type Money, type PointsGrant } from "../../gen/netpurse/card/v1/card.js";
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
import type { MerchantValidationServiceDefinition, ValidateConfirmationResponse } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import type { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { invalidField, NetpurseError, notFound, passOn } from "../../lib/grpc/errors.js";
import { merchantId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { isMoneyCurrency, money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { repeat, type Periodic } from "../../lib/periodic.js";
import type { Db } from "../../lib/store/db.js";

/** The shop's catalogue file. */
export interface ShopFile {
  merchantId: string;
  name: string;
  /** A ConfirmationMode name; the payment operator must have registered the merchant with the same. */
  confirmationMode: string;
  /** The currency and exponent of every price, unless a product names its own. */
  currency: number;
  exponent: number;
  products: ShopProduct[];
  /** Enrolment in a loyalty programme: the programme's benefits site grants the card points for every money order released. */
  loyalty?: LoyaltyEnrolment;
}

/** One product of the catalogue. */
export interface ShopProduct {
  productId: string;
  name: string;
  description: string;
  priceMinor: number;
  /** The price's currency, when not the shop's: a benefits site prices rewards in points (a programme code) or in 999 (an authentication). */
  currency?: number;
  /** The price's exponent, when not the shop's. */
  exponent?: number;
}

/** shop.json `loyalty`: where the programme's benefits site is, and which programme its grants must be of. */
export interface LoyaltyEnrolment {
  /** The site's address, host:port (its BenefitsService, GrantPoints). */
  siteAddress: string;
  /** The programme code, 1000..65535. */
  programme: number;
  /** The site's merchant id: its server certificate must prove it (merchant/SITE). Without it, any merchant's certificate is taken. */
  siteId?: string;
}

/** An order whose confirmation the validation service accepted, as the release hook sees it. */
export interface OrderToRelease {
  transactionId: string;
  productId: string;
  amount: Money;
}

/**
 * What a paid order releases: the goods for the receipt. It may refuse with
 * a NetpurseError; then nothing is released and the order stays as it was.
 */
export type ReleaseGoods = (order: OrderToRelease, product: ShopProduct, validated: ValidateConfirmationResponse) => Promise<{ goods: string }>;

/** The demo shop's goods: a fresh licence key. */
export const licenceKey: ReleaseGoods = async () => ({ goods: `licence key ${randomBytes(10).toString("hex").toUpperCase().match(/.{5}/g)!.join("-")}` });

/** How long CompleteOrder waits for the benefits site's grant: a slow site costs the buyer little, and its grant is asked again at the next CompleteOrder. */
const GRANT_DEADLINE_MS = 5_000;

/** The price of a product: its own currency and exponent, or the shop's. */
export const priceOf = (s: Pick<ShopFile, "currency" | "exponent">, p: ShopProduct): Money =>
  money(p.priceMinor, p.currency ?? s.currency, p.exponent ?? s.exponent);

/** Append only: a benefits site's benefits.db applies these first, then its own (services/benefits/grants.ts). */
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
  // When the sweep found the order unpaid past its expiry plus the grace period; the retention period counts from it.
  `ALTER TABLE orders ADD COLUMN expired_at TEXT;`,
  `CREATE INDEX orders_by_state ON orders (state, expires_at);`,
  // The SHA-256 digest of the buyer's access secret, never the secret: a copy of merchant.db shows nobody the goods.
  `ALTER TABLE orders ADD COLUMN access_secret_digest BLOB;`,
];

/** The access secret's size: 256 random bits, beyond any guessing, so a plain SHA-256 digest keeps it (no slow hash needed). */
const ACCESS_SECRET_BYTES = 32;
const digestOf = (secret: Uint8Array) => createHash("sha256").update(secret).digest();

interface OrderRow {
  transaction_id: string;
  product_id: string;
  amount_minor: number;
  currency: number;
  exponent: number;
  state: "OFFERED" | "PAID" | "EXPIRED";
  created_at: string;
  expires_at: string;
  receipt: Buffer | null;
  key_nonce: Buffer | null;
  access_secret_digest: Buffer | null;
}

export interface ShopOptions {
  shop: ShopFile;
  db: Db;
  validation: Client<typeof MerchantValidationServiceDefinition, DeadlineOptions>;
  /** What a paid order releases (default: a licence key). */
  release?: ReleaseGoods;
  /** The loyalty programme's benefits site, when the shop is enrolled (shop.loyalty). */
  benefits?: Client<typeof BenefitsServiceDefinition, DeadlineOptions>;
  /** Advertised in offers: where clients send draw requests. */
  paymentServerAddress: string;
  /** Advertised in offers: where clients bring the confirmation. */
  merchantAddress: () => string;
  offerTtlMs: number;
  /** How long after its offer's expiry an unpaid order stays OFFERED before the sweep turns it EXPIRED. */
  expiryGraceMs: number;
  /** How long an EXPIRED order is kept (a late debit result M still releases its goods) before it is deleted. */
  retentionMs: number;
  /** The most OFFERED orders at once; CreateOrder beyond it is RESOURCE_EXHAUSTED. */
  maxUnpaidOrders: number;
  /** How often the sweep expires and deletes orders. */
  sweepEveryMs: number;
  log: Logger;
}

const STATE_OF_ROW: Record<OrderRow["state"], OrderState> = {
  OFFERED: OrderState.ORDER_STATE_OFFERED,
  PAID: OrderState.ORDER_STATE_PAID,
  EXPIRED: OrderState.ORDER_STATE_EXPIRED,
};

export class Shop {
  readonly mode: ConfirmationMode;
  private sweeping: Periodic | undefined;
  /** Orders being written, one at a time (createOrder). */
  private readonly inserting = new Mutex();

  constructor(private readonly o: ShopOptions) {
    this.mode = confirmationModeFromJSON(o.shop.confirmationMode);
  }

  private products(): Product[] {
    const s = this.o.shop;
    return s.products.map((p) => ({ productId: p.productId, name: p.name, description: p.description, price: priceOf(s, p) }));
  }

  readonly service: MerchantServiceImplementation = {
    listProducts: async (): Promise<ListProductsResponse> => ({
      merchantId: merchantId(this.o.shop.merchantId),
      merchantName: this.o.shop.name,
      products: this.products(),
    }),
    createOrder: async (req) => this.createOrder(req.productId ?? ""),
    completeOrder: async (req) => this.completeOrder(req),
    getOrder: async (req) => this.getOrder(requireTransactionId(req.transactionId), req.accessSecret),
  };

  /** Starts the periodic sweep that expires unpaid orders and deletes expired ones. */
  startSweeping(): void {
    this.sweeping ??= repeat({ what: "sweep of unpaid orders", everyMs: this.o.sweepEveryMs, log: this.o.log, task: () => this.sweep() });
  }

  stopSweeping(): void {
    this.sweeping?.stop();
    this.sweeping = undefined;
  }

  /**
   * Turns EXPIRED the orders still OFFERED past their offer's expiry plus the
   * grace period (the payment server signs no DEBIT command for them any
   * more; the grace covers a card that debits a little after), and deletes
   * the orders EXPIRED longer than the retention period. PAID orders are
   * never touched.
   */
  async sweep(now = new Date()): Promise<{ expired: number; deleted: number }> {
    const unpaidBefore = new Date(now.getTime() - this.o.expiryGraceMs).toISOString();
    const expired = await this.o.db.run("UPDATE orders SET state = 'EXPIRED', expired_at = ? WHERE state = 'OFFERED' AND expires_at < ?", [
      now.toISOString(),
      unpaidBefore,
    ]);
    const keptSince = new Date(now.getTime() - this.o.retentionMs).toISOString();
    const deleted = await this.o.db.run("DELETE FROM orders WHERE state = 'EXPIRED' AND expired_at < ?", [keptSince]);
    if (expired.changes > 0 || deleted.changes > 0) this.o.log.info("orders swept", { expired: expired.changes, deleted: deleted.changes });
    return { expired: expired.changes, deleted: deleted.changes };
  }

  private async unpaidOrders(): Promise<number> {
    return (await this.o.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM orders WHERE state = 'OFFERED'"))?.n ?? 0;
  }

  /** RESOURCE_EXHAUSTED (with RetryInfo, added by NetpurseError): as many unpaid orders as allowed are open. */
  private async tooManyOrders(): Promise<NetpurseError> {
    const oldest = await this.o.db.get<{ expires_at: string }>("SELECT expires_at FROM orders WHERE state = 'OFFERED' ORDER BY expires_at LIMIT 1");
    const frees = oldest ? `; the oldest expires at ${oldest.expires_at}, plus ${Math.round(this.o.expiryGraceMs / 1000)} s of grace` : "";
    this.o.log.warn("order refused: too many unpaid orders", { max: this.o.maxUnpaidOrders });
    return new NetpurseError(
      Status.RESOURCE_EXHAUSTED,
      ErrorReason.ERROR_REASON_TOO_MANY_ORDERS,
      `${this.o.shop.name} holds ${this.o.maxUnpaidOrders} unpaid orders, the most it allows${frees}; try again later`,
    );
  }

  private async createOrder(productId: string): Promise<CreateOrderResponse> {
    if (!productId) throw invalidField("product_id", "missing");
    const p = this.o.shop.products.find((x) => x.productId === productId);
    if (!p) throw notFound(`no product "${productId.slice(0, 64)}" in ${this.o.shop.name}; ListProducts shows what is on sale`);
    // Refused before the validation service is asked; the insert below checks again, atomically.
    if ((await this.unpaidOrders()) >= this.o.maxUnpaidOrders) throw await this.tooManyOrders();
    const id = randomUUID();
    const now = new Date();
    const expires = new Date(now.getTime() + this.o.offerTtlMs);
    const s = this.o.shop;
    const price = priceOf(s, p);
    // The transaction's keys come from the validation service, the only part of the shop that holds the shared key.
    // It seals the offer's amount and expiry with the session key: the payment server refuses a draw request of other terms.
    const keys = await this.o.validation
      .issueTransactionKeys(
        { transactionId: txnId(id), merchantId: merchantId(s.merchantId), amount: price, expiresAt: expires },
        { deadline: DEFAULT_DEADLINE_MS },
      )
      .catch((e) => passOn(e, "cannot make the transaction's keys"));
    // The count and the insert in one transaction: on PostgreSQL (SERIALIZABLE) concurrent CreateOrders, on this server or
    // another of the shop's, cannot each count below the cap and together pass it, as one statement at READ COMMITTED could.
    // One at a time in this process: every insert conflicts with every concurrent count, and a hundred at once would have
    // PostgreSQL abort all but one again and again; only other servers' still conflict, and are run again.
    const inserted = await this.inserting.run(() =>
      this.o.db.transaction(async (tx) => {
        const unpaid = (await tx.get<{ n: number }>("SELECT COUNT(*) AS n FROM orders WHERE state = 'OFFERED'"))?.n ?? 0;
        if (unpaid >= this.o.maxUnpaidOrders) return false;
        await tx.run(
          `INSERT INTO orders (transaction_id, product_id, amount_minor, currency, exponent, state, created_at, expires_at, key_nonce)
         VALUES (?, ?, ?, ?, ?, 'OFFERED', ?, ?, ?)`,
          [id, p.productId, p.priceMinor, price.currency, price.exponent, now.toISOString(), expires.toISOString(), Buffer.from(keys.keyNonce)],
        );
        return true;
      }),
    );
    if (!inserted) throw await this.tooManyOrders();
    this.o.log.info("order created", { transaction: id, product: p.productId, amount: p.priceMinor });
    return {
      offer: {
        transactionId: txnId(id),
        merchantId: merchantId(s.merchantId),
        merchantName: s.name,
        amount: price,
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
    if (order.state === "PAID")
      return { receipt: await this.withGrant(id, order, Receipt.decode(order.receipt!), validated), accessSecret: await this.newAccessSecret(id) };
    // An EXPIRED order still releases the goods: payment wins over expiry. The debit result M is genuine and
    // of this order's terms, so the card paid, and the payment server signs no DEBIT command after the offer's
    // expiry (it refuses such a draw request), so the money was drawn within the offer's time. Only an order
    // already deleted after the retention period is unknown (NOT_FOUND above).
    const product = this.o.shop.products.find((p) => p.productId === order.product_id)!;
    const amount = money(order.amount_minor, order.currency, order.exponent);
    // The hook may refuse (a benefits site's card that is no member's): then nothing changes.
    const { goods } = await (this.o.release ?? licenceKey)({ transactionId: id, productId: product.productId, amount }, product, validated);
    const receipt: Receipt = {
      transactionId: txnId(id),
      merchantId: merchantId(this.o.shop.merchantId),
      merchantName: this.o.shop.name,
      productId: product.productId,
      productName: product.name,
      amount,
      goods,
      releasedAt: new Date(),
      psamId: validated.psamId,
      psamCounter: validated.psamCounter,
      pointsGrant: await this.grantPoints(id, order, validated),
    };
    const accessSecret = randomBytes(ACCESS_SECRET_BYTES);
    const r = await this.o.db.run(
      "UPDATE orders SET state = 'PAID', receipt = ?, paid_at = ?, access_secret_digest = ? WHERE transaction_id = ? AND state IN ('OFFERED', 'EXPIRED')",
      [Buffer.from(Receipt.encode(receipt).finish()), new Date().toISOString(), digestOf(accessSecret), id],
    );
    if (r.changes === 0) {
      // Released by a concurrent call: answer with what it released.
      const again = await this.o.db.get<OrderRow>("SELECT * FROM orders WHERE transaction_id = ?", [id]);
      if (!again?.receipt) throw notFound(`order ${id} at ${this.o.shop.name} was deleted meanwhile`);
      return { receipt: Receipt.decode(again.receipt), accessSecret: await this.newAccessSecret(id) };
    }
    this.o.log.info(order.state === "EXPIRED" ? "goods released for an expired order: it was paid" : "goods released", {
      transaction: id,
      product: product.productId,
    });
    return { receipt, accessSecret };
  }

  /**
   * The points the programme's site grants the card for a money order, when
   * the shop is enrolled. A site that fails or refuses never withholds the
   * goods: the receipt goes without a grant, and the next CompleteOrder of
   * the order asks again (the site grants once per transaction).
   */
  private async grantPoints(id: string, order: OrderRow, validated: ValidateConfirmationResponse): Promise<PointsGrant | undefined> {
    const loyalty = this.o.shop.loyalty;
    if (!loyalty || !this.o.benefits || !isMoneyCurrency(order.currency)) return undefined;
    try {
      const { grant } = await this.o.benefits.grantPoints(
        { transactionId: txnId(id), purseId: validated.purseId, amount: money(order.amount_minor, order.currency, order.exponent) },
        { deadline: GRANT_DEADLINE_MS },
      );
      if (!grant || grant.programme !== loyalty.programme) {
        this.o.log.warn("the benefits site answered a grant of another programme: none given", { transaction: id, programme: grant?.programme });
        return undefined;
      }
      this.o.log.info("points granted", { transaction: id, grant: grant.grantId?.value, points: Number(grant.points?.amountMinor ?? 0) });
      return grant;
    } catch (e) {
      this.o.log.warn("points not granted: the goods go without them, and the next CompleteOrder asks again", {
        transaction: id,
        error: (e as Error).message,
      });
      return undefined;
    }
  }

  /** A paid order's stored receipt, with the grant asked again when it went without one (and stored then). */
  private async withGrant(id: string, order: OrderRow, receipt: Receipt, validated: ValidateConfirmationResponse): Promise<Receipt> {
    if (receipt.pointsGrant) return receipt;
    const pointsGrant = await this.grantPoints(id, order, validated);
    if (!pointsGrant) return receipt;
    const granted = { ...receipt, pointsGrant };
    await this.o.db.run("UPDATE orders SET receipt = ? WHERE transaction_id = ? AND state = 'PAID'", [Buffer.from(Receipt.encode(granted).finish()), id]);
    return granted;
  }

  /**
   * A fresh access secret for a paid order, replacing the one before: only
   * its digest is kept, so a repeated CompleteOrder (whose caller proved the
   * payment again) cannot be given the old one.
   */
  private async newAccessSecret(id: string): Promise<Buffer> {
    const secret = randomBytes(ACCESS_SECRET_BYTES);
    await this.o.db.run("UPDATE orders SET access_secret_digest = ? WHERE transaction_id = ? AND state = 'PAID'", [digestOf(secret), id]);
    return secret;
  }

  /** Whether `secret` is the buyer's access secret of this order, compared in constant time. */
  private isBuyer(o: OrderRow, secret: Uint8Array): boolean {
    return secret.length === ACCESS_SECRET_BYTES && o.access_secret_digest !== null && timingSafeEqual(digestOf(secret), o.access_secret_digest);
  }

  private async getOrder(id: string, accessSecret: Uint8Array): Promise<GetOrderResponse> {
    if (accessSecret.length !== 0 && accessSecret.length !== ACCESS_SECRET_BYTES)
      throw invalidField("access_secret", `must be the ${ACCESS_SECRET_BYTES} bytes CompleteOrder gave, or empty for the order's state only`);
    const o = await this.o.db.get<OrderRow>("SELECT * FROM orders WHERE transaction_id = ?", [id]);
    if (!o) throw notFound(`no order ${id} at ${this.o.shop.name}`);
    // Whoever has the transaction id (it travels in offers, draw requests and logs) learns where the order stands, nothing more.
    const stateOnly: GetOrderResponse = {
      order: { transactionId: txnId(id), productId: "", amount: undefined, state: STATE_OF_ROW[o.state], createdAt: undefined, receipt: undefined },
    };
    if (accessSecret.length === 0) return stateOnly;
    if (!this.isBuyer(o, accessSecret)) {
      this.o.log.warn("order read with a wrong access secret: its state only", { transaction: id });
      return stateOnly;
    }
    return {
      order: {
        transactionId: txnId(id),
        productId: o.product_id,
        amount: money(o.amount_minor, o.currency, o.exponent),
        state: STATE_OF_ROW[o.state],
        createdAt: new Date(o.created_at),
        receipt: o.receipt ? Receipt.decode(o.receipt) : undefined,
      },
    };
  }
}
