import { join } from "node:path";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { loadBankKeys } from "./banks.js";
import { ClearingReporter, type ClearingReporterOptions } from "./clearing-reporter.js";
import { openHsm } from "./open-hsm.js";
import { LoadServer } from "./load-server.js";
import { LOAD_MIGRATIONS, LoadStore } from "./store.js";

export interface LoadConfig {
  security: Security;
  listen?: string;
  /** The load server's folder: load.db, banks.json and hsm.json (the software security module, or where the PKCS#11 token is: docs/hsm.md). */
  dir: string;
  /** Where its loads are kept: default the SQLite file DIR/load.db; on PostgreSQL in schema "load". */
  store?: StoreConfig;
  /** The clearing service every settled load is reported to (default 127.0.0.1:7460). */
  clearing?: string;
  /** The reporter's timer, back-off and deadline (tests shorten them). */
  reporting?: Pick<ClearingReporterOptions, "everyMs" | "firstBackoffMs" | "maxBackoffMs" | "deadlineMs">;
}

/** Starts the load server in this process. */
export async function startLoadServer(c: LoadConfig) {
  const log = createLogger("load");
  const hsm = await openHsm(join(c.dir, "hsm.json"), log.child("hsm"));
  const { location, ...connections } = c.store ?? { location: join(c.dir, "load.db") };
  let db;
  try {
    db = await openStore(location, LOAD_MIGRATIONS, { ...connections, schema: "load", log });
  } catch (e) {
    hsm.close?.();
    throw e;
  }
  const store = new LoadStore(db);
  // Clearing may be down: the channel reconnects on its own, the reporter retries, and loads go on meanwhile.
  const clearingChannel = openChannel(c.clearing ?? defaultAddress("clearing"), c.security.channel({ kind: "clearing" }));
  const reporter = new ClearingReporter({
    store,
    clearing: clientFactory().create(ClearingServiceDefinition, clearingChannel),
    log: log.child("clearing"),
    ...c.reporting,
  });
  const server = new LoadServer({ store, hsm, banks: await loadBankKeys(join(c.dir, "banks.json")), log, settled: () => reporter.wake() });
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("load"),
    // Cardholders call it without a certificate: every request carries the bank's sealed authorisation and proves itself.
    // Banks call AbandonLoad with theirs, over mutual TLS; a bank's certificate serves only its own loads.
    services: [service(LoadServiceDefinition, server.service, { all: "public" })],
    transport: c.security.server("request"),
    log,
  });
  reporter.start();
  return {
    address: grpc.address,
    store,
    reporter,
    async close() {
      await grpc.shutdown();
      await reporter.close();
      clearingChannel.close();
      await db.close();
      hsm.close?.();
    },
  };
}
