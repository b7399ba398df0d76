import { createHash } from "node:crypto";
import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { readJson } from "../../lib/files.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { isName } from "../../lib/ids.js";
import { intOpt, type Values } from "../../lib/service-main.js";
import { createLogger, type Logger } from "../../lib/log.js";
import { isProgrammeCode } from "../../lib/money.js";
import type { Security } from "../../lib/pki/security.js";
import type { Db } from "../../lib/store/db.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { MAX_OFFER_TTL_MS } from "../merchant-validation/validation.js";
import { MERCHANT_MIGRATIONS, Shop, type ReleaseGoods, type ShopFile } from "./shop.js";

export interface MerchantConfig {
  /** As this merchant: its certificate for the validation service, and its server's. */
  security: Security;
  listen?: string;
  /** The merchant's folder: shop.json (catalogue) and merchant.db. */
  dir: string;
  /**
   * Where its orders are kept: default the SQLite file in its folder; on
   * PostgreSQL in a schema of its own (storeSchema), so that several shops,
   * and several servers of one shop, share a database.
   */
  store?: StoreConfig;
  validation?: string;
  /** The payment server address put into offers. */
  paymentServer?: string;
  /** The address put into offers for confirmations (default: the bound address). */
  advertise?: string;
  /** How long an offer stays payable; at most MAX_OFFER_TTL_MS (1 hour), the longest the validation service grants. */
  offerTtlMs?: number;
  /** How long after its offer's expiry an unpaid order becomes EXPIRED. */
  expiryGraceMs?: number;
  /** How long an EXPIRED order is kept before it is deleted. */
  retentionMs?: number;
  /** The most unpaid (OFFERED) orders at once. */
  maxUnpaidOrders?: number;
  /** How often unpaid orders are expired and expired ones deleted. */
  sweepEveryMs?: number;
}

/**
 * The PostgreSQL schema of a shop's (or a benefits site's) tables: `prefix`
 * and its merchant id (merchant_skyways), so that shops sharing one database
 * stay apart; an id that is not already lower-case [a-z0-9_] is lower-cased,
 * its other characters made `_`, cut to 40, and given 8 hex digits of its
 * SHA-256 (merchant_demo_shop_1c0e…), so no two ids share one.
 */
export function storeSchema(prefix: "merchant" | "benefits", merchantId: string): string {
  const plain = merchantId
    .toLowerCase()
    .replace(/[^a-z0-9_]/g, "_")
    .slice(0, 40);
  // Ids that differ only in case or punctuation (shop-1, Shop.1) would share a schema, and a long one would pass
  // PostgreSQL's 63 characters: those get 8 hex digits of the id's SHA-256 too.
  if (plain === merchantId) return `${prefix}_${plain}`;
  return `${prefix}_${plain}_${createHash("sha256").update(merchantId).digest("hex").slice(0, 8)}`;
}

/** The merchant server's defaults, in one place for the code and its --help. */
export const MERCHANT_DEFAULTS = {
  offerTtlMs: 15 * 60_000,
  expiryGraceMs: 10 * 60_000,
  retentionMs: 7 * 24 * 60 * 60_000,
  maxUnpaidOrders: 10_000,
  sweepEveryMs: 60_000,
} as const;

/** The command-line options of a shop's orders, shared by netpurse-merchant and netpurse-benefits. */
export const ORDER_OPTIONS = {
  "offer-ttl-ms": { type: "string" },
  "expiry-grace-ms": { type: "string" },
  "retention-ms": { type: "string" },
  "max-unpaid-orders": { type: "string" },
  "sweep-every-ms": { type: "string" },
} as const;

export const ORDER_HELP = [
  `  --offer-ttl-ms N           how long an offer stays payable, at most 3600000: the validation service grants a session key
                             for at most 1 hour, and the payment server refuses a new draw request after it (default ${MERCHANT_DEFAULTS.offerTtlMs})`,
  `  --expiry-grace-ms N        how long after its offer's expiry an unpaid order stays OFFERED before it becomes EXPIRED
                             (default ${MERCHANT_DEFAULTS.expiryGraceMs}); a valid debit result M still pays an EXPIRED order`,
  `  --retention-ms N           how long an EXPIRED order is kept before it is deleted (default ${MERCHANT_DEFAULTS.retentionMs}, 7 days)`,
  `  --max-unpaid-orders N      the most unpaid (OFFERED) orders at once; CreateOrder beyond it is RESOURCE_EXHAUSTED
                             (default ${MERCHANT_DEFAULTS.maxUnpaidOrders})`,
  `  --sweep-every-ms N         how often unpaid orders are expired and expired ones deleted (default ${MERCHANT_DEFAULTS.sweepEveryMs})`,
].join("\n");

