// Failed logins, counted per account and per caller address, in bounded
// memory. Password guessing is slow by scrypt's cost; this makes it slower
// still, so that an online guesser gets a handful of tries per quarter hour:
// an account with too many failures is locked for a while, even for the right
// password, and so is an address that fails across many accounts.

import { sourceOf } from "../../lib/grpc/server.js";

export interface LoginLimits {
  /** Failures on one account within the window that lock it. */
  maxFailuresPerAccount: number;
  /** Failures from one address (an IPv4 address or IPv6 /64), whatever the accounts, within the window that lock it out. */
  maxFailuresPerAddress: number;
  /** How far back failures count, ms. */
  windowMs: number;
  /** How long a lock lasts, ms. */
  lockMs: number;
  /** Accounts and addresses tracked at most, each; a locked one is never forgotten before its lock ends. */
  maxTracked: number;
}

export const DEFAULT_LOGIN_LIMITS: LoginLimits = {
  maxFailuresPerAccount: 5,
  maxFailuresPerAddress: 20,
  windowMs: 15 * 60_000,
  lockMs: 15 * 60_000,
  maxTracked: 10_000,
};

interface Entry {
  /** When the latest failures happened, oldest first; at most the limit's count, as no more are needed to decide. */
  failures: number[];
  /** Attempts being checked now: counted as failures until they end, so that parallel guesses cannot pass the limit together. */
  inFlight: number;
  lockedUntil: number;
}

/** A refusal: whose limit, and how long until a login may be tried again. */
export interface Lockout {
  by: "account" | "address";
  retryAfterMs: number;
}

/** Failures of one kind of key (accounts, or addresses), at most `max` keys. */
class FailureTable {
  private readonly entries = new Map<string, Entry>();

  constructor(
    private readonly limit: number,
    private readonly l: LoginLimits,
  ) {}

  /**
   * The entry of `key`, its failures older than the window dropped: the
   * window slides, so failures bunched on either side of a boundary still
   * count together. An entry with nothing left to remember is forgotten.
   */
  private live(key: string, now: number): Entry | undefined {
    const e = this.entries.get(key);
    if (!e) return undefined;
    while (e.failures.length > 0 && now - e.failures[0]! > this.l.windowMs) e.failures.shift();
    if (e.failures.length === 0 && e.lockedUntil <= now && e.inFlight === 0) {
      this.entries.delete(key);
      return undefined;
    }
    return e;
  }

  /** How long `key` stays locked, or 0. */
  lockedFor(key: string, now: number): number {
    const e = this.live(key, now);
    if (!e) return 0;
    if (e.lockedUntil > now) return e.lockedUntil - now;
    // Attempts in flight would take it to the limit: refused until they end (a second at most).
    return e.failures.length + e.inFlight >= this.limit ? 1_000 : 0;
  }

  /** The entry for `key`, made if need be; undefined when the table is full of locked keys (the caller then refuses). */
  private entry(key: string, now: number): Entry | undefined {
    const e = this.live(key, now);
    if (e) return e;
    if (this.entries.size >= this.l.maxTracked && !this.evictOne(now)) return undefined;
    const fresh: Entry = { failures: [], inFlight: 0, lockedUntil: 0 };
    this.entries.set(key, fresh);
    return fresh;
  }

  /** Forgets the oldest key that is neither locked nor being checked; false when there is none. */
  private evictOne(now: number): boolean {
    for (const [k, e] of this.entries) {
      if (e.lockedUntil <= now && e.inFlight === 0) {
        this.entries.delete(k);
        return true;
      }
    }
    return false;
  }

  begin(key: string, now: number): boolean {
    const e = this.entry(key, now);
    if (!e) return false;
    e.inFlight++;
    return true;
  }

  /** An attempt ended; `failed` counts it. Returns whether `key` is locked now. */
  end(key: string, failed: boolean, now: number): boolean {
    const e = this.entries.get(key);
    if (!e) return false;
    e.inFlight = Math.max(0, e.inFlight - 1);
    if (!failed) return false;
    e.failures.push(now);
    if (e.failures.length > this.limit) e.failures.shift();
    if (e.failures.length >= this.limit) e.lockedUntil = now + this.l.lockMs;
    return e.lockedUntil > now;
  }

  /** A right password: the account's failures are forgotten (an address's are not, or owning one account would reset them). */
  clear(key: string): void {
    const e = this.entries.get(key);
    if (e && e.inFlight === 0) this.entries.delete(key);
    else if (e) e.failures = [];
  }

  get size(): number {
    return this.entries.size;
  }
}

export class LoginLimiter {
  readonly limits: LoginLimits;
  private readonly accounts: FailureTable;
  private readonly addresses: FailureTable;

  constructor(limits: Partial<LoginLimits> = {}) {
    this.limits = { ...DEFAULT_LOGIN_LIMITS, ...limits };
    this.accounts = new FailureTable(this.limits.maxFailuresPerAccount, this.limits);
    this.addresses = new FailureTable(this.limits.maxFailuresPerAddress, this.limits);
  }

  /** The address part of a gRPC peer ("host:port"), grouped as the connection limits group it (IPv6 by /64). */
  static addressOf(peer: string): string {
    const i = peer.lastIndexOf(":");
    return sourceOf((i > 0 ? peer.slice(0, i) : peer).replace(/^\[|\]$/g, ""));
  }

  /**
   * Starts an attempt: undefined when it may go on (then `end` must follow),
   * else the lockout that refuses it. A table full of locked keys refuses
   * too: memory stays bounded, and a flood cannot push a locked account out.
   */
  begin(account: string, address: string, now = Date.now()): Lockout | undefined {
    const byAddress = this.addresses.lockedFor(address, now);
    if (byAddress) return { by: "address", retryAfterMs: byAddress };
    const byAccount = this.accounts.lockedFor(account, now);
    if (byAccount) return { by: "account", retryAfterMs: byAccount };
    if (!this.addresses.begin(address, now)) return { by: "address", retryAfterMs: this.limits.lockMs };
    if (!this.accounts.begin(account, now)) {
      this.addresses.end(address, false, now);
      return { by: "account", retryAfterMs: this.limits.lockMs };
    }
    return undefined;
  }

  /** Ends an attempt begun with `begin`. Returns whether the account is locked now. */
  end(account: string, address: string, ok: boolean, now = Date.now()): boolean {
    this.addresses.end(address, !ok, now);
    const locked = this.accounts.end(account, !ok, now);
    if (ok) this.accounts.clear(account);
    return locked;
  }

  /** Ends an attempt begun with `begin` that could not be checked (the bank's own failure): neither a failure nor a success. */
  abandon(account: string, address: string, now = Date.now()): void {
    this.addresses.end(address, false, now);
    this.accounts.end(account, false, now);
  }

  /** Keys tracked now (for tests: the memory stays bounded). */
  tracked(): { accounts: number; addresses: number } {
    return { accounts: this.accounts.size, addresses: this.addresses.size };
  }
}
