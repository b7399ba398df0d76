// A PostgreSQL cluster of netpurse's own, made with this machine's initdb
// and run with pg_ctl (Debian's postgresql package): for `npm start` with
// several payment servers when no --database is given, and for the tests.
// initdb refuses to run as root: as root, the cluster is made and run as
// the postgres user (runuser), in a folder that user owns.

import { execFile, execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readdirSync } from "node:fs";
import { chown, mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { delimiter, join } from "node:path";
import { promisify } from "node:util";
import pg from "pg";

const run = promisify(execFile);

/** Why no cluster can be made or run here. */
export class PostgresMissing extends Error {}

/** initdb and pg_ctl's folder: on PATH, else Debian's /usr/lib/postgresql/VERSION/bin, the newest. */
export function postgresBin(): string | undefined {
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

interface Runner {
  uid: number;
  gid: number;
  argv: (cmd: string, args: string[]) => [string, string[]];
}

/** Who runs initdb and the server: this process's user, or postgres (with runuser) when this is root. */
async function runner(): Promise<Runner> {
  if (process.getuid?.() !== 0) return { uid: process.getuid?.() ?? -1, gid: process.getgid?.() ?? -1, argv: (c, a) => [c, a] };
  let uid: number, gid: number;
  try {
    uid = Number((await run("id", ["-u", "postgres"])).stdout.trim());
    gid = Number((await run("id", ["-g", "postgres"])).stdout.trim());
  } catch {
    throw new PostgresMissing("this runs as root, which initdb refuses, and there is no postgres user to run it as (Debian: apt-get install postgresql)");
  }
  try {
    await run("runuser", ["--help"]);
  } catch {
    throw new PostgresMissing("this runs as root, which initdb refuses, and runuser (util-linux) is missing to run it as postgres");
  }
  return { uid, gid, argv: (c, a) => ["runuser", ["-u", "postgres", "--", c, ...a]] };
}

export interface Cluster {
  /** URL of the cluster's maintenance database (postgres), with the password. */
  adminUrl: string;
  password: string;
  port: number;
  /** Stops the server (fast: sessions are ended), runs `whileDown`, starts it again. */
  restart(whileDown?: () => Promise<void>): Promise<void>;
  /** Stops the server; `immediate` without a checkpoint (a throwaway cluster). */
  stop(mode?: "fast" | "immediate"): Promise<void>;
  /** Stops it at once, synchronously (from a process's exit handler). */
  stopNow(): void;
}

/**
 * Starts the cluster in `dir` on 127.0.0.1:`port`, made first (superuser
 * netpurse, a random password kept in `passwordFile`, default DIR/password,
 * mode 0600, this process's user's) if `dir` holds none. `durable: false`
 * turns syncing off (tests: starts and restarts in a second or two; a power
 * cut loses the cluster).
 */
export async function startCluster(o: { dir: string; port: number; durable: boolean; maxConnections?: number; passwordFile?: string }): Promise<Cluster> {
  const bin = postgresBin();
  if (!bin) throw new PostgresMissing("no initdb and pg_ctl on PATH nor in /usr/lib/postgresql/*/bin (Debian: apt-get install postgresql)");
  const as = await runner();
  const data = join(o.dir, "data");
  const passwordFile = o.passwordFile ?? join(o.dir, "password");
  const asOwner = async (path: string) => {
    if (process.getuid?.() === 0) await chown(path, as.uid, as.gid);
  };
  await mkdir(o.dir, { recursive: true, mode: 0o700 });
  await asOwner(o.dir);
  const pgCtl = async (...args: string[]) => {
    const [cmd, argv] = as.argv(join(bin, "pg_ctl"), ["-D", data, ...args]);
    await run(cmd, argv, { timeout: 120_000 });
  };
  if (!existsSync(join(data, "PG_VERSION"))) {
    // Made aside and renamed when whole: an initdb cut short (a kill, a power cut) leaves no half-made cluster that later runs would take.
    const making = `${data}.new`;
    await rm(making, { recursive: true, force: true });
    const password = randomBytes(12).toString("hex");
    await writeFile(passwordFile, `${password}\n`, { mode: 0o600 });
    // initdb reads the password as the server's user, from a file of its own, removed once read.
    const forInitdb = join(o.dir, "initdb-password");
    await writeFile(forInitdb, `${password}\n`, { mode: 0o600 });
    await asOwner(forInitdb);
    const [cmd, argv] = as.argv(join(bin, "initdb"), [
      "-D",
      making,
      "-U",
      "netpurse",
      `--pwfile=${forInitdb}`,
      "-A",
      "scram-sha-256",
      "-E",
      "UTF8",
      "--locale=C",
      ...(o.durable ? [] : ["--no-sync"]),
    ]);
    try {
      await run(cmd, argv, { timeout: 120_000 });
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      throw new PostgresMissing(`initdb failed: ${(err.stderr || err.message).trim().split("\n").slice(-3).join(" / ")}`);
    } finally {
      await rm(forInitdb, { force: true });
    }
    await rm(data, { recursive: true, force: true });
    await rename(making, data);
  }
  const password = (await readFile(passwordFile, "utf8")).trim();
  const serverOptions = [
    `-p ${o.port} -k ${o.dir} -c listen_addresses=127.0.0.1 -c max_connections=${o.maxConnections ?? 100}`,
    ...(o.durable ? [] : ["-c fsync=off -c full_page_writes=off"]),
  ].join(" ");
  const start = async () => {
    try {
      await pgCtl("-l", join(o.dir, "server.log"), "-w", "-t", "60", "-o", serverOptions, "start");
    } catch (e) {
      const err = e as { stderr?: string; message: string };
      const log = await readFile(join(o.dir, "server.log"), "utf8").catch(() => "");
      const why = (log.trim().split("\n").slice(-3).join(" / ") || err.stderr || err.message).trim();
      throw new PostgresMissing(`the PostgreSQL server in ${o.dir} did not start: ${why}`);
    }
  };
  // A cluster left running (its launcher killed, say) is taken as it is.
  const running = await pgCtl("status").then(
    () => true,
    () => false,
  );
  if (!running) await start();
  return {
    adminUrl: `postgres://netpurse:${password}@127.0.0.1:${o.port}/postgres`,
    password,
    port: o.port,
    async restart(whileDown) {
      await pgCtl("-m", "fast", "-w", "stop");
      try {
        await whileDown?.();
      } finally {
        await start();
      }
    },
    stop: (mode = "fast") => pgCtl("-m", mode, "-w", "stop").catch(() => undefined),
    stopNow() {
      try {
        const [cmd, argv] = as.argv(join(bin, "pg_ctl"), ["-D", data, "-m", "immediate", "stop"]);
        execFileSync(cmd, argv, { stdio: "ignore", timeout: 10_000 });
      } catch {
        // the server is gone already
      }
    },
  };
}

/** Runs `task` on one connection to `url`. */
export async function withConnection<T>(url: string, task: (c: pg.Client) => Promise<T>): Promise<T> {
  const c = new pg.Client({ connectionString: url, connectionTimeoutMillis: 10_000 });
  await c.connect();
  try {
    return await task(c);
  } finally {
    await c.end();
  }
}

/** `url` naming another database (and connection parameters). */
export function withDatabase(u: string, database: string, params: Record<string, string> = {}): string {
  const url = new URL(u);
  url.pathname = `/${database}`;
  for (const [k, v] of Object.entries(params)) url.searchParams.set(k, v);
  return url.toString();
}
