import { join } from "node:path";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { BankServer } from "./bank-server.js";
import { readBankFile } from "./identity.js";
import { BANK_MIGRATIONS, BANK_SCHEMA, BankStore } from "./store.js";
import type { LoginLimits } from "./login-limiter.js";

export interface BankConfig {
  /** As the bank in bank.json: its own certificate, and the CA the load server's must chain to. */
  security: Security;
  listen?: string;
  /** The bank's folder: bank.db and bank.json. */
  dir: string;
  /** Where its books are kept: default the SQLite file DIR/bank.db; on PostgreSQL in schema "bank", which replicas share. */
  store?: StoreConfig;
  /** The load server address put into offers. */
  loadServer?: string;
  /** This bank's address as cardholders reach it, put into offers (default: the address it binds). */
  publicAddress?: string;
  /** How old a hold without a confirmation must be before the bank asks the load server about it (default 15 minutes). */
  staleHoldMs?: number;
  /** How often the bank looks for such holds, and forgets expired access tokens (default every minute). */
  sweepEveryMs?: number;
  /** How long an access token from Login acts for its account (default 15 minutes). */
  accessTokenTtlMs?: number;
  /** Holds waiting for their confirmation one account may have at once (default 3). */
  maxHoldsPerAccount?: number;
  /** Failed login limits: per account, per caller address, how long they count and lock (defaults in login-limiter.ts). */
  loginLimits?: Partial<LoginLimits>;
}

/** Starts the demo bank in this process. */
export async function startBankServer(c: BankConfig) {
  const log = createLogger("bank");
  const file = await readBankFile(join(c.dir, "bank.json"));
  const { location, ...connections } = c.store ?? { location: join(c.dir, "bank.db") };
  const db = await openStore(location, BANK_MIGRATIONS, { ...connections, schema: BANK_SCHEMA, log });
  const store = new BankStore(db);
  const identity = {
    bankId: file.bankId,
    loadServerKey: Buffer.from(file.loadServerKey, "hex"),
    loadServerAddress: c.loadServer ?? defaultAddress("load"),
    bankAddress: "",
  };
  if (c.security.identity && c.security.identity.id !== file.bankId) {
    throw new Error(`this bank is ${file.bankId} (bank.json), but its certificate is ${c.security.identity.kind}/${c.security.identity.id}`);
  }
  const channel = openChannel(identity.loadServerAddress, c.security.channel({ kind: "load" }));
  const server = new BankServer({
    store,
    identity,
    log,
    loadServer: clientFactory().create(LoadServiceDefinition, channel),
    ...(c.accessTokenTtlMs !== undefined ? { accessTokenTtlMs: c.accessTokenTtlMs } : {}),
    ...(c.maxHoldsPerAccount !== undefined ? { maxHoldsPerAccount: c.maxHoldsPerAccount } : {}),
    ...(c.loginLimits ? { loginLimits: c.loginLimits } : {}),
  });
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("bank"),
    services: [service(BankServiceDefinition, server.service, { all: "public" })],
    transport: c.security.server("request"),
    log,
  });
  identity.bankAddress = c.publicAddress ?? grpc.address;
  const staleMs = c.staleHoldMs ?? 15 * 60_000;
  let sweeping = Promise.resolve();
  const timer = setInterval(() => {
    // One sweep at a time, and a failed one does not stop the next.
    sweeping = sweeping
      .then(() => server.resolveStaleHolds(staleMs))
      .then(() => store.purgeAccessTokens(new Date().toISOString()))
      .then(
        () => undefined,
        (e: unknown) => log.warn("stale hold sweep failed", { detail: (e as Error).message }),
      );
  }, c.sweepEveryMs ?? 60_000);
  timer.unref();
  return {
    address: grpc.address,
    store,
    server,
    async close() {
      clearInterval(timer);
      await sweeping;
      await grpc.shutdown();
      channel.close();
      await db.close();
    },
  };
}