/** The order settings the options give, defaults for those not given. */
export function orderSettings(v: Values) {
  return {
    offerTtlMs: intOpt(v, "offer-ttl-ms", MERCHANT_DEFAULTS.offerTtlMs),
    expiryGraceMs: intOpt(v, "expiry-grace-ms", MERCHANT_DEFAULTS.expiryGraceMs),
    retentionMs: intOpt(v, "retention-ms", MERCHANT_DEFAULTS.retentionMs),
    maxUnpaidOrders: intOpt(v, "max-unpaid-orders", MERCHANT_DEFAULTS.maxUnpaidOrders),
    sweepEveryMs: intOpt(v, "sweep-every-ms", MERCHANT_DEFAULTS.sweepEveryMs),
  };
}

/**
 * The Shop of a merchant server, with its channels: to the validation
 * service, and to the loyalty programme's benefits site when the shop is
 * enrolled (both as this merchant, with its client certificate). Shared by
 * the merchant server and a benefits site, which sells its rewards so.
 */
export function openShop(
  c: MerchantConfig,
  p: { shopFile: ShopFile; db: Db; log: Logger; release?: ReleaseGoods; boundAddress: () => string },
): { shop: Shop; close(): void } {
  const offerTtlMs = c.offerTtlMs ?? MERCHANT_DEFAULTS.offerTtlMs;
  if (offerTtlMs < 1 || offerTtlMs > MAX_OFFER_TTL_MS) {
    throw new Error(`the offer time to live must be 1..${MAX_OFFER_TTL_MS} ms: the validation service grants a session key for at most 1 hour`);
  }
  for (const [name, value] of [
    ["the sweep period", c.sweepEveryMs],
    ["the most unpaid orders", c.maxUnpaidOrders],
  ] as const) {
    if (value !== undefined && value < 1) throw new Error(`${name} must be at least 1, got ${value}`);
  }
  const loyalty = p.shopFile.loyalty;
  if (loyalty) {
    if (!isProgrammeCode(loyalty.programme)) throw new Error(`shop.json loyalty.programme must be a programme code 1000..65535, got ${loyalty.programme}`);
    if (!/^[^\s/]+:\d{1,5}$/.test(loyalty.siteAddress ?? "")) throw new Error(`shop.json loyalty.siteAddress must be host:port, got "${loyalty.siteAddress}"`);
    if (loyalty.siteId !== undefined && !isName(loyalty.siteId, 16)) throw new Error("shop.json loyalty.siteId must be 1..16 characters of [A-Za-z0-9._-]");
  }
  const factory = clientFactory();
  const channel = openChannel(c.validation ?? defaultAddress("merchantValidation"), c.security.channel({ kind: "validation" }));
  // The site is a merchant at the payment operator: its certificate proves merchant/SITE.
  const siteChannel = loyalty
    ? openChannel(loyalty.siteAddress, c.security.channel({ kind: "merchant", ...(loyalty.siteId ? { id: loyalty.siteId } : {}) }))
    : undefined;
  const shop = new Shop({
    shop: p.shopFile,
    db: p.db,
    validation: factory.create(MerchantValidationServiceDefinition, channel),
    ...(siteChannel ? { benefits: factory.create(BenefitsServiceDefinition, siteChannel) } : {}),
    ...(p.release ? { release: p.release } : {}),
    paymentServerAddress: c.paymentServer ?? defaultAddress("payment"),
    merchantAddress: () => c.advertise ?? p.boundAddress(),
    offerTtlMs,
    expiryGraceMs: c.expiryGraceMs ?? MERCHANT_DEFAULTS.expiryGraceMs,
    retentionMs: c.retentionMs ?? MERCHANT_DEFAULTS.retentionMs,
    maxUnpaidOrders: c.maxUnpaidOrders ?? MERCHANT_DEFAULTS.maxUnpaidOrders,
    sweepEveryMs: c.sweepEveryMs ?? MERCHANT_DEFAULTS.sweepEveryMs,
    log: p.log,
  });
  return {
    shop,
    close() {
      shop.stopSweeping();
      channel.close();
      siteChannel?.close();
    },
  };
}

export async function startMerchant(c: MerchantConfig) {
  const shopFile = await readJson<ShopFile>(join(c.dir, "shop.json"));
  const log = createLogger(`merchant ${shopFile.merchantId}`);
  const { location, ...connections } = c.store ?? { location: join(c.dir, "merchant.db") };
  const db = await openStore(location, MERCHANT_MIGRATIONS, { ...connections, schema: storeSchema("merchant", shopFile.merchantId), log });
  let bound = "";
  let opened;
  try {
    opened = openShop(c, { shopFile, db, log, boundAddress: () => bound });
  } catch (e) {
    await db.close();
    throw e;
  }
  const { shop } = opened;
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("merchant"),
    services: [service(MerchantServiceDefinition, shop.service, { all: "public" })],
    transport: c.security.server("request"),
    log,
  });
  bound = grpc.address;
  shop.startSweeping();
  return {
    address: grpc.address,
    shop,
    /** The shop's store (its orders), for tests and operators. */
    db,
    async close() {
      shop.stopSweeping();
      await grpc.shutdown();
      opened.close();
      await db.close();
    },
  };
}
