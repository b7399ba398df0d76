// A real PostgreSQL for the tests: the server NETPURSE_TEST_DATABASE_URL
// names when it is set (a database there is made and dropped), else a
// throwaway cluster made with this machine's initdb and pg_ctl in a folder
// of its own, on a free port, with a password, run as the postgres user when
// the tests run as root (initdb refuses root). Each caller (a test file) gets
// a database of its own, with a random name. When neither can be had, the
// suite is skipped LOUDLY: the reason on stderr and the tests pending, never
// passed; with NETPURSE_REQUIRE_POSTGRES=1 (a CI that installs PostgreSQL)
// it fails instead.

import { randomBytes } from "node:crypto";
import { rmSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { freePort } from "../../lib/socket.js";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { PostgresMissing, startCluster, withConnection, withDatabase, type Cluster } from "../../lib/store/postgres-cluster.js";

export { PostgresMissing };

export interface TestPostgres {
  /** postgres://user:password@host:port/db: a database of this caller's own. */
  url: string;
  /** The password in `url` (to check that no log line holds it). */
  password: string;
  /** Whether restart() can stop the server: only a throwaway cluster's can be. */
  canRestart: boolean;
  /** Stops the server (fast shutdown: sessions are ended), runs `whileDown`, starts it again. */
  restart(whileDown?: () => Promise<void>): Promise<void>;
  /** A new empty schema in the database: a URL whose connections use it (search_path), for a store that must start empty. */
  schema(): Promise<string>;
  /** Drops the database (and stops the throwaway cluster once no caller uses it). */
  stop(): Promise<void>;
}

interface Server {
  /** URL of the server's maintenance database, with the password. */
  adminUrl: string;
  password: string;
  canRestart: boolean;
  restart(whileDown?: () => Promise<void>): Promise<void>;
  stop(): Promise<void>;
}

/** A new cluster in a temporary folder, started; PostgresMissing says why when it cannot be. */
async function throwawayCluster(): Promise<Server> {
  const dir = await mkdtemp(join(tmpdir(), "netpurse-pg-"));
  let cluster: Cluster;
  try {
    // Durability is not under test here: no syncs, so the cluster starts and restarts in a second or two.
    cluster = await startCluster({ dir, port: await freePort(), durable: false, maxConnections: 300 });
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    if (e instanceof PostgresMissing) throw e;
    throw new PostgresMissing(`a throwaway cluster did not start: ${(e as Error).message}`);
  }
  // mocha --exit ends the process without after() hooks when a test hangs: the server and its folder must not outlive it.
  const onExit = () => {
    cluster.stopNow();
    rmSync(dir, { recursive: true, force: true });
  };
  /** A restart under way: stop() waits for it, lest the server come back after it. */
  let restarting: Promise<void> | undefined;
  process.on("exit", onExit);
  return {
    adminUrl: cluster.adminUrl,
    password: cluster.password,
    canRestart: true,
    async restart(whileDown) {
      const r = cluster.restart(whileDown);
      restarting = r.catch(() => undefined);
      await r;
    },
    async stop() {
      await restarting;
      process.off("exit", onExit);
      await cluster.stop("immediate");
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** The server of NETPURSE_TEST_DATABASE_URL: its user must be allowed to create databases. */
function givenServer(url: string): Server {
  return {
    adminUrl: url,
    password: decodeURIComponent(new URL(url).password),
    canRestart: false,
    restart: () => Promise.reject(new Error("the server of NETPURSE_TEST_DATABASE_URL is not the tests' to restart")),
    stop: async () => undefined,
  };
}

/** The server callers share in this process, and how many use it. */
let shared: { server: Promise<Server>; users: number } | undefined;

/** Starts (or joins) the server and makes a database of the caller's own; PostgresMissing says why when it cannot. */
export async function startPostgres(): Promise<TestPostgres> {
  const given = process.env.NETPURSE_TEST_DATABASE_URL;
  shared ??= { server: given ? Promise.resolve(givenServer(given)) : throwawayCluster(), users: 0 };
  const mine = shared;
  mine.users++;
  const leave = async () => {
    if (--mine.users > 0) return;
    if (shared === mine) shared = undefined;
    await (await mine.server).stop();
  };
  let server: Server;
  try {
    server = await mine.server;
  } catch (e) {
    if (shared === mine) shared = undefined;
    throw e;
  }
  const database = `netpurse_test_${randomBytes(6).toString("hex")}`;
  try {
    await withConnection(server.adminUrl, (c) => c.query(`CREATE DATABASE ${database}`));
  } catch (e) {
    await leave();
    if (given) throw new PostgresMissing(`NETPURSE_TEST_DATABASE_URL is set, but no database can be made there: ${(e as Error).message}`);
    throw e;
  }
  const url = withDatabase(server.adminUrl, database);
  return {
    url,
    password: server.password,
    canRestart: server.canRestart,
    restart: (whileDown) => server.restart(whileDown),
    async schema() {
      const name = `s_${randomBytes(6).toString("hex")}`;
      await withConnection(url, (c) => c.query(`CREATE SCHEMA ${name}`));
      return withDatabase(url, database, { options: `-c search_path=${name}` });
    },
    async stop() {
      try {
        await withConnection(server.adminUrl, (c) => c.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`));
      } finally {
        await leave();
      }
    },
  };
}

/** Why PostgreSQL could not be had, once found: the suites after the first skip at once. */
let missing: string | undefined;
const warned = new Set<string>();

/**
 * In a hook: the suite's PostgreSQL, or the suite (in before) or test (in
 * beforeEach) skipped loudly, the reason on stderr once per suite; failed
 * instead when NETPURSE_REQUIRE_POSTGRES=1.
 */
export async function postgresOrSkip(ctx: Mocha.Context): Promise<TestPostgres> {
  if (missing === undefined) {
    try {
      return await startPostgres();
    } catch (e) {
      if (!(e instanceof PostgresMissing)) throw e;
      missing = e.message;
    }
  }
  if (process.env.NETPURSE_REQUIRE_POSTGRES === "1") throw new Error(`NETPURSE_REQUIRE_POSTGRES=1 but PostgreSQL cannot be had: ${missing}`);
  const title = ctx.test?.parent?.fullTitle() ?? "PostgreSQL tests";
  if (!warned.has(title)) console.warn(`\n  *** SKIPPED "${title}": PostgreSQL cannot be had on this machine: ${missing}\n`);
  warned.add(title);
  ctx.skip();
}
