// The benefits site of one loyalty programme (netpurse-benefits): a merchant
// at the payment operator whose catalogue is its rewards (MerchantService,
// through the Shop the merchant server runs) and the programme's points
// (BenefitsService), on one port, with health and reflection.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { openStore } from "../../lib/store/postgres.js";
import { SoftwareHsm } from "../load/hsm.js";
import { openShop, storeSchema, type MerchantConfig } from "../merchant/server.js";
import { Benefits, BENEFITS_MIGRATIONS } from "./grants.js";
import { BENEFITS_DB, PROGRAMME_HSM_FILE, readSite, releaseReward, shopOfSite } from "./site.js";

/**
 * As the merchant server's, with `dir` the site's folder: site.json,
 * programme-hsm.json, benefits.db (or `store`: on PostgreSQL the site's
 * orders and grants are in schema benefits_SITE, storeSchema).
 */
export type BenefitsConfig = MerchantConfig;

export async function startBenefits(c: BenefitsConfig) {
  const site = await readSite(c.dir);
  const log = createLogger(`benefits ${site.merchantId}`);
  const hsmPath = join(c.dir, PROGRAMME_HSM_FILE);
  if (!existsSync(hsmPath))
    throw new Error(
      `no programme security module at ${hsmPath}: the issuer provisions it (netpurse-issuer provision-programme-hsm --programme ${site.programme.code} --out ${hsmPath})`,
    );
  const hsm = await SoftwareHsm.open(hsmPath);
  const { location, ...connections } = c.store ?? { location: join(c.dir, BENEFITS_DB) };
  const db = await openStore(location, BENEFITS_MIGRATIONS, { ...connections, schema: storeSchema("benefits", site.merchantId), log });
  let bound = "";
  let opened;
  try {
    opened = openShop(c, { shopFile: shopOfSite(site), db, log, release: releaseReward(site), boundAddress: () => bound });
  } catch (e) {
    await db.close();
    throw e;
  }
  const { shop } = opened;
  const benefits = new Benefits({ site, db, hsm, log, siteAddress: () => c.advertise ?? bound });
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("benefits"),
    services: [
      service(MerchantServiceDefinition, shop.service, { all: "public" }),
      // Rewards and credits are the cardholders' (their messages prove themselves); grants are the enrolled merchants'.
      service(BenefitsServiceDefinition, benefits.service, { all: "public", grantPoints: ["merchant"] }),
    ],
    transport: c.security.server("request"),
    log,
  });
  bound = grpc.address;
  shop.startSweeping();
  return {
    address: grpc.address,
    shop,
    benefits,
    site,
    /** The site's store (its orders and grants), for tests and operators. */
    db,
    async close() {
      await grpc.shutdown();
      opened.close();
      await db.close();
    },
  };
}
