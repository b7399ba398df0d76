// The store interface of lib/store/db.ts on PostgreSQL (node-postgres), for
// services that share their state past one machine (issue #15). The stores'
// SQL is written once, in the dialect SQLite and PostgreSQL share: `?`
// placeholders become $1..$n here, results come back shaped as
// better-sqlite3 gives them (integers as numbers, blobs as Buffers), and the
// same list of migrations is translated and applied once each.
//
// A commit is durable when PostgreSQL answers it, so nothing waits for a
// sync of ours. A lost connection (server down or restarting, connection
// cut) is StoreUnavailable, which gRPC servers answer with UNAVAILABLE: the
// call may succeed once the database is back or on another replica.

import pg from "pg";
import { BoundedMap } from "../bounded-map.js";
import type { Logger } from "../log.js";
import { openSqlite, StoreUnavailable, type Db, type HeldSession, type Migrations, type Queryable, type SqlValue, type TransactionOptions } from "./db.js";

export interface PostgresOptions {
  /** Connections the pool keeps at most (default 10). */
  poolSize?: number;
  /**
   * Connections held for advisory locks at most (Db.lockSession; default 20), opened
   * when first needed: each lock held takes one for as long as it is held.
   */
  lockPoolSize?: number;
  /** A statement running longer is cancelled by the server (SQLSTATE 57014); none by default. */
  statementTimeoutMs?: number;
  /** How long a new connection may take before the call fails as unavailable (default 5000 ms). */
  connectTimeoutMs?: number;
  /** Hears of the store opening (its URL without the password) and of connections lost. */
  log?: Logger;
  /**
   * The schema the store's tables live in (made if missing): every service
   * given one database URL keeps its tables apart in a schema named after it.
   * Without it, the URL's own search_path (by default `public`).
   */
  schema?: string;
}

/** Schema names a store may be given: plain lower-case identifiers, never quoted or spliced from input. */
const SCHEMA_NAME = /^[a-z_][a-z0-9_]{0,62}$/;

/** A stretch of SQL text: code, or a string literal, quoted identifier or comment (where `?` and type names are text). */
interface Segment {
  code: boolean;
  text: string;
}

const IDENT_CHAR = /[A-Za-z0-9_$]/;

/** Splits SQL into code and the stretches a `?` inside of means nothing: '…' (E'…' with backslashes), "…", -- and block comments, $tag$…$tag$. */
function segments(sql: string): Segment[] {
  const out: Segment[] = [];
  let start = 0;
  let i = 0;
  const quoted = (end: number) => {
    if (i > start) out.push({ code: true, text: sql.slice(start, i) });
    out.push({ code: false, text: sql.slice(i, end) });
    start = i = end;
  };
  /** The end of a quoted stretch opened at i, its quote doubled inside (and backslash escapes in an E'…' string). */
  const closing = (quote: string, backslashes: boolean) => {
    let j = i + 1;
    while (j < sql.length) {
      if (backslashes && sql[j] === "\\") j += 2;
      else if (sql[j] !== quote) j++;
      else if (sql[j + 1] === quote) j += 2;
      else return j + 1;
    }
    return sql.length;
  };
  while (i < sql.length) {
    const c = sql[i];
    const prev = sql[i - 1] ?? " ";
    if (c === "'") {
      const escaped = (prev === "E" || prev === "e") && !IDENT_CHAR.test(sql[i - 2] ?? " ");
      quoted(closing("'", escaped));
    } else if (c === '"') {
      quoted(closing('"', false));
    } else if (c === "-" && sql[i + 1] === "-") {
      const eol = sql.indexOf("\n", i);
      quoted(eol < 0 ? sql.length : eol);
    } else if (c === "/" && sql[i + 1] === "*") {
      // PostgreSQL nests block comments.
      let depth = 0;
      let j = i;
      while (j < sql.length) {
        if (sql.startsWith("/*", j)) {
          depth++;
          j += 2;
        } else if (sql.startsWith("*/", j)) {
          j += 2;
          if (--depth === 0) break;
        } else j++;
      }
      quoted(j);
    } else if (c === "$" && !IDENT_CHAR.test(prev)) {
      const tag = /^\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$/.exec(sql.slice(i))?.[0];
      if (tag) {
        const end = sql.indexOf(tag, i + tag.length);
        quoted(end < 0 ? sql.length : end + tag.length);
      } else i++;
    } else i++;
  }
  if (start < sql.length) out.push({ code: true, text: sql.slice(start) });
  return out;
}

