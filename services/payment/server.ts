import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer, type ServerLimits } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { openStore, type StoreConfig } from "../../lib/store/postgres.js";
import { StoreUnavailable } from "../../lib/store/db.js";
import { repeat } from "../../lib/periodic.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { MerchantRegistry } from "./merchants.js";
import { PaymentServer } from "./payment-server.js";
import { PAYMENT_MIGRATIONS, PaymentStore } from "./store.js";
import { ConcentratorLink } from "./concentrator-link.js";
import { PsamPool } from "./psam-pool.js";
import { DebitCommands } from "./debit-command.js";
import { PsamWork } from "./psam-work.js";
import { Recovery } from "./recovery.js";
import { Ruling } from "./ruling.js";
import { SoftwareSecurityModule } from "./security-module.js";
import { transactionLocks } from "../../lib/store/locks.js";
import type { Security } from "../../lib/pki/security.js";

export interface PaymentConfig {
  security: Security;
  listen?: string;
  /** The payment server's folder: payment.db, merchants.json and psam-verdict-key.json. */
  dir: string;
  /** Where the transaction database is: default the SQLite file DIR/payment.db; replicas share one PostgreSQL database (schema "payment"). */
  store?: StoreConfig;
  /** The concentrators: one address, or several separated by commas (a stream to each). */
  concentrator?: string;
  paymentServerId?: string;
  /** Which replica of the payment server this process is, named in its streams to the concentrators (a label, not an identity); default none: it runs alone. */
  replicaId?: string;
  holdTimeoutMs?: number;
  maxPsamWaitMs?: number;
  jobTimeoutMs?: number;
  /** How often purchases waiting for their PSAM's ruling are retried. */
  sweepEveryMs?: number;
  /** How long a DEBIT command waits for the card's proof before the purchase is in doubt. */
  proofTimeoutMs?: number;
  /** How long a draw request may stay RECEIVED (no DEBIT command left this server) before it is ended; longer than maxPsamWaitMs. */
  abandonReceivedAfterMs?: number;
  /** Most purchases of one purse with a DEBIT command issued and no card answer recorded; a new draw request of that purse beyond it is refused. */
  maxUnansweredPerPurse?: number;
  /** The gRPC server's limits, where they differ from DEFAULT_LIMITS. */
  limits?: Partial<ServerLimits>;
}

/** The payment server's defaults, in one place for the code and its --help. */
export const PAYMENT_DEFAULTS = {
  holdTimeoutMs: 60_000,
  maxPsamWaitMs: 10_000,
  jobTimeoutMs: 10_000,
  sweepEveryMs: 15_000,
  proofTimeoutMs: 10 * 60_000,
  abandonReceivedAfterMs: 5 * 60_000,
  maxUnansweredPerPurse: 4,
} as const;

/**
 * How often a payment server whose database replicas share looks whether
 * another replica needs a PSAM it holds for a card's answer (PSAM_VERIFIES):
 * the most a CompletePurchase sent to another replica than the one holding
 * the PSAM waits for it, give or take the concentrator's pool update.
 */
const WATCH_HOLDS_EVERY_MS = 250;

/** How often the server checks that it can serve (its health, which balancing callers watch). */
const READINESS_EVERY_MS = 1_000;

