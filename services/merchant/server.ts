import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { readJson } from "../../lib/files.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { openSqlite } from "../../lib/store/db.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { MERCHANT_MIGRATIONS, Shop, type ShopFile } from "./shop.js";

export interface MerchantConfig {
  listen?: string;
  /** The merchant's folder: shop.json (catalogue) and merchant.db. */
  dir: string;
  validation?: string;
  /** The payment server address put into offers. */
  paymentServer?: string;
  /** The address put into offers for confirmations (default: the bound address). */
  advertise?: string;
  offerTtlMs?: number;
}

export async function startMerchant(c: MerchantConfig) {
  const shopFile = await readJson<ShopFile>(join(c.dir, "shop.json"));
  const log = createLogger(`merchant ${shopFile.merchantId}`);
  const db = openSqlite(join(c.dir, "merchant.db"), MERCHANT_MIGRATIONS);
  const channel = openChannel(c.validation ?? defaultAddress("merchantValidation"));
  let bound = "";
  const shop = new Shop({
    shop: shopFile,
    db,
    validation: clientFactory().create(MerchantValidationServiceDefinition, channel),
    paymentServerAddress: c.paymentServer ?? defaultAddress("payment"),
    merchantAddress: () => c.advertise ?? bound,
    offerTtlMs: c.offerTtlMs ?? 15 * 60_000,
    log,
  });
  const grpc = await startGrpcServer({ address: c.listen ?? defaultAddress("merchant"), services: [service(MerchantServiceDefinition, shop.service)], log });
  bound = grpc.address;
  return {
    address: grpc.address,
    async close() {
      await grpc.shutdown();
      channel.close();
      await db.close();
    },
  };
}
