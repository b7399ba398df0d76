// Counts the RPCs a purchase makes, by link (cardholder to payment server,
// cardholder to merchant) and by whether they were on the purchase's path:
// a call that ended before payOffer returned was waited for; one still in
// flight when it returned (CLIENT_COMPARES's ReportCardSignature) or started
// after it was not. Counted from the calls themselves, not from what the
// design says they should be.

import type { PurchaseContext } from "../client/purchase.js";

export type Link = "payment" | "merchant";

interface Call {
  link: Link;
  method: string;
  onPath: boolean;
  failed: boolean;
}

/** One purchase's calls, through the clients its context hands out. */
export class PurchaseCalls {
  private ended = false;
  readonly calls: Call[] = [];
  private readonly inFlight = new Set<Promise<void>>();

  /** The cardholder's context with every payment and merchant client counted. */
  wrap(ctx: PurchaseContext): PurchaseContext {
    return {
      ...ctx,
      payment: (address) => this.counted(ctx.payment(address), "payment"),
      merchant: (address, merchantId) => this.counted(ctx.merchant(address, merchantId), "merchant"),
    };
  }

  /** payOffer returned: from here on, calls are after the purchase. */
  purchaseEnded(): void {
    this.ended = true;
  }

  /** Resolves once every call made so far has ended. */
  async settled(): Promise<void> {
    while (this.inFlight.size) await Promise.all([...this.inFlight]);
  }

  private counted<C extends object>(client: C, link: Link): C {
    return new Proxy(client, {
      get: (target, prop, receiver) => {
        const member: unknown = Reflect.get(target, prop, receiver);
        if (typeof member !== "function") return member;
        return (...args: unknown[]) => this.track(link, String(prop), member.apply(target, args) as Promise<unknown>);
      },
    });
  }

  private track<T>(link: Link, method: string, call: Promise<T>): Promise<T> {
    const record: Call = { link, method, onPath: false, failed: false };
    this.calls.push(record);
    const ended = (failed: boolean) => {
      record.onPath = !this.ended;
      record.failed = failed;
    };
    const tracked = call.then(
      (v) => (ended(false), v),
      (e: unknown) => {
        ended(true);
        throw e;
      },
    );
    const done: Promise<void> = tracked.then(
      () => void this.inFlight.delete(done),
      () => void this.inFlight.delete(done),
    );
    this.inFlight.add(done);
    return tracked;
  }
}

export interface CallSummary {
  /** Purchases whose calls were counted: every successful one, warm-up included. */
  purchases: number;
  /** Per purchase. */
  paymentOnPath: number;
  paymentAfter: number;
  merchantOnPath: number;
  merchantAfter: number;
  /** Per purchase, by "link method (on path|after)". */
  byMethod: Record<string, number>;
  /** Calls after the purchase that failed (the client leaves them to be sent again later). */
  failedAfter: number;
}

/** The calls of every successful purchase of a run, once their background calls have ended. */
export class CallCounter {
  private purchases = 0;
  private failedAfter = 0;
  /** By "link method (on path|after)". */
  private readonly totals = new Map<string, { link: Link; onPath: boolean; count: number }>();
  private readonly pending = new Set<Promise<void>>();

  /** A successful purchase: its calls count once those still in flight have ended. */
  add(p: PurchaseCalls): void {
    this.purchases++;
    const counted: Promise<void> = p.settled().then(
      () => {
        this.count(p.calls);
        this.pending.delete(counted);
      },
      () => void this.pending.delete(counted),
    );
    this.pending.add(counted);
  }

  /** Waits for background calls to end, at most `timeoutMs`; returns how many purchases still had some in flight. */
  async drain(timeoutMs: number): Promise<number> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)));
    try {
      await Promise.race([Promise.all([...this.pending]), timeout]);
    } finally {
      clearTimeout(timer);
    }
    return this.pending.size;
  }

  summary(): CallSummary {
    const per = (n: number) => (this.purchases ? n / this.purchases : NaN);
    const sum = (link: Link, onPath: boolean) =>
      per([...this.totals.values()].filter((t) => t.link === link && t.onPath === onPath).reduce((n, t) => n + t.count, 0));
    return {
      purchases: this.purchases,
      paymentOnPath: sum("payment", true),
      paymentAfter: sum("payment", false),
      merchantOnPath: sum("merchant", true),
      merchantAfter: sum("merchant", false),
      byMethod: Object.fromEntries([...this.totals].map(([key, t]) => [key, per(t.count)])),
      failedAfter: this.failedAfter,
    };
  }

  private count(calls: Call[]): void {
    for (const c of calls) {
      const key = `${c.link} ${c.method} (${c.onPath ? "on path" : "after"})`;
      const t = this.totals.get(key) ?? { link: c.link, onPath: c.onPath, count: 0 };
      t.count++;
      this.totals.set(key, t);
      if (!c.onPath && c.failed) this.failedAfter++;
    }
  }
}
