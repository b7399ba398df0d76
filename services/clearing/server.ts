import { join } from "node:path";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { WatchedPsamRegistry } from "../concentrator/psam-registry.js";
import { Clearing, type SubmissionLimits } from "./clearing.js";
import { readClearingMerchants, type ClearingMerchant } from "./merchants.js";
import { SoftwareClearingModule } from "./security-module.js";
import { CLEARING_MIGRATIONS, ClearingStore } from "./store.js";
import { watchFile, unwatchFile } from "node:fs";

export interface ClearingConfig {
  security: Security;
  listen?: string;
  /** Clearing's folder: clearing.db, keys.json (its security module's keys), merchants.json. */
  dir: string;
  /** Where its ledger is kept: default the SQLite file DIR/clearing.db; on PostgreSQL in schema "clearing". */
  store?: StoreConfig;
  /** The issuer's PSAM registry (which terminal holds which PSAM); required unless the network runs --insecure. */
  psamRegistry?: string;
  clock?: () => Date;
  /** Overrides of how many batch submissions may be open at once and how long one may take (tests). */
  submissionLimits?: Partial<SubmissionLimits>;
}

/** Starts the clearing service in this process. */
export async function startClearing(c: ClearingConfig) {
  const log = createLogger("clearing");
  if (!c.psamRegistry && !c.security.insecure)
    throw new Error("clearing needs the issuer's PSAM registry (--psam-registry FILE) to know which terminal may send which PSAM's batches");
  const module = await SoftwareClearingModule.open(join(c.dir, "keys.json"), log.child("security-module"));
  const registry = c.psamRegistry ? await WatchedPsamRegistry.open(c.psamRegistry, log) : undefined;
  // The merchant registry follows its file: a merchant added by the operator is paid without a restart.
  const merchantsPath = join(c.dir, "merchants.json");
  let merchants: ReadonlyMap<string, ClearingMerchant> = await readClearingMerchants(merchantsPath);
  watchFile(merchantsPath, { interval: 1_000, persistent: false }, () => {
    readClearingMerchants(merchantsPath).then(
      (m) => {
        merchants = m;
        log.info("merchant registry reloaded", { merchants: m.size });
      },
      (e: unknown) => log.warn("merchant registry changed but does not read; keeping the previous one", { error: (e as Error).message }),
    );
  });
  const { location, ...connections } = c.store ?? { location: join(c.dir, "clearing.db") };
  let db;
  try {
    db = await openStore(location, CLEARING_MIGRATIONS, { ...connections, schema: "clearing", log });
  } catch (e) {
    registry?.stop();
    unwatchFile(merchantsPath);
    module.close();
    throw e;
  }
  const store = new ClearingStore(db);
  const clearing = new Clearing({
    store,
    module,
    merchants: () => merchants,
    psamRegistry: registry,
    log,
    clock: c.clock ?? (() => new Date()),
    ...(c.submissionLimits ? { submissionLimits: c.submissionLimits } : {}),
  });
  const server = await startGrpcServer({
    address: c.listen ?? defaultAddress("clearing"),
    // Peers of the operator's network only; each RPC names the kinds it serves, and the handlers check ids (a terminal's own PSAMs, a merchant's own statement).
    services: [
      service(ClearingServiceDefinition, clearing.service, {
        all: ["operator"],
        submitBatch: ["terminal"],
        submitLoads: ["load"],
        getMerchantStatement: ["operator", "merchant"],
        getBatch: ["operator", "terminal"],
      }),
    ],
    transport: c.security.server("require"),
    log,
    // A batch of 10,000 records streams as 10,000 small messages; no request needs more than 64 KiB. Answers carry pages of up
    // to 500 entries and audits of up to 1,000 cards (under 200 KiB): 1 MiB.
    limits: { maxMessageBytes: 64 * 1024, maxSendBytes: 1024 * 1024 },
  });
  return {
    address: server.address,
    store,
    clearing,
    async close() {
      registry?.stop();
      unwatchFile(merchantsPath);
      await server.shutdown();
      await db.close();
      module.close();
    },
  };
}