/** Starts the payment server in this process. */
export async function startPaymentServer(c: PaymentConfig) {
  const startedAt = new Date();
  const log = createLogger("payment");
  const maxPsamWaitMs = c.maxPsamWaitMs ?? PAYMENT_DEFAULTS.maxPsamWaitMs;
  const abandonReceivedAfterMs = c.abandonReceivedAfterMs ?? PAYMENT_DEFAULTS.abandonReceivedAfterMs;
  // A draw request's handler gives up within maxPsamWaitMs; a shorter bound would end rows whose request is still trying.
  if (abandonReceivedAfterMs <= maxPsamWaitMs) {
    throw new Error(`abandon-received-after-ms (${abandonReceivedAfterMs}) must be longer than psam-wait-ms (${maxPsamWaitMs})`);
  }
  // Before anything else opens: without it no PSAM answer could be checked.
  const verdicts = await SoftwareSecurityModule.open(c.dir);
  const { location, ...connections } = c.store ?? { location: join(c.dir, "payment.db") };
  const db = await openStore(location, PAYMENT_MIGRATIONS, { ...connections, schema: "payment", log });
  const store = new PaymentStore(db, (e) => log.error("purchase left out of recovery", { error: e.message }));
  // Shared with every replica on a PostgreSQL database: advisory locks named payment:TRANSACTION (and the in-process mutex on SQLite).
  const locks = transactionLocks(db, { namespace: "payment", log });
  const pool = new PsamPool((l) => link.release(l));
  const link: ConcentratorLink = new ConcentratorLink({
    address: c.concentrator ?? defaultAddress("concentrator"),
    channel: c.security.channel({ kind: "concentrator" }),
    paymentServerId: c.paymentServerId ?? "payment-1",
    ...(c.replicaId ? { replicaId: c.replicaId } : {}),
    pool,
    log,
    onTerminal: (t) => recovery.onTerminal(t),
    onLateResult: (terminalId, slot) => recovery.onSlot(terminalId, slot),
  });
  const work = new PsamWork({
    pool,
    link,
    store,
    log,
    verdicts,
    holdTimeoutMs: c.holdTimeoutMs ?? PAYMENT_DEFAULTS.holdTimeoutMs,
    jobTimeoutMs: c.jobTimeoutMs ?? PAYMENT_DEFAULTS.jobTimeoutMs,
    ...(locks.shared ? { watchHolds: { locks, everyMs: WATCH_HOLDS_EVERY_MS } } : {}),
  });
  const ruling = new Ruling({ store, work, log, locks });
  const recovery: Recovery = new Recovery({
    store,
    pool,
    work,
    ruling,
    locks,
    log,
    proofTimeoutMs: c.proofTimeoutMs ?? PAYMENT_DEFAULTS.proofTimeoutMs,
    abandonReceivedAfterMs,
  });
  // Before any call is served: every RECEIVED row now was left by a previous run (or, among replicas, by one that is gone or
  // left it for the client's retry; one another replica works on now is left to it).
  await recovery.abandonLeftByPreviousRun(startedAt);
  const server = new PaymentServer({
    store,
    merchants: new MerchantRegistry(join(c.dir, "merchants.json")),
    debitCommands: new DebitCommands({ store, pool, work, log }),
    ruling,
    recovery,
    locks,
    log,
    maxPsamWaitMs,
    maxUnansweredPerPurse: c.maxUnansweredPerPurse ?? PAYMENT_DEFAULTS.maxUnansweredPerPurse,
  });
  link.start();
  recovery.startSweeping(c.sweepEveryMs ?? PAYMENT_DEFAULTS.sweepEveryMs);
  const grpc = await startGrpcServer({
    address: c.listen ?? defaultAddress("payment"),
    // Cardholders call it without a certificate (their messages are sealed and prove themselves); operators read records with theirs.
    services: [service(PaymentServiceDefinition, server.service, { all: "public", getPurchase: ["operator"] })],
    transport: c.security.server("request"),
    log,
    limits: c.limits,
  });
  // A caller balancing over replicas skips one that can do nothing now: linked to no concentrator (no PSAM), or its database out of reach.
  const readiness = repeat({
    what: "readiness check",
    everyMs: READINESS_EVERY_MS,
    log,
    task: async () => {
      let why: string | undefined;
      if (link.connectedCount() === 0) why = "linked to no concentrator: no PSAM can be reached";
      else
        await db.get("SELECT 1").catch((e: unknown) => {
          if (!(e instanceof StoreUnavailable)) throw e;
          why = "its database cannot be reached";
        });
      grpc.setServing(why === undefined, why);
    },
  });
  return {
    address: grpc.address,
    pool,
    store,
    /** Its recovery (tests sweep on demand). */
    recovery,
    /** Connections its gRPC server holds now. */
    connections: () => grpc.connections(),
    whenConnected: () => link.whenReady(),
    async close() {
      readiness.stop();
      await grpc.shutdown();
      recovery.stop();
      work.releaseAll();
      await link.close();
      await db.close();
    },
    /**
     * Test only: dies as the process would, with no last word: its stream to
     * the concentrator is cut (which releases its leases there), every
     * database connection is dropped (PostgreSQL releases its locks and rolls
     * back what was open; nothing more is written), its held PSAMs and timers
     * are forgotten, and its gRPC server stops. Not to be closed after.
     */
    async crash() {
      readiness.stop();
      const streamCut = link.close(); // aborts the stream at once, before any release could be sent on it
      await (db.abandon ? db.abandon() : db.close());
      recovery.stop();
      work.forgetAll();
      await streamCut;
      await grpc.shutdown();
    },
  };
}
