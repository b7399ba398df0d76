import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import {
  DATABASE_HELP,
  DATABASE_OPTIONS,
  intOpt,
  opt,
  runService,
  SECURITY_HELP,
  SECURITY_OPTIONS,
  serviceSecurity,
  storeConfig,
} from "../../lib/service-main.js";
import { PAYMENT_DEFAULTS as D, startPaymentServer } from "./server.js";

await runService({
  program: "netpurse-payment",
  summary: "Payment server: turns draw requests into PSAM-signed DEBIT commands and confirms purchases to merchants.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    concentrator: { type: "string" },
    id: { type: "string" },
    replica: { type: "string" },
    "hold-timeout-ms": { type: "string" },
    "psam-wait-ms": { type: "string" },
    "proof-timeout-ms": { type: "string" },
    "abandon-received-after-ms": { type: "string" },
    "sweep-every-ms": { type: "string" },
    "max-unanswered-per-purse": { type: "string" },
    "db-lock-pool-size": { type: "string" },
    ...SECURITY_OPTIONS,
    ...DATABASE_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("payment")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this server's folder (default DATA/payment): payment.db, merchants.json",
    `  --concentrator HOST:PORT[,HOST:PORT...]  terminal concentrators: a stream to each, leasing PSAMs from all
                           (default ${defaultAddress("concentrator")})`,
    "  --id NAME                payment server id at the concentrator (default payment-1)",
    "  --replica NAME           this replica's name when several run as one payment server (one --id, one certificate,",
    "                           one database); a label for its streams, 1..64 of [A-Za-z0-9._-]; give each replica its own",
    "                           (default: none with a SQLite file, where it runs alone; HOSTNAME-PID with a PostgreSQL --database)",
    `  --hold-timeout-ms N      how long a PSAM waits for the card's answer (default ${D.holdTimeoutMs})`,
    `  --psam-wait-ms N         longest wait for a free PSAM without a caller deadline (default ${D.maxPsamWaitMs})`,
    `  --proof-timeout-ms N     how long a DEBIT command waits for the card's proof before it is in doubt (default ${D.proofTimeoutMs})`,
    `  --abandon-received-after-ms N  how long a draw request may stay without its DEBIT command (state RECEIVED) since its
                           last attempt before it is ended REFUSED (reason DRAW_REQUEST_ABANDONED; nothing was debited);
                           longer than --psam-wait-ms. Rows a previous run left RECEIVED are ended at start (on PostgreSQL,
                           which replicas share, only those older than this) (default ${D.abandonReceivedAfterMs})`,
    `  --sweep-every-ms N       how often recovery looks at waiting purchases: rulings, proofs, doubt, abandoned draw requests
                           (default ${D.sweepEveryMs})`,
    `  --max-unanswered-per-purse N  most DEBIT commands of one card awaiting its answer; one more draw request is refused (default ${D.maxUnansweredPerPurse})`,
    DATABASE_HELP,
    `  --db-lock-pool-size N    PostgreSQL connections kept for the transactions' locks, one per step under way (a step waiting
                           for a free PSAM holds none); a step finding none free by its deadline fails UNAVAILABLE (default ${D.lockPoolSize})`,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) =>
    startPaymentServer({
      store: storeConfig(v, join(opt(v, "dir", join(dataDir(v.data as string | undefined), "payment")), "payment.db")),
      security: await serviceSecurity(v, { kind: "payment", id: opt(v, "id", "payment-1") }),
      listen: opt(v, "listen", defaultAddress("payment")),
      dir: opt(v, "dir", join(dataDir(v.data as string | undefined), "payment")),
      concentrator: opt(v, "concentrator", defaultAddress("concentrator")),
      paymentServerId: opt(v, "id", "payment-1"),
      ...(typeof v.replica === "string" ? { replicaId: v.replica } : {}),
      holdTimeoutMs: intOpt(v, "hold-timeout-ms", D.holdTimeoutMs),
      maxPsamWaitMs: intOpt(v, "psam-wait-ms", D.maxPsamWaitMs),
      proofTimeoutMs: intOpt(v, "proof-timeout-ms", D.proofTimeoutMs),
      abandonReceivedAfterMs: intOpt(v, "abandon-received-after-ms", D.abandonReceivedAfterMs),
      sweepEveryMs: intOpt(v, "sweep-every-ms", D.sweepEveryMs),
      maxUnansweredPerPurse: intOpt(v, "max-unanswered-per-purse", D.maxUnansweredPerPurse),
      lockPoolSize: Math.max(1, intOpt(v, "db-lock-pool-size", D.lockPoolSize)),
    }),
});
