// The entry point every service process shares: --help, flags, a clean
// shutdown on SIGINT/SIGTERM, and a clear message when the service cannot
// start (a port in use, a missing key file).

import { parseArgs, type ParseArgsConfig } from "node:util";
import { dataDir } from "./config.js";
import type { Kind } from "./pki/identity.js";
import { pkiDirOf, Security } from "./pki/security.js";
import type { StoreConfig } from "./store/postgres.js";
import { answerStatsRequests } from "./stats.js";

export interface Stoppable {
  address: string;
  close(): Promise<void>;
}

export type Values = Record<string, string | boolean | (string | boolean)[] | undefined>;

export async function runService(p: {
  program: string;
  summary: string;
  options: NonNullable<ParseArgsConfig["options"]>;
  /** Lines describing each option, for --help. */
  help: string;
  start(values: Values): Promise<Stoppable>;
  /** Arguments to parse (default: the process's). */
  argv?: string[];
}): Promise<void> {
  const options = { ...p.options, help: { type: "boolean", short: "h" } } as const;
  let values: Values;
  try {
    values = parseArgs({ args: p.argv ?? process.argv.slice(2), options, strict: true }).values;
  } catch (e) {
    process.stderr.write(`${p.program}: ${(e as Error).message}\nRun '${p.program} --help' for the options.\n`);
    process.exit(2);
  }
  if (values.help) {
    process.stdout.write(`Usage: ${p.program} [options]\n\n${p.summary}\n\nOptions:\n${p.help}\n  -h, --help               this text\n`);
    return;
  }
  // What a service writes (databases, keys, logs) is for its own user: nothing is made readable by others.
  process.umask(0o077);
  // Whoever read our output (a launcher) may be gone: a log line then fails with EPIPE, which must not
  // end the service mid-transaction nor spoil its clean shutdown.
  for (const out of [process.stdout, process.stderr]) {
    out.on("error", (e: NodeJS.ErrnoException) => {
      if (e.code !== "EPIPE" && e.code !== "ERR_STREAM_DESTROYED") throw e;
    });
  }
  let running: Stoppable;
  try {
    running = await p.start(values);
  } catch (e) {
    const err = e as Error & { code?: string };
    const hint = /EADDRINUSE|No address added out of total/.test(err.message)
      ? " (is another netpurse already running? stop it or choose another --listen port)"
      : "";
    process.stderr.write(`${p.program}: cannot start: ${err.message}${hint}\n`);
    process.exit(1);
  }
  // Parent processes read this line to learn the bound address.
  process.stdout.write(`${p.program} listening on ${running.address}\n`);
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    process.stderr.write(`${p.program}: ${signal}, shutting down\n`);
    const force = setTimeout(() => process.exit(1), 5_000);
    force.unref();
    await running.close();
    process.exit(0);
  };
  const onSignal = (signal: string) => () => {
    stop(signal).catch((e: unknown) => {
      process.stderr.write(`${p.program}: shutdown failed: ${(e as Error).message}\n`);
      process.exit(1);
    });
  };
  process.on("SIGINT", onSignal("SIGINT"));
  process.on("SIGTERM", onSignal("SIGTERM"));
  // Started by a launcher (npm start, the tests, the benchmarks) with an IPC channel: the channel closes
  // when the launcher goes, however it went (SIGKILL included), and the service stops cleanly with it
  // rather than live on holding its port.
  if (process.send) {
    answerStatsRequests();
    if (process.connected) process.once("disconnect", onSignal("the launcher is gone"));
    else onSignal("the launcher is gone")();
  }
}

export function opt(values: Values, name: string, fallback: string): string {
  const v = values[name];
  return typeof v === "string" ? v : fallback;
}

export function intOpt(values: Values, name: string, fallback: number): number {
  const v = values[name];
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) {
    process.stderr.write(`--${name} must be a non-negative integer, got "${String(v)}"\n`);
    process.exit(2);
  }
  return n;
}

/** The options every service takes for its links' security. */
export const SECURITY_OPTIONS = { pki: { type: "string" }, insecure: { type: "boolean" } } as const;

export const SECURITY_HELP = [
  "  --pki DIR                the installation's certificates (default DATA/pki; made by 'netpurse-operator pki')",
  "  --insecure               plaintext and no authentication on every link: for local debugging only",
].join("\n");

/** This service's security from its options: its identity's key and certificate from the PKI folder, or --insecure. */
export async function serviceSecurity(values: Values, identity: { kind: Kind; id: string }): Promise<Security> {
  if (values.insecure === true) return Security.insecure();
  const pki = typeof values.pki === "string" ? values.pki : pkiDirOf(dataDir(values.data as string | undefined));
  return Security.forService(pki, identity);
}

/** The options of a service whose store may be PostgreSQL. */
export const DATABASE_OPTIONS = {
  database: { type: "string" },
  "db-pool-size": { type: "string" },
  "db-statement-timeout-ms": { type: "string" },
} as const;

export const DATABASE_HELP = [
  "  --database URL|FILE      where this service keeps its state: a postgres://user:password@host:port/db URL (tables in a",
  "                           schema named after the service, so one database serves them all), or a SQLite file",
  "                           (default $NETPURSE_DATABASE_URL, else the SQLite file in its folder)",
  "  --db-pool-size N         PostgreSQL connections this process keeps at most (default 10)",
  "  --db-statement-timeout-ms N  a PostgreSQL statement running longer is cancelled and the call fails (default none)",
].join("\n");

/** This service's store from its options: --database, else $NETPURSE_DATABASE_URL, else `sqliteFile`. */
export function storeConfig(values: Values, sqliteFile: string): StoreConfig {
  const env = process.env.NETPURSE_DATABASE_URL;
  const location = typeof values.database === "string" ? values.database : env !== undefined && env !== "" ? env : sqliteFile;
  return {
    location,
    ...(values["db-pool-size"] !== undefined ? { poolSize: Math.max(1, intOpt(values, "db-pool-size", 10)) } : {}),
    ...(values["db-statement-timeout-ms"] !== undefined ? { statementTimeoutMs: intOpt(values, "db-statement-timeout-ms", 0) } : {}),
  };
}
