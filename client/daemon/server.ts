import { dirname, join } from "node:path";
import { InProcessTransport, type CardTransport } from "../../lib/apdu/transport.js";
import { PcscReaders } from "../../lib/pcsc/readers.js";
import { PcscTransport } from "../../lib/pcsc/transport.js";
import { PURSE_AID } from "../../lib/protocol/purse.js";
import type { Logger } from "../../lib/log.js";
import type { ServerMiddleware } from "nice-grpc";
import { service, startGrpcServer, type RunningServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { openSqlite } from "../../lib/store/db.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { SoftwareCard } from "../card/software-card.js";
import { daemonPaths, ensureDaemonToken, ensureSocketFolder, tokenGuard } from "./access.js";
import { CardholderDaemon } from "./daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal, SqliteLoadJournal } from "./journal.js";

export interface DaemonConfig {
  /** The CA bundle the servers it reaches must chain to (or --insecure). */
  security: Security;
  /** The Unix socket it serves on (default DIR/run/daemon.sock), in a folder of the cardholder's own that no one else may enter (mode 0700). */
  socket?: string;
  /** Opt-in: also serve on this loopback address (HOST:PORT), where every call must carry the token of `tokenFile`. */
  listenTcp?: string;
  /** The token calls over TCP must carry (default DIR/daemon.token, made mode 0600 on first use). */
  tokenFile?: string;
  /**
   * The card: a software card's file, or a card behind PC/SC — in the reader
   * of that name, or (reader "") the first reader holding a netpurse card.
   */
  card: string | { reader: string; waitForCardMs?: number };
  /** The daemon's folder: client.db (its journal). */
  dir: string;
  callDeadlineMs?: number;
  resumeEveryMs?: number;
}

/** The card's transport: in-process for a software card, pcscd for a card in a reader. */
async function openCard(card: DaemonConfig["card"], log: Logger): Promise<{ transport: CardTransport; close(): Promise<void> }> {
  if (typeof card === "string") return { transport: new InProcessTransport(await SoftwareCard.open(card)), close: async () => undefined };
  const readers = await PcscReaders.open({ log: log.child("pcsc") });
  const choice = card.reader ? { name: card.reader } : { holding: PURSE_AID };
  const transport = new PcscTransport(readers, choice, { log: log.child("pcsc"), waitForCardMs: card.waitForCardMs ?? 3_000 });
  const readerNames = readers.list().map((r) => `${r.name}${r.present ? " (card)" : ""}`);
  log.info("card behind PC/SC", { reader: card.reader || "the first holding a netpurse card", readers: readerNames.join(", ") || "none yet" });
  return { transport, close: () => readers.close() };
}

export async function startClientDaemon(c: DaemonConfig) {
  const log = createLogger("client");
  const paths = daemonPaths(c.dir);
  const socket = c.socket ?? paths.socket;
  // Refused before the card is opened: a daemon others could reach must not start.
  ensureSocketFolder(dirname(socket));
  const tokenFile = c.tokenFile ?? paths.token;
  const token = c.listenTcp !== undefined ? ensureDaemonToken(tokenFile) : undefined;
  const card = await openCard(c.card, log);
  const transport = card.transport;
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
  // The cardholder's own machine only: the socket, which the folder's mode keeps to the cardholder...
  const services = [service(CardholderServiceDefinition, daemon.service, { all: "public" })];
  const servers: RunningServer[] = [];
  const start = async (address: string, guard?: ServerMiddleware) => {
    const s = await startGrpcServer({ address, services, transport: { local: true }, log, ...(guard ? { guard } : {}) });
    servers.push(s);
    return s;
  };
  let socketServer: RunningServer;
  let tcpServer: RunningServer | undefined;
  try {
    socketServer = await start(`unix:${socket}`);
    // ...and, if asked, loopback TCP, which any local process can open: there the token decides.
    if (c.listenTcp !== undefined && token !== undefined) tcpServer = await start(c.listenTcp, tokenGuard(token, log));
  } catch (e) {
    for (const s of servers) await s.shutdown();
    await daemon.close();
    await card.close();
    await db.close();
    throw e;
  }
  daemon.startResuming();
  return {
    /** unix:PATH of its socket. */
    address: socketServer.address,
    /** HOST:PORT of its TCP listener, if it has one. */
    tcpAddress: tcpServer?.address,
    /** The file of the token calls over TCP must carry. */
    tokenFile,
    daemon,
    async close() {
      for (const s of servers) await s.shutdown();
      await daemon.close();
      await card.close();
      await db.close();
    },
  };
}
