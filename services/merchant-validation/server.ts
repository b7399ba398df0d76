import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { MerchantValidation } from "./validation.js";

export interface ValidationConfig {
  listen?: string;
  /** The service's folder: keys.json. */
  dir: string;
}

export async function startMerchantValidation(c: ValidationConfig) {
  const log = createLogger("merchant-validation");
  const v = await MerchantValidation.load(join(c.dir, "keys.json"), log);
  const grpc = await startGrpcServer({ address: c.listen ?? defaultAddress("merchantValidation"), services: [[MerchantValidationServiceDefinition, v.service]], log });
  return { address: grpc.address, close: () => grpc.shutdown() };
}