/** Rewrites `?` placeholders to PostgreSQL's $1..$n, leaving any `?` in literals, quoted names and comments; `count` is how many. */
export function numberPlaceholders(sql: string): { text: string; count: number } {
  let count = 0;
  const text = segments(sql)
    .map((s) => (s.code ? s.text.replace(/\?/g, () => `$${++count}`) : s.text))
    .join("");
  return { text, count };
}

/**
 * One SQLite migration in PostgreSQL's types: an INTEGER PRIMARY KEY (with
 * or without AUTOINCREMENT, both filled in by SQLite when left out) becomes
 * an identity column, BLOB BYTEA, INTEGER BIGINT (SQLite's integers are 64
 * bits), REAL DOUBLE PRECISION. Literals and comments are left as they are.
 */
export function migrationForPostgres(sql: string): string {
  return segments(sql)
    .map((s) =>
      s.code
        ? s.text
            .replace(/\bINTEGER\s+PRIMARY\s+KEY(?:\s+AUTOINCREMENT)?\b/gi, "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
            .replace(/\bBLOB\b/gi, "BYTEA")
            .replace(/\bINTEGER\b/gi, "BIGINT")
            .replace(/\bREAL\b/gi, "DOUBLE PRECISION")
        : s.text,
    )
    .join("");
}

/** The URL with its password (in the user part or a `password` parameter) replaced by ***, for logs. */
export function redactUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password) u.password = "***";
    if (u.searchParams.has("password")) u.searchParams.set("password", "***");
    return u.toString();
  } catch {
    return "(a PostgreSQL URL that does not parse)";
  }
}

