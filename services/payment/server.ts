import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { openSqlite } from "../../lib/store/db.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { MerchantRegistry } from "./merchants.js";
import { PaymentServer } from "./payment-server.js";
import { PAYMENT_MIGRATIONS, PaymentStore } from "./store.js";
import { ConcentratorLink, PsamPool } from "./terminal-pool.js";

export interface PaymentConfig {
  listen?: string;
  /** The payment server's folder: payment.db and merchants.json. */
  dir: string;
  concentrator?: string;
  paymentServerId?: string;
  holdTimeoutMs?: number;
  maxPsamWaitMs?: number;
  jobTimeoutMs?: number;
  /** How often purchases waiting for their PSAM's ruling are retried. */
  sweepEveryMs?: number;
  /** How long a DEBIT command waits for the card's proof before the purchase is in doubt. */
  proofTimeoutMs?: number;
}

/** Starts the payment server in this process. */
export async function startPaymentServer(c: PaymentConfig) {
  const log = createLogger("payment");
  const db = openSqlite(join(c.dir, "payment.db"), PAYMENT_MIGRATIONS);
  const store = new PaymentStore(db);
  let link: ConcentratorLink;
  const pool = new PsamPool((l) => link.release(l));
  let server: PaymentServer;
  link = new ConcentratorLink({
    address: c.concentrator ?? defaultAddress("concentrator"),
    paymentServerId: c.paymentServerId ?? "payment-1",
    pool,
    log,
    onTerminal: (t) => server.onTerminal(t),
    onLateResult: (terminalId, slot) => server.onSlot(terminalId, slot),
  });
  server = new PaymentServer({
    store,
    merchants: new MerchantRegistry(join(c.dir, "merchants.json")),
    pool,
    link,
    log,
    ...(c.holdTimeoutMs !== undefined ? { holdTimeoutMs: c.holdTimeoutMs } : {}),
    ...(c.maxPsamWaitMs !== undefined ? { maxPsamWaitMs: c.maxPsamWaitMs } : {}),
    ...(c.jobTimeoutMs !== undefined ? { jobTimeoutMs: c.jobTimeoutMs } : {}),
    ...(c.proofTimeoutMs !== undefined ? { proofTimeoutMs: c.proofTimeoutMs } : {}),
  });
  link.start();
  server.startSweeping(c.sweepEveryMs ?? 15_000);
  const grpc = await startGrpcServer({ address: c.listen ?? defaultAddress("payment"), services: [[PaymentServiceDefinition, server.service]], log });
  return {
    address: grpc.address,
    pool,
    store,
    server,
    whenConnected: () => link.whenReady(),
    async close() {
      await grpc.shutdown();
      await server.close();
      await link.close();
      await db.close();
    },
  };
}
