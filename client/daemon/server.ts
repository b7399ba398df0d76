import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openSqlite } from "../../lib/store/db.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { SoftwareCard } from "../card/software-card.js";
import { CardholderDaemon } from "./daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal, SqliteLoadJournal } from "./journal.js";

export interface DaemonConfig {
  /** The CA bundle the servers it reaches must chain to (or --insecure). */
  security: Security;
  /** Bound to loopback by default: the cardholder API is for this machine only. */
  listen?: string;
  /** The software card file. */
  card: string;
  /** The daemon's folder: client.db (its journal). */
  dir: string;
  callDeadlineMs?: number;
  resumeEveryMs?: number;
}

export async function startClientDaemon(c: DaemonConfig) {
  const log = createLogger("client");
  const transport = new InProcessTransport(await SoftwareCard.open(c.card));
  const db = openSqlite(join(c.dir, "client.db"), CLIENT_MIGRATIONS);
  const daemon = new CardholderDaemon({
    transport,
    journal: new SqliteJournal(db),
    loads: new SqliteLoadJournal(db),
    log,
    security: c.security,
    ...(c.callDeadlineMs ? { callDeadlineMs: c.callDeadlineMs } : {}),
    ...(c.resumeEveryMs ? { resumeEveryMs: c.resumeEveryMs } : {}),
  });
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("cardholder"),
    services: [service(CardholderServiceDefinition, daemon.service, { all: "public" })],
    // The cardholder's own machine only (the command-line tool on loopback).
    transport: { local: true },
    log,
  });
  daemon.startResuming();
  return {
    address: grpc.address,
    daemon,
    async close() {
      await grpc.shutdown();
      await daemon.close();
      await db.close();
    },
  };
}
