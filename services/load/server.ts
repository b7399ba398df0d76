import { join } from "node:path";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openSqlite } from "../../lib/store/db.js";
import { loadBankKeys } from "./banks.js";
import { SoftwareHsm } from "./hsm.js";
import { LoadServer } from "./load-server.js";
import { LOAD_MIGRATIONS, LoadStore } from "./store.js";

export interface LoadConfig {
  security: Security;
  listen?: string;
  /** The load server's folder: load.db, banks.json and the software security module's hsm.json. */
  dir: string;
}

/** Starts the load server in this process. */
export async function startLoadServer(c: LoadConfig) {
  const log = createLogger("load");
  const hsm = await SoftwareHsm.open(join(c.dir, "hsm.json"));
  const db = openSqlite(join(c.dir, "load.db"), LOAD_MIGRATIONS);
  const store = new LoadStore(db);
  const server = new LoadServer({ store, hsm, banks: await loadBankKeys(join(c.dir, "banks.json")), log });
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("load"),
    // Cardholders call it without a certificate: every request carries the bank's sealed authorisation and proves itself.
    // Banks call AbandonLoad with theirs, over mutual TLS; a bank's certificate serves only its own loads.
    services: [service(LoadServiceDefinition, server.service, { all: "public" })],
    transport: c.security.server("request"),
    log,
  });
  return {
    address: grpc.address,
    store,
    async close() {
      await grpc.shutdown();
      await db.close();
    },
  };
}
