// The one storage interface every netpurse service writes through. SQL is
// written with `?` placeholders in the subset SQLite and PostgreSQL share;
// the SQLite implementation (better-sqlite3, WAL) is the embedded default.
//
// Group commit: SQLite commits without syncing (the statements stay cheap on
// the event loop), and one fdatasync of the write-ahead log on libuv's thread
// pool makes every commit before it durable at once. No call resolves, read
// or write, before everything it wrote or could have seen is on disk, so
// nobody is ever answered from a step a power cut could undo; concurrent
// callers share one sync instead of queueing behind one each.

import Database from "better-sqlite3";
import { chmodSync, closeSync, existsSync, fsyncSync, mkdirSync, openSync } from "node:fs";
import { open, type FileHandle } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { Worker } from "node:worker_threads";
import { Mutex } from "../mutex.js";
import { countFsync } from "../stats.js";

export type SqlValue = string | number | bigint | Buffer | null;

/**
 * The store can answer nothing more (its log could not be synced): a call
 * may succeed elsewhere or after the service restarts, so callers see
 * UNAVAILABLE, not an internal error.
 */
export class StoreUnavailable extends Error {}

export interface Queryable {
  run(sql: string, params?: SqlValue[]): Promise<{ changes: number }>;
  get<T>(sql: string, params?: SqlValue[]): Promise<T | undefined>;
  all<T>(sql: string, params?: SqlValue[]): Promise<T[]>;
}

/**
 * One connection held for one caller until it gives it back (PostgreSQL):
 * what the session holds, advisory locks above all, ends with the
 * connection, whoever ends it (the caller, the process's death, the network).
 */
export interface HeldSession extends Queryable {
  /** Whether the connection broke since it was taken: whatever the session held is gone, and may be someone else's now. */
  readonly lost: boolean;
  /** Gives the connection back; a broken one (or one given back `broken`) is dropped, which ends its session. */
  release(broken?: boolean): void;
}

/**
 * How a transaction is kept apart from others. By default it runs as if
 * alone (SQLite's one writer; SERIALIZABLE on PostgreSQL, run again when
 * PostgreSQL aborts it). With `locks`, the caller says that what it reads
 * and writes is kept apart by these advisory locks, taken for the
 * transaction in a fixed order, and by its own conditional writes
 * (UPDATE … WHERE state = ?): PostgreSQL then runs it READ COMMITTED, once,
 * with none of SERIALIZABLE's aborts for rows it never touched (its
 * predicate locks cover whole index pages, so transactions on different
 * purses of a small table abort each other). An empty list: the caller
 * holds whatever lock it needs already.
 */
export interface TransactionOptions {
  locks?: readonly string[];
}

export interface Db extends Queryable {
  /** Runs fn in one transaction: all of its writes land, or none. Resolves once they are on disk. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>, o?: TransactionOptions): Promise<T>;
  /**
   * Runs fn in one transaction and resolves as soon as it is committed,
   * before it is on disk; `synced` resolves once it is. For a caller that
   * has other work to do meanwhile (a PSAM's own write) and reveals nothing
   * that rests on the transaction before `synced` resolves.
   */
  transactionBeforeSync<T>(fn: (tx: Queryable) => Promise<T>): Promise<{ value: T; synced: Promise<void> }>;
  close(): Promise<void>;
  /**
   * PostgreSQL only: a connection of a small pool of its own (never one the
   * transactions need), held for session-level advisory locks (lib/store/locks.ts).
   */
  lockSession?(): Promise<HeldSession>;
  /**
   * Test only, PostgreSQL only: drops every connection at once, with no last
   * statement, and answers nothing more (StoreUnavailable), as the process's
   * death would; its advisory locks are released by the server.
   */
  abandon?(): Promise<void>;
}

/** Schema changes, applied in order once each. */
export type Migrations = readonly string[];

class SqliteQueryable implements Queryable {
  /** Prepared statements by SQL text: preparing is a large share of a short statement's cost. */
  private readonly statements = new Map<string, Database.Statement>();

