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
//
// A caller with a deadline waits for the lock until then, whatever it waits
// for (its turn in this process, a connection of the lock pool, another
// replica's hold), and gets LockBusy (UNAVAILABLE, retryable) after.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { NetpurseError } from "../grpc/errors.js";
import type { Logger } from "../log.js";
import { KeyedMutex } from "../mutex.js";
import type { Db, HeldSession } from "./db.js";

/** The outcome of a try: the task's value, or nothing when another held the lock. */
export type Tried<T> = { ran: true; value: T } | { ran: false };

/** The lock was not had by the caller's deadline: another step of the same key is under way, or every lock connection is taken. */
export class LockBusy extends NetpurseError {
  constructor(key: string, why: string) {
    super(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, `transaction ${key}: ${why} before the call's deadline; nothing was done: retry`);
  }
}

export interface LockOptions {
  /** When to stop waiting for the lock (ms since the epoch): LockBusy then. Without it, the wait has no bound. */
  deadline?: number;
}

/** A task run holding a lock. */
export type Task<T> = (held: HeldLock) => Promise<T>;

/** The options and task of a run, given as (task) or (options, task). */
const runArgs = <T>(a: LockOptions | Task<T>, b: Task<T> | undefined): [LockOptions, Task<T>] =>
  typeof a === "function" ? [{}, a] : [a, b ?? (() => Promise.reject(new Error("a lock's run without its task")))];

/** What a task holding a lock may do with it. */
export interface HeldLock {
  /**
   * Lets the lock go while `wait` runs, then takes it again (by the run's
   * deadline), for a wait that needs no lock (a free PSAM): another replica
   * may take the lock meanwhile, so the task must read again what it read
   * before. This process's other tasks of the key still wait their turn.
   * When the lock cannot be had again, what `wait` got goes to `drop` and
   * LockBusy is thrown (also when `wait` threw: the task holds nothing then).
   */
  without<U>(wait: () => Promise<U>, drop: (got: U) => void): Promise<U>;
}

export interface TransactionLocks {
  /** Runs `task` holding the lock of `key`, waiting for it while another (here or in another replica) holds it: until `o.deadline`, if given. */
  run<T>(key: string, task: Task<T>): Promise<T>;
  run<T>(key: string, o: LockOptions, task: Task<T>): Promise<T>;
  /** Runs `task` holding the lock of `key` if it is free now; `{ ran: false }` at once when it is not (for work another holder makes needless). */
  tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>>;
  /** Whether a task of this process holds the lock of `key` now (not merely waits for it). */
  heldHere(key: string): boolean;
  /** Of `keys`, those whose lock another process holds now (on SQLite, none: there is no other). */
  heldElsewhere(keys: readonly string[]): Promise<Set<string>>;
  /** Whether the locks are shared with other processes (PostgreSQL). */
  readonly shared: boolean;
}

/** The least wait given to a step of taking a lock whose deadline is (nearly) past: a free lock is still taken. */
const MIN_WAIT_MS = 50;

const waitFor = (deadline: number) => Math.max(MIN_WAIT_MS, deadline - Date.now());

/**
 * Runs `task` in its turn for `key` in this process; with a deadline, a
 * caller whose turn has not come by then gets LockBusy, and its task, when
 * the turn comes, is skipped.
 */
function inTurn<T>(mutex: KeyedMutex, key: string, deadline: number | undefined, task: () => Promise<T>): Promise<T> {
  if (deadline === undefined) return mutex.run(key, task);
  return new Promise<T>((resolve, reject) => {
    let phase: "queued" | "running" | "gave up" = "queued";
    const timer = setTimeout(() => {
      if (phase !== "queued") return;
      phase = "gave up";
      reject(new LockBusy(key, "another step of it in this process did not end"));
    }, waitFor(deadline));
    // Never rejects: the task's outcome goes to the caller.
    mutex
      .run(key, async () => {
        if (phase === "gave up") return;
        phase = "running";
        clearTimeout(timer);
        await task().then(resolve, reject);
      })
      .catch(() => undefined);
  });
}

