// A real PostgreSQL for the tests: the server NETPURSE_TEST_DATABASE_URL
// names when it is set (a database there is made and dropped), else a
// throwaway cluster made with this machine's initdb and pg_ctl in a folder
// of its own, on a free port, with a password, run as the postgres user when
// the tests run as root (initdb refuses root). Each caller (a test file) gets
// a database of its own, with a random name. When neither can be had, the
// suite is skipped LOUDLY: the reason on stderr and the tests pending, never
// passed; with NETPURSE_REQUIRE_POSTGRES=1 (a CI that installs PostgreSQL)
// it fails instead.

import { execFile, execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync, rmSync } from "node:fs";
import { chown, mkdtemp, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import { promisify } from "node:util";
import pg from "pg";

const run = promisify(execFile);

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

/** Why PostgreSQL cannot be had here. */
export class PostgresMissing extends Error {}

/** initdb and pg_ctl's folder: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin, the newest. */
function postgresBin(): string | undefined {
  const has = (dir: string) => existsSync(join(dir, "initdb")) && existsSync(join(dir, "pg_ctl"));
  const onPath = (process.env.PATH ?? "").split(delimiter).find((d) => d && has(d));
  if (onPath) return onPath;
  const debian = "/usr/lib/postgresql";
  if (!existsSync(debian)) return undefined;
  const versions = readdirSync(debian)
    .filter((v) => has(join(debian, v, "bin")))
    .sort((a, b) => Number(b) - Number(a));
  return versions[0] && join(debian, versions[0], "bin");
}

/** A port nothing listens on now. */
async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** Who runs initdb and the server: this process's user, or postgres (with runuser) when this is root. */
async function runner(): Promise<{ uid: number; gid: number; argv: (cmd: string, args: string[]) => [string, string[]] } | string> {
  if (process.getuid?.() !== 0) return { uid: process.getuid?.() ?? -1, gid: process.getgid?.() ?? -1, argv: (c, a) => [c, a] };
  let uid: number, gid: number;
  try {
    uid = Number((await run("id", ["-u", "postgres"])).stdout.trim());
    gid = Number((await run("id", ["-g", "postgres"])).stdout.trim());
  } catch {
    return "the tests run as root, which initdb refuses, and there is no postgres user to run it as (Debian: apt-get install postgresql)";
  }
  try {
    await run("runuser", ["--help"]);
  } catch {
    return "the tests run as root, which initdb refuses, and runuser (util-linux) is missing to run it as postgres";
  }
  return { uid, gid, argv: (c, a) => ["runuser", ["-u", "postgres", "--", c, ...a]] };
}

interface Server {
  /** URL of the server's maintenance database, with the password. */
  adminUrl: string;
  password: string;
  canRestart: boolean;
  restart(whileDown?: () => Promise<void>): Promise<void>;
  stop(): Promise<void>;
}

/** A new cluster in a temporary folder, started; the reason it cannot be when it cannot. */
async function throwawayCluster(): Promise<Server> {
  const bin = postgresBin();
  if (!bin) throw new PostgresMissing("no initdb and pg_ctl on PATH nor in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)");
  const as = await runner();
  if (typeof as === "string") throw new PostgresMissing(as);
  const dir = await mkdtemp(join(tmpdir(), "netpurse-pg-"));
  const data = join(dir, "data");
  const password = randomBytes(12).toString("hex");
  const pwfile = join(dir, "pw");
  await writeFile(pwfile, `${password}\n`, { mode: 0o600 });
  if (process.getuid?.() === 0) {
    await chown(dir, as.uid, as.gid);
    await chown(pwfile, as.uid, as.gid);
  }
  const port = await freePort();
  const pgCtl = async (...args: string[]) => {
    const [cmd, argv] = as.argv(join(bin, "pg_ctl"), ["-D", data, ...args]);
    await run(cmd, argv, { timeout: 60_000 });
  };
  // Durability is not under test here: no syncs, so the cluster starts and restarts in a second or two.
  const serverOptions = `-p ${port} -k ${dir} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=100`;
  const start = () => pgCtl("-l", join(dir, "server.log"), "-w", "-t", "60", "-o", serverOptions, "start");
  try {
    const [cmd, argv] = as.argv(join(bin, "initdb"), [
      "-D",
      data,
      "-U",
      "netpurse",
      `--pwfile=${pwfile}`,
      "-A",
      "scram-sha-256",
      "-E",
      "UTF8",
      "--locale=C",
      "--no-sync",
    ]);
    await run(cmd, argv, { timeout: 120_000 });
    await start();
  } catch (e) {
    await rm(dir, { recursive: true, force: true });
    const err = e as { stderr?: string; message: string };
    throw new PostgresMissing(`a throwaway cluster did not start: ${(err.stderr || err.message).trim().split("\n").slice(-3).join(" / ")}`);
  }
  // mocha --exit ends the process without after() hooks when a test hangs: the server and its folder must not outlive it.
  const onExit = () => {
    try {
      const [cmd, argv] = as.argv(join(bin, "pg_ctl"), ["-D", data, "-m", "immediate", "stop"]);
      execFileSync(cmd, argv, { stdio: "ignore", timeout: 10_000 });
    } catch {
      // the server is gone already
    }
    rmSync(dir, { recursive: true, force: true });
  };
  /** A restart under way: stop() waits for it, lest the server come back after it. */
  let restarting: Promise<void> | undefined;
  process.on("exit", onExit);
  return {
    adminUrl: `postgres://netpurse:${password}@127.0.0.1:${port}/postgres`,
    password,
    canRestart: true,
    async restart(whileDown) {
      const r = (async () => {
        await pgCtl("-m", "fast", "-w", "stop");
        try {
          await whileDown?.();
        } finally {
          await start();
        }
      })();
      restarting = r.catch(() => undefined);
      await r;
    },
    async stop() {
      await restarting;
      process.off("exit", onExit);
      await pgCtl("-m", "immediate", "stop").catch(() => undefined);
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

function withDatabase(u: string, database: string, params: Record<string, string> = {}): string {
  const url = new URL(u);
  url.pathname = `/${database}`;
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  return url.toString();
}

async function admin<T>(url: string, task: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 });
  await c.connect();
  try {
    return await task(c);
  } finally {
    await c.end();
  }
}

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
    await admin(server.adminUrl, (c) => c.query(`CREATE DATABASE ${database}`));
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
      await admin(url, (c) => c.query(`CREATE SCHEMA ${name}`));
      return withDatabase(url, database, { options: `-c search_path=${name}` });
    },
    async stop() {
      try {
        await admin(server.adminUrl, (c) => c.query(`DROP DATABASE IF EXISTS ${database} WITH (FORCE)`));
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