  constructor(protected readonly db: Database.Database) {}

  private statement(sql: string): Database.Statement {
    let s = this.statements.get(sql);
    if (!s) {
      s = this.db.prepare(sql);
      this.statements.set(sql, s);
    }
    return s;
  }

  async run(sql: string, params: SqlValue[] = []) {
    const r = this.statement(sql).run(...params);
    return { changes: r.changes };
  }

  async get<T>(sql: string, params: SqlValue[] = []) {
    return this.statement(sql).get(...params) as T | undefined;
  }

  async all<T>(sql: string, params: SqlValue[] = []) {
    return this.statement(sql).all(...params) as T[];
  }

  /** Whether a statement writes (an UPDATE … RETURNING read with get, say). */
  writes(sql: string): boolean {
    return !this.statement(sql).readonly;
  }
}

/** Commits between two checkpoints of the write-ahead log into the database file. */
const CHECKPOINT_EVERY_COMMITS = 1_000;

/**
 * The checkpointer: a connection of its own in a worker thread, with SQLite's
 * own syncs (the log first, the database file after), so that copying the
 * log into the file and syncing both never stalls the event loop. A passive
 * checkpoint runs beside the writer; the log starts over only once the file
 * holds every frame on disk. Plain JavaScript: a worker does not go through
 * the TypeScript loader.
 */
const CHECKPOINTER = `
const { parentPort, workerData } = require("node:worker_threads");
const Database = require(workerData.driver);
const db = new Database(workerData.path);
db.pragma("busy_timeout = 5000");
db.pragma("wal_autocheckpoint = 0");
db.pragma("synchronous = FULL");
parentPort.on("message", (m) => {
  if (m === "close") { db.close(); parentPort.close(); return; }
  try { db.pragma("wal_checkpoint(PASSIVE)"); parentPort.postMessage({ ok: true }); }
  catch (e) { parentPort.postMessage({ ok: false, error: e.message }); }
});
`;

class Checkpointer {
  /** Started at the first checkpoint: a short-lived connection (a command-line tool's) never needs one. */
  private worker: Worker | undefined;
  private answer: ((m: { ok: boolean; error?: string }) => void) | undefined;

  constructor(private readonly path: string) {}

  /** One passive checkpoint: it copies the frames the log held when it began. */
  pass(): Promise<void> {
    if (this.answer) return Promise.reject(new Error("a checkpoint is under way"));
    const w = this.started();
    return new Promise((resolve, reject) => {
      this.answer = (m) => {
        this.answer = undefined;
        if (!m.ok) return reject(new Error(`checkpoint failed: ${m.error ?? "the checkpointer stopped"}`));
        countFsync(2);
        resolve();
      };
      w.postMessage("checkpoint");
    });
  }

  private started(): Worker {
    if (this.worker) return this.worker;
    const w = new Worker(CHECKPOINTER, { eval: true, workerData: { path: this.path, driver: createRequire(import.meta.url).resolve("better-sqlite3") } });
    w.unref();
    w.on("message", (m: { ok: boolean; error?: string }) => this.answer?.(m));
    w.on("error", (e) => {
      this.worker = undefined;
      this.answer?.({ ok: false, error: e.message });
    });
    this.worker = w;
    return w;
  }

  async close(): Promise<void> {
    const w = this.worker;
    if (!w) return;
    this.worker = undefined;
    const exited = new Promise<void>((r) => w.once("exit", () => r()));
    w.postMessage("close");
    await exited;
  }
}

class SqliteDb implements Db {
  private readonly q: SqliteQueryable;
  // One connection: transactions and single statements take turns, so a
  // statement never lands inside another caller's open transaction.
  private readonly mutex = new Mutex();
  /** Commits made so far, and how many of them are known to be on disk. */
  private committed = 0;
  private synced = 0;
  /** The sync under way: every commit made before it started is durable once it resolves. */
  private syncing: Promise<void> | undefined;
  private wal: FileHandle | undefined;
  private sinceCheckpoint = 0;
  private checkpointing = false;
  private readonly checkpointer: Checkpointer | undefined;

