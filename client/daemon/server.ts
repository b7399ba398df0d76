import { dirname, join } from "node:path";
import { InProcessTransport } from "../../lib/apdu/transport.js";
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
  /** The software card file. */
  card: string;
  /** The daemon's folder: client.db (its journal). */
  dir: string;
  callDeadlineMs?: number;
  resumeEveryMs?: number;
}

export async function startClientDaemon(c: DaemonConfig) {
  const log = createLogger("client");
  const paths = daemonPaths(c.dir);
  const socket = c.socket ?? paths.socket;
  // Refused before the card is opened: a daemon others could reach must not start.
  ensureSocketFolder(dirname(socket));
  const tokenFile = c.tokenFile ?? paths.token;
  const token = c.listenTcp !== undefined ? ensureDaemonToken(tokenFile) : undefined;
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
      await db.close();
    },
  };
}