/** Failures of the network rather than of a statement; their messages name the server's address, so only the code is passed on. */
const NETWORK_ERRORS = new Set(["ECONNREFUSED", "ECONNRESET", "EPIPE", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN", "ECONNABORTED"]);

/**
 * Server shutting down (admin or crash) or still starting: the connection is gone, the next may work. Class 53,
 * insufficient resources (too many connections, out of memory, disk full), is the server unable to serve now, too.
 */
const SERVER_GONE = new Set(["57P01", "57P02", "57P03"]);

/** node-postgres's own words for a connection that broke or never came. */
const CLIENT_GONE =
  /Connection terminated|connection error and is not queryable|Client was closed and is not queryable|timeout exceeded when trying to connect/i;

/** Whether an error means the database could not be reached (not that a statement was refused). */
export function isConnectionFailure(e: unknown): boolean {
  if (e instanceof AggregateError && e.errors.some(isConnectionFailure)) return true;
  if (!(e instanceof Error)) return false;
  const code = (e as { code?: unknown }).code;
  if (typeof code === "string" && (code.startsWith("08") || code.startsWith("53") || SERVER_GONE.has(code) || NETWORK_ERRORS.has(code))) return true;
  return CLIENT_GONE.test(e.message);
}

/** What a caller may be told of a lost connection: never the server's address, which a network error's message holds. */
function unavailable(e: Error): StoreUnavailable {
  const code = (e as { code?: unknown }).code;
  const what = e instanceof pg.DatabaseError ? `${e.code} ${e.message}` : typeof code === "string" && NETWORK_ERRORS.has(code) ? code : e.message;
  return new StoreUnavailable(`the PostgreSQL database cannot be reached (${what}); the call may be retried`, { cause: e });
}

/** Runs a call to the server; a lost connection comes out as StoreUnavailable, every other error as it was. */
async function reaching<T>(call: () => Promise<T>): Promise<T> {
  try {
    return await call();
  } catch (e) {
    throw isConnectionFailure(e) ? unavailable(e as Error) : e;
  }
}

const BUILTINS = pg.types.builtins;

/**
 * Results as better-sqlite3 shapes them: a BIGINT (COUNT, SUM of integers,
 * every INTEGER column here) or an integral NUMERIC (SUM of BIGINT) is a
 * number, or a bigint past 2^53 rather than a wrong number; other NUMERICs
 * (AVG) are numbers; booleans 1 and 0. BYTEA is a Buffer already. Set on
 * this store's pool only, never on pg's global parsers.
 */
const PARSERS = new Map<number, (text: string) => unknown>([
  [BUILTINS.INT8, integer],
  [BUILTINS.NUMERIC, (t) => (/^-?\d+$/.test(t) ? integer(t) : Number(t))],
  [BUILTINS.BOOL, (t) => (t === "t" ? 1 : 0)],
]);

function integer(text: string): number | bigint {
  const n = Number(text);
  return Number.isSafeInteger(n) ? n : BigInt(text);
}

function parser(oid: number, format?: "text" | "binary"): (value: string) => unknown {
  if (format === "binary") return pg.types.getTypeParser(oid, "binary") as (value: string) => unknown;
  return PARSERS.get(oid) ?? (pg.types.getTypeParser(oid, "text") as (value: string) => unknown);
}

const TYPES: pg.CustomTypesConfig = { getTypeParser: parser };

/** The statements a result's row count is a count of changes for. */
const WRITES = new Set(["INSERT", "UPDATE", "DELETE", "MERGE"]);

/** Statement texts in PostgreSQL's numbering, by their `?` text: the stores send a few hundred distinct ones at most. */
const numbered = new BoundedMap<string, { text: string; count: number }>(2_000);

function toPostgres(sql: string, params: SqlValue[]): string {
  let n = numbered.get(sql);
  if (!n) {
    n = numberPlaceholders(sql);
    numbered.set(sql, n);
  }
  // As better-sqlite3 refuses: a wrong count is the caller's mistake, never sent (the server's answer, 08P01, would read as a lost connection).
  if (n.count !== params.length) throw new RangeError(`the statement has ${n.count} placeholders and was given ${params.length} values: ${sql}`);
  return n.text;
}

type Client = pg.Pool | pg.PoolClient;

const lost = (e: unknown) => e instanceof StoreUnavailable || isConnectionFailure(e);

/**
 * A connection of the pool's own for a caller (a transaction, the
 * migrations). The pool stops listening to a connection it hands out, and
 * an error event nobody hears (the server ending the session between two
 * statements) would end the process: the connection is heard here until it
 * is released, and one that broke is dropped, never handed to the next
 * caller.
 */
async function checkout(pool: pg.Pool, onLost: (e: Error) => void): Promise<{ client: pg.PoolClient; release: (broken: boolean) => void }> {
  const client = await reaching(() => pool.connect());
  let failed = false;
  const heard = (e: Error) => {
    failed = true; // and the next statement on it fails, saying why
    onLost(e);
  };
  client.on("error", heard);
  return {
    client,
    release: (broken) => {
      // A broken connection keeps the listener: it may still report, and it is never used again.
      if (!broken && !failed) client.off("error", heard);
      client.release(broken || failed);
    },
  };
}

class PostgresQueryable implements Queryable {
  /** `failed` hears of every statement that fails (a transaction keeps the first). */
  constructor(
    private readonly on: Client,
    private readonly failed: (e: unknown) => void = () => undefined,
  ) {}

  private async query(sql: string, params: SqlValue[]): Promise<pg.QueryResult> {
    try {
      const text = toPostgres(sql, params);
      return await reaching(() => this.on.query(text, params));
    } catch (e) {
      this.failed(e);
      throw e;
    }
  }

  async run(sql: string, params: SqlValue[] = []) {
    const r = await this.query(sql, params);
    return { changes: WRITES.has(r.command) ? (r.rowCount ?? 0) : 0 };
  }

  async get<T>(sql: string, params: SqlValue[] = []) {
    return (await this.query(sql, params)).rows[0] as T | undefined;
  }

  async all<T>(sql: string, params: SqlValue[] = []) {
    return (await this.query(sql, params)).rows as T[];
  }
}

/** How many times a transaction PostgreSQL aborted as not serializable is run in all. */
const SERIALIZATION_ATTEMPTS = 30;

/** Whether PostgreSQL aborted a transaction for another's sake (serialization failure, deadlock): running it again may succeed. */
function isSerializationFailure(e: unknown): boolean {
  for (let x = e; x instanceof Error; x = (x as { cause?: unknown }).cause) {
    const code = (x as { code?: unknown }).code;
    if (code === "40001" || code === "40P01") return true;
  }
  return false;
}

/** Every connection a pool has open now, kept up to date (so that abandon() can cut them all). */
function tracked(pool: pg.Pool, open: Set<pg.Client>): pg.Pool {
  pool.on("connect", (c) => open.add(c));
  pool.on("remove", (c) => open.delete(c));
  return pool;
}

class PostgresDb extends PostgresQueryable implements Db {
  /** The pool of lockSession(), opened at its first call. */
  private lockPool: pg.Pool | undefined;
  private abandoned = false;
  private ended: Promise<void> | undefined;

  constructor(
    private readonly pool: pg.Pool,
    private readonly onLost: (e: Error) => void,
    private readonly newLockPool: () => pg.Pool,
    /** Every connection open now, in both pools. */
    private readonly open: Set<pg.Client>,
  ) {
    super(pool);
  }

  private usable(): void {
    if (this.abandoned) throw new StoreUnavailable("this store's connections were dropped (abandon): it answers nothing more");
  }

  override async run(sql: string, params: SqlValue[] = []) {
    this.usable();
    return super.run(sql, params);
  }

  override async get<T>(sql: string, params: SqlValue[] = []) {
    this.usable();
    return super.get<T>(sql, params);
  }

  override async all<T>(sql: string, params: SqlValue[] = []) {
    this.usable();
    return super.all<T>(sql, params);
  }

  /**
   * A connection of the lock pool, held until released: session-level
   * advisory locks taken on it last until it is released or dies. A
   * connection that breaks while held is marked `lost` (its locks are gone)
   * and dropped when released.
   */
  async lockSession(): Promise<HeldSession> {
    this.usable();
    this.lockPool ??= this.newLockPool();
    const { client, release } = await checkout(this.lockPool, this.onLost);
    let lost = false;
    const heard = () => (lost = true);
    client.on("error", heard);
    const q = new PostgresQueryable(client, (e) => {
      if (isConnectionFailure(e) || e instanceof StoreUnavailable) lost = true;
    });
    const usable = () => this.usable();
    let released = false;
    return {
      async run(sql, params) {
        usable();
        return q.run(sql, params);
      },
      async get(sql, params) {
        usable();
        return q.get(sql, params);
      },
      async all(sql, params) {
        usable();
        return q.all(sql, params);
      },
      get lost() {
        return lost;
      },
      release(broken = false) {
        if (released) return;
        released = true;
        if (!lost) client.off("error", heard);
        release(broken || lost);
      },
    };
  }

  /**
   * Cuts every connection of both pools at once (their sockets destroyed:
   * no last statement, no COMMIT in flight finished by us), so PostgreSQL
   * rolls back what was open and releases their advisory locks, as when a
   * process dies; every later call fails with StoreUnavailable.
   */
  async abandon(): Promise<void> {
    this.abandoned = true;
    for (const c of this.open) c.connection.stream.destroy();
    const pools = this.lockPool ? [this.pool, this.lockPool] : [this.pool];
    this.ended ??= Promise.all(pools.map((p) => p.end().catch(() => undefined))).then(() => undefined);
    // Not awaited: a pool ends once its holders give their (broken) connections back, whenever that is.
    this.ended.catch(() => undefined);
  }

  /**
   * Runs fn SERIALIZABLE, as if alone, the guarantee SQLite's single writer
   * gives: a transaction that reads a row and writes on what it read (a
   * balance, a count against a cap, a state) cannot interleave with another
   * doing the same, in this process or in a replica's. PostgreSQL instead
   * aborts one of them (40001, or 40P01 for a deadlock), and fn is run
   * again from the start on a fresh snapshot, up to 30 times. So fn
   * must do nothing but its statements and plain computation. With
   * `o.locks`, READ COMMITTED behind those locks instead, once
   * (TransactionOptions).
   */
  async transaction<T>(fn: (tx: Queryable) => Promise<T>, o: TransactionOptions = {}): Promise<T> {
    if (o.locks) {
      this.usable();
      return this.once(fn, o.locks);
    }
    for (let attempt = 1; ; attempt++) {
      this.usable();
      try {
        return await this.once(fn);
      } catch (e) {
        if (!isSerializationFailure(e)) throw e;
        // Still colliding after every attempt: the database is too busy for it now, which a caller may retry (UNAVAILABLE), not a fault.
        if (attempt >= SERIALIZATION_ATTEMPTS)
          throw new StoreUnavailable(`the transaction collided with others ${attempt} times (PostgreSQL serialization failures); the call may be retried`, {
            cause: e,
          });
        // A random back-off growing to 100 ms, so that the same transactions do not collide again at once.
        await new Promise((resolve) => setTimeout(resolve, Math.random() * Math.min(100, 2 ** attempt)));
      }
    }
  }

  /** One attempt: SERIALIZABLE, or, with `locks`, READ COMMITTED behind those advisory locks (sorted, so two transactions never wait on each other's). */
  private async once<T>(fn: (tx: Queryable) => Promise<T>, locks?: readonly string[]): Promise<T> {
    const { client, release } = await checkout(this.pool, this.onLost);
    let broken = false;
    try {
      await reaching(() => client.query(locks ? "BEGIN ISOLATION LEVEL READ COMMITTED" : "BEGIN ISOLATION LEVEL SERIALIZABLE"));
      // Their own key space ("tx:"), apart from the session locks of lib/store/locks.ts, which the caller may hold on another connection.
      for (const key of [...new Set(locks ?? [])].sort())
        await reaching(() => client.query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", [`tx:${key}`]));
      let failure: unknown;
      let value: T;
      try {
        value = await fn(new PostgresQueryable(client, (e) => (failure ??= e)));
      } catch (e) {
        if (!lost(e)) await client.query("ROLLBACK").catch(() => (broken = true));
        throw e;
      }
      const commit = await reaching(() => client.query("COMMIT"));
      // After a failed statement PostgreSQL answers COMMIT with ROLLBACK: fn went on past an error, which SQLite would have let it do.
      if (commit.command === "ROLLBACK" && isSerializationFailure(failure)) throw failure;
      if (commit.command === "ROLLBACK")
        throw new Error("the transaction was rolled back: one of its statements failed, after which PostgreSQL commits nothing", { cause: failure });
      return value;
    } catch (e) {
      broken ||= lost(e);
      throw e;
    } finally {
      release(broken);
    }
  }

  async transactionBeforeSync<T>(fn: (tx: Queryable) => Promise<T>): Promise<{ value: T; synced: Promise<void> }> {
    return { value: await this.transaction(fn), synced: Promise.resolve() };
  }

  async close(): Promise<void> {
    const pools = this.lockPool ? [this.pool, this.lockPool] : [this.pool];
    this.ended ??= Promise.all(pools.map((p) => p.end())).then(() => undefined);
    await this.ended;
  }
}

/** Which advisory lock keeps two stores opening one database from applying a migration twice (any number of ours, fixed). */
const MIGRATION_LOCK = 0x6e70_6d67; // "npmg"

/**
 * Applies the migrations this database has not had yet, in order, each in a
 * transaction of its own with its row in netpurse_migrations, under an
 * advisory lock: a replica starting beside another waits, then finds them
 * applied. Returns how many it applied.
 */
async function migrate(pool: pg.Pool, migrations: Migrations, onLost: (e: Error) => void, schema: string | undefined): Promise<number> {
  const { client, release } = await checkout(pool, onLost);
  let broken = false;
  try {
    await reaching(() => client.query("SELECT pg_advisory_lock($1)", [MIGRATION_LOCK]));
    try {
      // Under the lock: two services made at once would race on CREATE SCHEMA IF NOT EXISTS.
      if (schema) await reaching(() => client.query(`CREATE SCHEMA IF NOT EXISTS ${schema}`));
      await reaching(() =>
        client.query("CREATE TABLE IF NOT EXISTS netpurse_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"),
      );
      const done = new Set((await reaching(() => client.query<{ version: number }>("SELECT version FROM netpurse_migrations"))).rows.map((r) => r.version));
      let applied = 0;
      for (const [i, sql] of migrations.entries()) {
        if (done.has(i + 1)) continue;
        await reaching(() => client.query("BEGIN"));
        try {
          await reaching(() => client.query(migrationForPostgres(sql)));
          await reaching(() => client.query("INSERT INTO netpurse_migrations (version) VALUES ($1)", [i + 1]));
          await reaching(() => client.query("COMMIT"));
        } catch (e) {
          if (!(e instanceof StoreUnavailable)) await reaching(() => client.query("ROLLBACK"));
          if (e instanceof Error && !(e instanceof StoreUnavailable)) e.message = `migration ${i + 1} failed on PostgreSQL: ${e.message}`;
          throw e;
        }
        applied++;
      }
      return applied;
    } finally {
      // Unlocked also by the session's end, should the connection be gone.
      await client.query("SELECT pg_advisory_unlock($1)", [MIGRATION_LOCK]).catch(() => undefined);
    }
  } catch (e) {
    broken = lost(e);
    throw e;
  } finally {
    release(broken);
  }
}

/**
 * The server probes each of our connections after 10 s of silence and drops one
 * that three probes 5 s apart do not answer: a replica that lost power or was cut
 * off releases its advisory locks (the leases of its purchases) within about 25 s,
 * not the two hours of the operating system's default.
 */
const SERVER_KEEPALIVE = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 -c tcp_keepalives_count=3";

/**
 * The server settings of every connection: the URL's own `options`, the
 * store's schema, and index scans over sequential ones. A sequential scan
 * takes a predicate lock on the whole table under SERIALIZABLE, so two
 * transactions reading one small table by key (a purse's rows, an order)
 * would abort each other although they touched different rows; PostgreSQL's
 * documentation suggests steering the planner to index scans for that.
 */
function connectionOptions(url: string, schema: string | undefined): string {
  let given = "";
  try {
    given = new URL(url).searchParams.get("options") ?? "";
  } catch {
    // not a URL the WHATWG parser takes: pg reads it alone
  }
  return [given, ...(schema ? [`-c search_path=${schema}`] : []), "-c enable_seqscan=off", SERVER_KEEPALIVE].filter(Boolean).join(" ");
}

/**
 * Opens a pool on the PostgreSQL database at `url` (postgres://user:password@host:port/database)
 * and applies the migrations. The database is the store's own: two stores' tables and
 * migrations would collide in one (a schema of its own per store, through the URL's
 * `options=-c search_path=…`, does as well).
 */
export async function openPostgres(url: string, migrations: Migrations, o: PostgresOptions = {}): Promise<Db> {
  if (o.schema !== undefined && !SCHEMA_NAME.test(o.schema)) throw new Error(`schema "${o.schema}" is not a plain lower-case identifier`);
  const connection: pg.PoolConfig = {
    connectionString: url,
    connectionTimeoutMillis: o.connectTimeoutMs ?? 5_000,
    keepAlive: true,
    application_name: "netpurse",
    types: TYPES,
    options: connectionOptions(url, o.schema),
  };
  const open = new Set<pg.Client>();
  const pool = tracked(
    new pg.Pool({
      ...connection,
      max: o.poolSize ?? 10,
      ...(o.statementTimeoutMs !== undefined ? { statement_timeout: o.statementTimeoutMs } : {}),
    }),
    open,
  );
  const where = redactUrl(url);
  // An idle connection the server drops (a restart) is reported here; unheard, it would end the process. The next call takes a new one.
  const onLost = (e: Error) => o.log?.warn("a PostgreSQL connection was lost", { database: where, error: unavailable(e).message });
  pool.on("error", onLost);
  // No statement timeout on the lock pool: waiting for a lock another holds is one statement, as long as that holder's step.
  const newLockPool = () => {
    const locks = tracked(new pg.Pool({ ...connection, max: o.lockPoolSize ?? 20 }), open);
    locks.on("error", onLost);
    return locks;
  };
  try {
    const applied = await migrate(pool, migrations, onLost, o.schema);
    o.log?.info("PostgreSQL store open", {
      database: where,
      schema: o.schema ?? "(the URL's)",
      pool: o.poolSize ?? 10,
      migrations: migrations.length,
      applied,
    });
  } catch (e) {
    await pool.end().catch(() => undefined);
    throw e;
  }
  return new PostgresDb(pool, onLost, newLockPool, open);
}

/** Where a service keeps its store: a SQLite file, or a PostgreSQL URL with its pool's settings (from --database and its companions). */
export interface StoreConfig {
  /** A SQLite file's path, or a postgres:// URL. */
  location: string;
  poolSize?: number;
  statementTimeoutMs?: number;
}

/** Whether a store location is a PostgreSQL URL rather than a SQLite file. */
export const isPostgresUrl = (location: string) => /^postgres(ql)?:\/\//i.test(location);

/** The one way a service opens its store: a postgres:// or postgresql:// URL opens PostgreSQL, anything else is a SQLite file. */
export async function openStore(location: string, migrations: Migrations, o: PostgresOptions = {}): Promise<Db> {
  return isPostgresUrl(location) ? openPostgres(location, migrations, o) : openSqlite(location, migrations);
}
