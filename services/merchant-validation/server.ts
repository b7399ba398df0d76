import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { ProofReporter, VALIDATION_MIGRATIONS } from "./proof-reporter.js";
import { MerchantValidation } from "./validation.js";

export interface ValidationConfig {
  security: Security;
  listen?: string;
  /** The service's folder: keys.json and validation.db (its outbox of card proofs). */
  dir: string;
  /** Where its outbox is kept: default the SQLite file DIR/validation.db; on PostgreSQL in schema "validation". */
  store?: StoreConfig;
  /** The payment server to report card proofs to (MERCHANT_COMPARES). */
  paymentServer?: string;
  reportEveryMs?: number;
}

export async function startMerchantValidation(c: ValidationConfig) {
  const log = createLogger("merchant-validation");
  const keys = await MerchantValidation.loadKeys(join(c.dir, "keys.json"));
  const { location, ...connections } = c.store ?? { location: join(c.dir, "validation.db") };
  const db = await openStore(location, VALIDATION_MIGRATIONS, { ...connections, schema: "validation", log });
  const channel = openChannel(c.paymentServer ?? defaultAddress("payment"), c.security.channel({ kind: "payment" }));
  const reporter = new ProofReporter({
    db,
    payment: clientFactory().create(PaymentServiceDefinition, channel),
    log,
    ...(c.reportEveryMs ? { retryEveryMs: c.reportEveryMs } : {}),
  });
  const v = new MerchantValidation(keys, reporter, log);
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("merchantValidation"),
    // Only merchants, each for itself (checked in the handlers).
    services: [service(MerchantValidationServiceDefinition, v.service, { all: ["merchant"] })],
    transport: c.security.server("require"), // merchants only, inside the operator's network
    log,
  });
  reporter.start();
  return {
    address: grpc.address,
    reporter,
    async close() {
      await grpc.shutdown();
      await reporter.close();
      channel.close();
      await db.close();
    },
  };
}
