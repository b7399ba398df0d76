import { hostname } from "node:os";
import { join } from "node:path";
import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer, type ServerLimits } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { isName } from "../../lib/ids.js";
import { isPostgresUrl, openStore, type StoreConfig } from "../../lib/store/postgres.js";
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
  /**
   * Which replica of the payment server this process is, named in its streams to the concentrators (a label, not an
   * identity). Default: none on SQLite (it runs alone); on PostgreSQL, where replicas share the database, HOSTNAME-PID
   * (defaultReplicaId), so that replicas started without one are told apart.
   */
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
  /** PostgreSQL: connections kept at most for the transactions' locks, one per step under way (PAYMENT_DEFAULTS.lockPoolSize). */
  lockPoolSize?: number;
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
  /**
   * A step holds its transaction's lock connection while it runs a PSAM job
   * or writes, never while it waits for a free PSAM or for the card: about
   * one per PSAM this server works with at once, plus recovery's steps. 64
   * fits a server using 48 PSAMs with room to spare; a step finding none
   * free waits for one until its deadline, then fails UNAVAILABLE.
   */
  lockPoolSize: 64,
} as const;

/** This process's replica id when none is given on a shared database: HOSTNAME-PID, and -2, -3 … for more servers in one process. */
let replicasStarted = 0;
export function defaultReplicaId(): string {
  const n = ++replicasStarted;
  const suffix = `-${process.pid}${n > 1 ? `-${n}` : ""}`;
  const host =
    hostname()
      .replace(/[^A-Za-z0-9._-]/g, "-")
      .slice(0, 64 - suffix.length) || "replica";
  return `${host}${suffix}`;
}

/**
 * How often a payment server whose database replicas share looks whether
 * another replica needs a PSAM it holds for a card's answer (PSAM_VERIFIES):
 * the most a CompletePurchase sent to another replica than the one holding
 * the PSAM waits for it, give or take the concentrator's pool update.
 */
const WATCH_HOLDS_EVERY_MS = 250;

/** How often the server checks that it can serve (its health, which balancing callers watch). */
const READINESS_EVERY_MS = 1_000;
/** How long a payment server may be without any concentrator before it says it cannot serve. */
const UNLINKED_GRACE_MS = 3_000;

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
  // Refused here, not by every concentrator for ever after (it would stay linked to none, saying only NOT_SERVING).
  if (c.replicaId !== undefined && !isName(c.replicaId, 64)) throw new Error(`replica "${c.replicaId}" must be 1..64 characters of [A-Za-z0-9._-]`);
  // Before anything else opens: without it no PSAM answer could be checked.
  const verdicts = await SoftwareSecurityModule.open(c.dir);
  const { location, ...connections } = c.store ?? { location: join(c.dir, "payment.db") };
  const db = await openStore(location, PAYMENT_MIGRATIONS, {
    ...connections,
    lockPoolSize: c.lockPoolSize ?? PAYMENT_DEFAULTS.lockPoolSize,
    schema: "payment",
    log,
  });
  const store = new PaymentStore(db, (e) => log.error("purchase left out of recovery", { error: e.message }));
  // Shared with every replica on a PostgreSQL database: advisory locks named payment:TRANSACTION (and the in-process mutex on SQLite).
  const locks = transactionLocks(db, { namespace: "payment", log });
  // Replicas on one database: each stream at the concentrators must be told apart (one per identity and replica id).
  const replicaId = c.replicaId ?? (isPostgresUrl(location) ? defaultReplicaId() : undefined);
  if (replicaId && !c.replicaId) log.info("replica id not given: named after this host and process", { replica: replicaId });
  const pool = new PsamPool((l) => link.release(l));
  const link: ConcentratorLink = new ConcentratorLink({
    address: c.concentrator ?? defaultAddress("concentrator"),
    channel: c.security.channel({ kind: "concentrator" }),
    paymentServerId: c.paymentServerId ?? "payment-1",
    ...(replicaId ? { replicaId } : {}),
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
  // Before any call is served: alone, every RECEIVED row now was left by a previous run. Among replicas, only the rows older
  // than --abandon-received-after-ms are ended (the others may be another replica's, being worked on or left for a retry).
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
  let unlinkedSince: number | undefined;
  const readiness = repeat({
    what: "readiness check",
    everyMs: READINESS_EVERY_MS,
    log,
    task: async () => {
      let why: string | undefined;
      // A stream being re-made (a concentrator restarting, a keepalive missed under load) is no reason to be skipped: only a lasting one.
      if (link.connectedCount() > 0) unlinkedSince = undefined;
      else unlinkedSince ??= Date.now();
      if (unlinkedSince !== undefined && Date.now() - unlinkedSince >= UNLINKED_GRACE_MS)
        why = ["linked to no concentrator: no PSAM can be reached", ...link.refusals()].join("; ");
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
     * Test only: cuts every database connection at once, as a database
     * restart would for this process alone (its locks go with them); its
     * store answers nothing more after (StoreUnavailable): crash it then.
     */
    async cutDatabase() {
      await db.abandon?.();
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
