import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { openSqlite } from "../../lib/store/db.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { ProofReporter, VALIDATION_MIGRATIONS } from "./proof-reporter.js";
import { MerchantValidation } from "./validation.js";

export interface ValidationConfig {
  listen?: string;
  /** The service's folder: keys.json and validation.db (its outbox of card proofs). */
  dir: string;
  /** The payment server to report card proofs to (MERCHANT_COMPARES). */
  paymentServer?: string;
  reportEveryMs?: number;
}

export async function startMerchantValidation(c: ValidationConfig) {
  const log = createLogger("merchant-validation");
  const keys = await MerchantValidation.loadKeys(join(c.dir, "keys.json"));
  const db = openSqlite(join(c.dir, "validation.db"), VALIDATION_MIGRATIONS);
  const channel = openChannel(c.paymentServer ?? defaultAddress("payment"));
  const reporter = new ProofReporter({
    db,
    payment: clientFactory().create(PaymentServiceDefinition, channel),
    log,
    ...(c.reportEveryMs ? { retryEveryMs: c.reportEveryMs } : {}),
  });
  const v = new MerchantValidation(keys, reporter, log);
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("merchantValidation"),
    services: [service(MerchantValidationServiceDefinition, v.service)],
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