  /** `path` undefined: nothing to sync (an in-memory database). */
  constructor(
    private readonly db: Database.Database,
    path: string | undefined,
  ) {
    this.q = new SqliteQueryable(db);
    this.walPath = path && `${path}-wal`;
    this.checkpointer = path ? new Checkpointer(path) : undefined;
  }

  private readonly walPath: string | undefined;

  run(sql: string, params?: SqlValue[]) {
    return this.settled(async () => {
      try {
        return await this.q.run(sql, params);
      } finally {
        this.committed++;
      }
    });
  }

  get<T>(sql: string, params?: SqlValue[]) {
    return this.settled(async () => {
      try {
        return await this.q.get<T>(sql, params);
      } finally {
        if (this.q.writes(sql)) this.committed++;
      }
    });
  }

  all<T>(sql: string, params?: SqlValue[]) {
    return this.settled(async () => {
      try {
        return await this.q.all<T>(sql, params);
      } finally {
        if (this.q.writes(sql)) this.committed++;
      }
    });
  }

  // One writer at a time already: TransactionOptions change nothing here.
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    return this.settled(() => this.inTransaction(fn));
  }

  async transactionBeforeSync<T>(fn: (tx: Queryable) => Promise<T>): Promise<{ value: T; synced: Promise<void> }> {
    try {
      const value = await this.mutex.run(() => {
        this.usable();
        return this.inTransaction(fn);
      });
      return { value, synced: this.durable(this.committed) };
    } catch (e) {
      await this.durable(this.committed); // a failure may rest on what it read, as in settled()
      throw e;
    }
  }

  private async inTransaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    this.db.exec("BEGIN IMMEDIATE");
    try {
      const r = await fn(this.q);
      this.db.exec("COMMIT");
      return r;
    } catch (e) {
      this.db.exec("ROLLBACK");
      throw e;
    } finally {
      this.committed++;
    }
  }

  /**
   * Runs a task in its turn, then holds its outcome (an error too: it may
   * rest on what it read) until every commit made so far is on disk.
   */
  private async settled<T>(task: () => Promise<T>): Promise<T> {
    try {
      return await this.mutex.run(async () => {
        this.usable();
        try {
          return await task();
        } finally {
          this.noteOthersCommits();
        }
      });
    } finally {
      await this.durable(this.committed);
    }
  }

  /** SQLite's count of commits by other connections (another process's tool on this file), as last seen. */
  private dataVersion: number | undefined;

  /**
   * A commit another connection made (an operator's tool writing while the
   * service runs) is synced by its own connection in its own time: anything
   * read since it came waits for a sync of ours, which covers the file's
   * log whoever wrote it.
   */
  private noteOthersCommits(): void {
    if (!this.walPath) return;
    const v = this.db.pragma("data_version", { simple: true }) as number;
    if (this.dataVersion !== undefined && v !== this.dataVersion) this.committed++;
    this.dataVersion = v;
  }

  /** The first failed sync, after which nothing is answered: what reached the disk is unknown until the process starts again. */
  private broken: Error | undefined;

  private usable(): void {
    if (this.broken) {
      throw new StoreUnavailable(
        `the database's write-ahead log could not be synced (${this.broken.message}); nothing more is answered from it: restart the service, which recovers from what is on disk`,
        { cause: this.broken },
      );
    }
  }

  /** Resolves once commit number `n` (and every one before it) is on disk, sharing syncs with every other caller. */
  private async durable(n: number): Promise<void> {
    if (!this.walPath) return;
    if (this.synced >= n) return;
    while (this.synced < n) {
      this.syncing ??= this.syncOnce().finally(() => (this.syncing = undefined));
      await this.syncing;
    }
    await this.turn();
  }

  /** Callers a sync made durable, each resumed in a turn of the event loop of its own. */
  private readonly woken: (() => void)[] = [];

  /**
   * One sync can make hundreds of callers durable at once; resumed together,
   * their work would run as one long stretch of microtasks, and every timer
   * and every arriving message (a PSAM's answer that frees it) would wait
   * for all of it. One per turn, the event loop polls between them.
   */
  private turn(): Promise<void> {
    return new Promise((resolve) => {
      if (this.woken.push(resolve) === 1) setImmediate(this.wakeNext);
    });
  }

  private readonly wakeNext = (): void => {
    this.woken.shift()?.();
    if (this.woken.length > 0) setImmediate(this.wakeNext);
  };

  private async syncOnce(): Promise<void> {
    this.usable();
    const target = this.committed;
    try {
      this.wal ??= await open(this.walPath!, "r");
      await this.wal.datasync();
    } catch (e) {
      // Linux reports a lost write-back once: a later sync could succeed without the lost pages. Nothing is trusted after.
      this.broken = e as Error;
      this.usable();
    }
    countFsync();
    this.sinceCheckpoint += target - this.synced;
    this.synced = target;
    if (this.sinceCheckpoint >= CHECKPOINT_EVERY_COMMITS && !this.checkpointing) {
      this.sinceCheckpoint = 0;
      this.checkpointing = true;
      this.checkpoint()
        .catch(() => undefined) // tried again after the next thousand commits
        .finally(() => (this.checkpointing = false));
    }
  }

  /**
   * Copies the log into the database file beside the writers; then, if they
   * added frames meanwhile, copies those few with the writers held back for
   * that short pass, so the log can start over even under constant load.
   * The event loop never waits on either.
   */
  private async checkpoint(): Promise<void> {
    const c = this.checkpointer;
    if (!c) return;
    await c.pass();
    await this.mutex.run(async () => {
      if (!this.closed) await c.pass();
    });
  }

  private closed = false;

  async close() {
    await this.mutex.run(async () => {
      this.closed = true;
      // A broken store closes all the same (the service is stopping to recover); its failure was reported when it came.
      if (!this.broken) await this.durable(this.committed);
      await this.checkpointer?.close();
      // The last connection's close checkpoints and deletes the log: with SQLite's own syncs, not without.
      if (this.walPath) this.db.pragma("synchronous = FULL");
      this.db.close();
      await this.wal?.close().catch(() => undefined);
    });
  }
}