/** One process's locks: the store is its alone. Letting a lock go while waiting keeps it: no one else could take it. */
class LocalLocks implements TransactionLocks {
  readonly shared = false;
  private readonly mutex = new KeyedMutex();
  private readonly holding = new Set<string>();

  run<T>(key: string, a: LockOptions | Task<T>, b?: Task<T>): Promise<T> {
    const [o, task] = runArgs(a, b);
    return inTurn(this.mutex, key, o.deadline, () => this.during(key, () => task({ without: (wait) => wait() })));
  }

  tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>> {
    return this.mutex.tryRun(key, () => this.during(key, task));
  }

  private async during<T>(key: string, task: () => Promise<T>): Promise<T> {
    this.holding.add(key);
    try {
      return await task();
    } finally {
      this.holding.delete(key);
    }
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

/** SQLSTATE 55P03: lock_timeout ran out while the statement waited for the lock. */
function isLockTimeout(e: unknown): boolean {
  for (let x = e; x instanceof Error; x = (x as { cause?: unknown }).cause) if ((x as { code?: unknown }).code === "55P03") return true;
  return false;
}

/** Locks shared by every process on one PostgreSQL database, within a namespace. */
class AdvisoryLocks implements TransactionLocks {
  readonly shared = true;
  private readonly mutex = new KeyedMutex();
  /** Keys a task of this process holds the lock of now. */
  private readonly holding = new Set<string>();
  /**
   * Keys this process has a lock session for (taking, holding or letting
   * go of the lock), with that session's backend pid once known: the lock
   * it holds is not "elsewhere", though no task holds it yet (or any more).
   */
  private readonly sessions = new Map<string, number | undefined>();

  constructor(
    private readonly db: Db,
    private readonly lockSession: () => Promise<HeldSession>,
    private readonly namespace: string,
    private readonly log: Logger | undefined,
  ) {}

  private name(key: string): string {
    return `${this.namespace}:${key}`;
  }

  run<T>(key: string, a: LockOptions | Task<T>, b?: Task<T>): Promise<T> {
    const [{ deadline }, task] = runArgs(a, b);
    return inTurn(this.mutex, key, deadline, async () => {
      let s: HeldSession | undefined = await this.take(key, deadline);
      const held: HeldLock = {
        without: async <U>(wait: () => Promise<U>, drop: (got: U) => void): Promise<U> => {
          const mine = s;
          s = undefined;
          if (mine) await this.letGo(key, mine);
          let got: { value: U } | { error: unknown };
          try {
            got = { value: await wait() };
          } catch (e) {
            got = { error: e };
          }
          try {
            s = await this.take(key, deadline);
          } catch (e) {
            if ("value" in got) drop(got.value);
            throw e;
          }
          if ("error" in got) throw got.error;
          return got.value;
        },
      };
      try {
        return await task(held);
      } finally {
        if (s) await this.letGo(key, s);
      }
    });
  }

  async tryRun<T>(key: string, task: () => Promise<T>): Promise<Tried<T>> {
    return this.mutex
      .tryRun(key, async (): Promise<Tried<T>> => {
        const s = await this.lockSession();
        if (!(await this.tryLock(key, s))) {
          this.sessions.delete(key);
          s.release();
          return { ran: false };
        }
        this.holding.add(key);
        try {
          return { ran: true, value: await task() };
        } finally {
          await this.letGo(key, s);
        }
      })
      .then((r) => (r.ran ? r.value : r));
  }

  /** A session of the lock pool, by the deadline (one that comes after is given back). */
  private session(key: string, deadline: number | undefined): Promise<HeldSession> {
    const coming = this.lockSession();
    if (deadline === undefined) return coming;
    return new Promise((resolve, reject) => {
      let late = false;
      const timer = setTimeout(() => {
        late = true;
        reject(new LockBusy(key, "no connection of the payment server's lock pool came free (every one holds a step under way)"));
      }, waitFor(deadline));
      coming.then(
        (s) => {
          if (late) return s.release();
          clearTimeout(timer);
          resolve(s);
        },
        (e: unknown) => {
          clearTimeout(timer);
          if (!late) reject(e instanceof Error ? e : new Error(String(e)));
        },
      );
    });
  }

  /** Tries the lock on `s` once, learning the session's backend pid with it; a session that fails is dropped. */
  private async tryLock(key: string, s: HeldSession): Promise<boolean> {
    this.sessions.set(key, undefined);
    try {
      const r = await s.get<{ locked: number; pid: number }>(`SELECT pg_try_advisory_lock(${LOCK_KEY}) AS locked, pg_backend_pid() AS pid`, [this.name(key)]);
      this.sessions.set(key, r?.pid);
      return r?.locked === 1;
    } catch (e) {
      this.sessions.delete(key);
      s.release(true);
      throw e;
    }
  }

  /**
   * Takes the lock of `key` on a session of the lock pool, waiting for it
   * (lock_timeout) until the deadline: the session holding it.
   */
  private async take(key: string, deadline: number | undefined): Promise<HeldSession> {
    const s = await this.session(key, deadline);
    if (!(await this.tryLock(key, s))) {
      try {
        // Set before every wait: the session may have waited with another bound before. 0 is no bound.
        await s.get("SELECT set_config('lock_timeout', ?, false) AS bound", [deadline === undefined ? "0" : String(waitFor(deadline))]);
        await s.get(`SELECT pg_advisory_lock(${LOCK_KEY}) AS locked`, [this.name(key)]);
      } catch (e) {
        this.sessions.delete(key);
        if (!isLockTimeout(e)) {
          s.release(true);
          throw e;
        }
        s.release();
        throw new LockBusy(key, "another step of it, at another replica, did not end");
      }
    }
    this.holding.add(key);
    return s;
  }

  /** Unlocks and gives the connection back (dropped, which unlocks too, if unlocking fails). */
  private async letGo(key: string, s: HeldSession): Promise<void> {
    this.holding.delete(key);
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
    this.sessions.delete(key);
  }

  heldHere(key: string): boolean {
    return this.holding.has(key);
  }

  /**
   * Of `keys`, those whose lock a session of another process holds now
   * (pg_locks shows a bigint advisory key as its high and low 32 bits,
   * objsubid 1), left out those this process holds itself: by a task, or by
   * its own session, the lock taken and its task not begun yet, or the
   * task done and the lock not given back yet. A key this process waits for
   * counts when another holds it. One scan of pg_locks, joined with the keys
   * asked about.
   */
  async heldElsewhere(keys: readonly string[]): Promise<Set<string>> {
    const asked = keys.filter((k) => !this.heldHere(k));
    if (asked.length === 0) return new Set();
    const rows = await this.db.all<{ name: string; pid: number }>(
      `WITH n AS (SELECT name, ${LOCK_KEY.replace("?", "name")} AS k FROM unnest(CAST(? AS TEXT[])) AS t(name))
       SELECT n.name, l.pid FROM pg_locks l JOIN n ON l.classid::bigint = ((n.k >> 32) & 4294967295) AND l.objid::bigint = (n.k & 4294967295)
        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
      [`{${asked.map((k) => `"${this.name(k).replace(/["\\]/g, (c) => `\\${c}`)}"`).join(",")}}`],
    );
    const holders = new Map<string, number[]>();
    for (const r of rows) holders.set(r.name, [...(holders.get(r.name) ?? []), r.pid]);
    const elsewhere = new Set<string>();
    for (const k of asked) {
      const pids = holders.get(this.name(k)) ?? [];
      if (pids.length === 0 || this.heldHere(k)) continue;
      if (this.sessions.has(k)) {
        const mine = this.sessions.get(k);
        // Our own session is taking the lock and its pid is not known yet: whose the grant is, the next look tells.
        if (mine === undefined || pids.every((p) => p === mine)) continue;
      }
      elsewhere.add(k);
    }
    return elsewhere;
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
