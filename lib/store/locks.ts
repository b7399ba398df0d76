// Per-key locks that hold across the processes sharing one store: the
// steps of one transaction run one at a time, whichever replica runs them.
//
// On SQLite (one process per file) they are the in-process KeyedMutex. On
// PostgreSQL each lock is a session-level advisory lock on a connection of
// the store's lock pool (Db.lockSession), held for the task and taken
// behind the in-process KeyedMutex, so that one process takes one
// connection per key. A lock whose connection dies (its process died, the
// network broke) is released by PostgreSQL: that is the lease of the work
// under way, and another replica waiting for the lock takes it at once.
// A holder that lost its connection does not know at once: what it writes
// must be conditional on what it read (UPDATE … WHERE state = ?), so that
// a second holder's writes make its own change nothing.

import type { Logger } from "../log.js";
import { KeyedMutex } from "../mutex.js";
import type { Db, HeldSession } from "./db.js";

/** The outcome of a try: the task's value, or nothing when another held the lock. */
export type Tried<T> = { ran: true; value: T } | { ran: false };

export interface TransactionLocks {
  /** Runs `task` holding the lock of `key`, waiting for it as long as another (here or in another replica) holds it. */
  run<T>(key: string, task: () => Promise<T>): Promise<T>;
  /** Runs `task` holding the lock of `key` if it is free now; `{ ran: false }` at once when it is not (for work another holder makes needless). */
  tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>>;
  /** Whether a task of this process holds the lock of `key` now (not merely waits for it). */
  heldHere(key: string): boolean;
  /** Of `keys`, those whose lock another process holds now (on SQLite, none: there is no other). */
  heldElsewhere(keys: readonly string[]): Promise<Set<string>>;
  /** Whether the locks are shared with other processes (PostgreSQL). */
  readonly shared: boolean;
}

/** Keys whose lock a task of this process holds now. */
class Holding {
  private readonly keys = new Set<string>();

  async during<T>(key: string, task: () => Promise<T>): Promise<T> {
    this.keys.add(key);
    try {
      return await task();
    } finally {
      this.keys.delete(key);
    }
  }

  has(key: string): boolean {
    return this.keys.has(key);
  }
}

/** One process's locks: the store is its alone. */
class LocalLocks implements TransactionLocks {
  readonly shared = false;
  private readonly mutex = new KeyedMutex();
  private readonly holding = new Holding();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    return this.mutex.run(key, () => this.holding.during(key, task));
  }

  tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>> {
    return this.mutex.tryRun(key, () => this.holding.during(key, task));
  }

  heldHere(key: string): boolean {
    return this.holding.has(key);
  }

  async heldElsewhere(): Promise<Set<string>> {
    return new Set();
  }
}

/** The 64-bit advisory lock key of a lock name, computed by PostgreSQL itself (the same in every replica). */
const LOCK_KEY = "hashtextextended(?, 0)";

/** Locks shared by every process on one PostgreSQL database, within a namespace. */
class AdvisoryLocks implements TransactionLocks {
  readonly shared = true;
  private readonly mutex = new KeyedMutex();
  private readonly held = new Holding();

  constructor(
    private readonly db: Db,
    private readonly lockSession: () => Promise<HeldSession>,
    private readonly namespace: string,
    private readonly log: Logger | undefined,
  ) {}

  private name(key: string): string {
    return `${this.namespace}:${key}`;
  }

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    return this.mutex.run(key, async () => {
      const s = await this.lockSession();
      try {
        await s.get(`SELECT pg_advisory_lock(${LOCK_KEY}) AS locked`, [this.name(key)]);
      } catch (e) {
        s.release(true);
        throw e;
      }
      return this.holding(s, key, task);
    });
  }

  async tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>> {
    return this.mutex
      .tryRun(key, async () => {
        const s = await this.lockSession();
        let got: boolean;
        try {
          got = (await s.get<{ locked: number }>(`SELECT pg_try_advisory_lock(${LOCK_KEY}) AS locked`, [this.name(key)]))?.locked === 1;
        } catch (e) {
          s.release(true);
          throw e;
        }
        if (!got) {
          s.release();
          return { ran: false as const };
        }
        return { ran: true as const, value: await this.holding(s, key, task) };
      })
      .then((r) => (r.ran ? r.value : r));
  }

  /** Runs the task with the lock taken on `s`, then unlocks and gives the connection back (dropped, which unlocks too, if unlocking fails). */
  private async holding<T>(s: HeldSession, key: string, task: () => Promise<T>): Promise<T> {
    try {
      return await this.held.during(key, task);
    } finally {
      if (s.lost) this.log?.warn("a lock's connection broke while its task ran: another process may have acted meanwhile", { lock: this.name(key) });
      let unlocked = false;
      if (!s.lost) {
        try {
          unlocked = (await s.get<{ unlocked: number }>(`SELECT pg_advisory_unlock(${LOCK_KEY}) AS unlocked`, [this.name(key)]))?.unlocked === 1;
        } catch {
          // dropped below: the session's end unlocks
        }
      }
      s.release(!unlocked);
    }
  }

  heldHere(key: string): boolean {
    return this.held.has(key);
  }

  /**
   * Of `keys`, those whose lock some session holds now (pg_locks shows a
   * bigint advisory key as its high and low 32 bits, objsubid 1), left out
   * those this process holds itself. A key this process waits for counts
   * when another holds it.
   */
  async heldElsewhere(keys: readonly string[]): Promise<Set<string>> {
    const mine = keys.filter((k) => !this.heldHere(k));
    if (mine.length === 0) return new Set();
    const names = mine.map((k) => this.name(k));
    const rows = await this.db.all<{ name: string }>(
      `SELECT n.name FROM (SELECT name, ${LOCK_KEY.replace("?", "name")} AS k FROM unnest(CAST(? AS TEXT[])) AS t(name)) AS n
        WHERE EXISTS (SELECT 1 FROM pg_locks l
                       WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                         AND l.classid::bigint = ((n.k >> 32) & 4294967295) AND l.objid::bigint = (n.k & 4294967295))`,
      [`{${names.map((n) => `"${n.replace(/["\\]/g, (c) => `\\${c}`)}"`).join(",")}}`],
    );
    const held = new Set(rows.map((r) => r.name));
    return new Set(mine.filter((k) => held.has(this.name(k)) && !this.heldHere(k)));
  }
}

/**
 * The locks of a store: shared advisory locks on PostgreSQL (each name taken
 * as `namespace:key`, so services sharing a database never collide), the
 * in-process mutex on SQLite.
 */
export function transactionLocks(db: Db, o: { namespace: string; log?: Logger }): TransactionLocks {
  const lockSession = db.lockSession?.bind(db);
  if (!lockSession) return new LocalLocks();
  return new AdvisoryLocks(db, lockSession, o.namespace, o.log);
}