/**
 * Opens (creating if needed) a SQLite database file in WAL mode and applies
 * the migrations. The file is its owner's alone (0600, its folder 0700 when
 * made here): journals, orders and accounts hold secrets, goods and money.
 */
export function openSqlite(path: string, migrations: Migrations): Db {
  if (path !== ":memory:") {
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    closeSync(openSync(path, "a", 0o600));
    // A file made before, or under a loose umask, is narrowed; SQLite gives its -wal and -shm files the database's mode.
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
  }
  const db = new Database(path);
  db.pragma("journal_mode = WAL");
  db.pragma("synchronous = FULL"); // the migrations sync as SQLite does; the service's commits are synced below, in groups
  db.pragma("busy_timeout = 5000");
  db.pragma("foreign_keys = ON");
  db.exec("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)");
  const done = new Set((db.prepare("SELECT version FROM schema_migrations").all() as { version: number }[]).map((r) => r.version));
  migrations.forEach((sql, i) => {
    if (done.has(i + 1)) return;
    db.transaction(() => {
      db.exec(sql);
      db.prepare("INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)").run(i + 1, new Date().toISOString());
    })();
  });
  if (path === ":memory:") return new SqliteDb(db, undefined);
  // The log exists from the first read on; its folder learns of it durably once, here.
  const dirFd = openSync(dirname(path), "r");
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
  db.pragma("wal_autocheckpoint = 0"); // checkpoints are SqliteDb's, with their syncs
  // SqliteDb syncs the log itself before anyone is answered. NORMAL, not OFF: in WAL mode it adds no sync to a
  // commit, but it syncs the log's new header when the log starts over, without which a power cut then could
  // leave old frames that recovery would read as valid over newer pages of the database file.
  db.pragma("synchronous = NORMAL");
  return new SqliteDb(db, path);
}
