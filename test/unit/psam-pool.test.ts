// The PSAM pool on its own (services/payment/psam-pool.ts): which request
// gets which PSAM, and when. Plain objects and a model clock, except the
// first test, which reproduces issue #8 with real timers.
// NETPURSE_POOL_RUNS sets the number of random sequences of the
// property-based test (default 200).

import { expect } from "chai";
import fc from "fast-check";
import { performance } from "node:perf_hooks";
import {
  DEFAULT_MAX_WAITERS,
  NoPsamFits,
  NoPsamFree,
  PsamPool,
  type Lease,
  type PoolClock,
  type PsamPoolOptions,
  type SlotInfo,
  type Want,
} from "../../services/payment/psam-pool.js";

const RUNS = Number(process.env.NETPURSE_POOL_RUNS ?? 200);
const EUR = 978;
const USD = 840;

/** Time that moves only when told to; timers fire in the order of their due time. */
class ModelClock implements PoolClock {
  t = 1_000_000;
  private seq = 0;
  private readonly timers = new Map<number, { due: number; fn: () => void }>();
  now(): number {
    return this.t;
  }
  setTimeout(fn: () => void, ms: number): unknown {
    this.timers.set(++this.seq, { due: this.t + ms, fn });
    return this.seq;
  }
  clearTimeout(handle: unknown): void {
    this.timers.delete(handle as number);
  }
  advance(ms: number): void {
    this.t += ms;
    for (;;) {
      let next: [number, { due: number; fn: () => void }] | undefined;
      for (const e of this.timers) if (e[1].due <= this.t && (!next || e[1].due < next[1].due)) next = e;
      if (!next) return;
      this.timers.delete(next[0]);
      next[1].fn();
    }
  }
}

const slot = (psamId: string, o: Partial<SlotInfo> = {}): SlotInfo => ({ psamId, currencies: [EUR], keyVersions: [1], ready: true, ...o });

/** A request's promise, with what became of it so far. */
interface Pending {
  lease?: Lease;
  error?: Error;
  done: Promise<void>;
}

function track(p: Promise<Lease>): Pending {
  const r: Pending = { done: Promise.resolve() };
  r.done = p.then(
    (l) => void (r.lease = l),
    (e: Error) => void (r.error = e),
  );
  return r;
}

/** The lease a request got; fails the test when it got none. */
function leaseOf(r: Pending): Lease {
  if (!r.lease) throw new Error(`expected a lease, but the request ${r.error ? `failed: ${r.error.message}` : "still waits"}`);
  return r.lease;
}

/** Lets the pool's promises settle. */
const settle = () => new Promise<void>((r) => setImmediate(r));

function modelPool(o: PsamPoolOptions = {}) {
  const clock = new ModelClock();
  const released: Lease[] = [];
  const pool = new PsamPool((l) => released.push(l), { clock, ...o });
  const acquire = (w: Want, waitMs = 1_000) => track(pool.acquire(w, clock.now() + waitMs));
  return { clock, pool, released, acquire };
}

describe("PSAM pool", () => {
  it("gives a new purchase a free PSAM that a waiting retry excluded (issue #8: it used to time out while the PSAM sat idle)", async () => {
    const pool = new PsamPool(() => undefined);
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb")] });
    const first = await pool.acquire({ currency: EUR, keyVersion: 1 }, Date.now() + 1_000);
    expect(first.key).to.equal("t1/aa");
    // A retry that already failed on bb waits for aa.
    const retry = track(pool.acquire({ currency: EUR, keyVersion: 1, exclude: new Set(["t1/bb"]) }, Date.now() + 1_000));
    const fresh = track(pool.acquire({ currency: EUR, keyVersion: 1 }, Date.now() + 150));
    await fresh.done;
    expect(fresh.error?.message, "the new purchase must not wait behind the retry").to.equal(undefined);
    expect(fresh.lease?.key).to.equal("t1/bb");
    pool.release(first);
    await retry.done;
    expect(retry.lease?.key).to.equal("t1/aa");
  });

  it("hands out the least recently used free PSAM", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb"), slot("cc")] });
    const order: string[] = [];
    for (let i = 0; i < 5; i++) {
      const r = acquire({ currency: EUR });
      await r.done;
      order.push(leaseOf(r).key);
      pool.release(leaseOf(r));
    }
    expect(order).to.deep.equal(["t1/aa", "t1/bb", "t1/cc", "t1/aa", "t1/bb"]);
  });

  it("serves the requests that compete for the same PSAM first come, first served", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    const holder = acquire({ currency: EUR });
    await holder.done;
    const waiters = [acquire({ currency: EUR }), acquire({ currency: EUR, keyVersion: 1 }), acquire({})];
    await settle();
    expect(waiters.map((w) => w.lease)).to.deep.equal([undefined, undefined, undefined]);
    let lease = leaseOf(holder);
    for (const w of waiters) {
      pool.release(lease);
      // A request arriving as the PSAM comes free does not jump the queue.
      const late = acquire({ currency: EUR }, 0);
      await settle();
      expect(w.lease?.key).to.equal("t1/aa");
      expect(late.error).to.be.instanceOf(NoPsamFree);
      lease = leaseOf(w);
    }
    expect(pool.waiting()).to.equal(0);
  });

  it("gives a PSAM that appears to the earliest waiter that can use it", async () => {
    const { pool, acquire } = modelPool();
    // Requests that lost their PSAM with its terminal, waiting in an empty pool.
    const usd = acquire({ currency: USD, waitWhenEmpty: true });
    const eur1 = acquire({ currency: EUR, waitWhenEmpty: true });
    const eur2 = acquire({ currency: EUR, waitWhenEmpty: true });
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    await settle();
    expect(eur1.lease?.key).to.equal("t1/aa");
    expect(usd.lease).to.equal(undefined);
    expect(eur2.lease).to.equal(undefined);
    pool.updateTerminal({ terminalId: "t2", slots: [slot("bb", { currencies: [EUR, USD] })] });
    await settle();
    expect(usd.lease?.key, "the USD request came first").to.equal("t2/bb");
    expect(eur2.lease).to.equal(undefined);
  });

  it("gives a request for a particular PSAM that PSAM, without holding up requests for others", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb")] });
    const holder = acquire({ key: "t1/aa" });
    await holder.done;
    expect(holder.lease?.key).to.equal("t1/aa");
    const forAa = acquire({ key: "t1/aa" });
    const other = acquire({ currency: EUR });
    await settle();
    expect(other.lease?.key, "bb is free and the waiter wants aa only").to.equal("t1/bb");
    const eur = acquire({ currency: EUR });
    pool.release(leaseOf(holder));
    await settle();
    expect(forAa.lease?.key, "the request for aa came first").to.equal("t1/aa");
    expect(eur.lease).to.equal(undefined);
    // A particular PSAM is given whatever the request's currency or exclusions say.
    pool.release(leaseOf(other));
    await settle();
    expect(eur.lease?.key).to.equal("t1/bb");
    pool.release(leaseOf(eur));
    const odd = acquire({ key: "t1/bb", currency: USD, exclude: new Set(["t1/bb"]) });
    await settle();
    expect(odd.lease?.key).to.equal("t1/bb");
  });

  it("never gives a request a PSAM it excluded", async () => {
    const { pool, clock, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb")] });
    const r = acquire({ currency: EUR, exclude: new Set(["t1/aa"]) });
    await r.done;
    expect(r.lease?.key).to.equal("t1/bb");
    const none = acquire({ currency: EUR, exclude: new Set(["t1/aa", "t1/bb"]) }, 100);
    pool.release(leaseOf(r));
    await settle();
    expect(none.lease).to.equal(undefined);
    clock.advance(100);
    await none.done;
    expect(none.error).to.be.instanceOf(NoPsamFree);
    expect(pool.counts()).to.deep.equal({ free: 2, leased: 0, total: 2 });
  });

  it("gives a request only a PSAM that holds its key version, and a waiter for another key version does not hold it up", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("v1", { keyVersions: [1] }), slot("v2", { keyVersions: [2] })] });
    const a = acquire({ currency: EUR, keyVersion: 2 });
    await a.done;
    expect(a.lease?.key).to.equal("t1/v2");
    const waitsForV2 = acquire({ currency: EUR, keyVersion: 2 });
    const wantsV1 = acquire({ currency: EUR, keyVersion: 1 });
    await settle();
    expect(waitsForV2.lease).to.equal(undefined);
    expect(wantsV1.lease?.key).to.equal("t1/v1");
    pool.release(leaseOf(a));
    await settle();
    expect(waitsForV2.lease?.key).to.equal("t1/v2");
  });

  it("gives a request only a PSAM that accepts its currency, and a waiter for another currency does not hold it up", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("eur", { currencies: [EUR] }), slot("usd", { currencies: [USD] })] });
    const a = acquire({ currency: USD });
    await a.done;
    expect(a.lease?.key).to.equal("t1/usd");
    const waitsForUsd = acquire({ currency: USD });
    const wantsEur = acquire({ currency: EUR });
    await settle();
    expect(waitsForUsd.lease).to.equal(undefined);
    expect(wantsEur.lease?.key).to.equal("t1/eur");
  });

  it("refuses at once a currency or key version that no PSAM in the pool takes, or any request while the pool is empty (NoPsamFits)", async () => {
    const { pool, clock, acquire } = modelPool();
    const early = acquire({ currency: EUR }, 10_000);
    await settle();
    expect(early.error, "no terminal attached: refused at once, not after the deadline").to.be.instanceOf(NoPsamFits);
    expect(early.error).to.include({ what: "none", message: "no PSAM in the pool: no terminal host is attached" });
    expect(pool.waiting()).to.equal(0);
    // A transaction whose PSAM was just lost with its terminal waits for one to appear.
    const lost = acquire({ currency: EUR, waitWhenEmpty: true }, 1_000);
    await settle();
    expect(lost.error).to.equal(undefined);
    pool.updateTerminal({ terminalId: "t0", slots: [slot("00")] });
    await lost.done;
    expect(leaseOf(lost).key).to.equal("t0/00");
    // A request waiting for a busy PSAM waits on when the pool empties, until its deadline.
    const busy = acquire({ currency: EUR }, 100);
    await settle();
    pool.removeTerminal("t0");
    clock.advance(99);
    await settle();
    expect(busy.error).to.equal(undefined);
    clock.advance(1);
    await busy.done;
    expect(busy.error).to.be.instanceOf(NoPsamFree);

    pool.updateTerminal({
      terminalId: "t1",
      slots: [slot("aa", { currencies: [EUR], keyVersions: [1] }), slot("bb", { currencies: [USD], keyVersions: [2] })],
    });
    const cur = acquire({ currency: 124 });
    const kv = acquire({ currency: EUR, keyVersion: 3 });
    const kvOtherCurrency = acquire({ currency: EUR, keyVersion: 2 });
    await Promise.all([cur.done, kv.done, kvOtherCurrency.done]);
    expect(cur.error).to.be.instanceOf(NoPsamFits).and.to.include({ what: "currency", message: "no PSAM in the pool accepts currency 124" });
    expect(kv.error).to.be.instanceOf(NoPsamFits).and.to.include({ what: "keyVersion", message: "no PSAM in the pool holds key version 3" });
    expect(kvOtherCurrency.error, "bb holds key version 2, but not for EUR").to.be.instanceOf(NoPsamFits).and.to.include({ what: "keyVersion" });
    expect(pool.waiting()).to.equal(0);
  });

  it("ends a request at its deadline with NoPsamFree, and gives the PSAM it waited for to the next waiter", async () => {
    const { pool, clock, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    const holder = acquire({ currency: EUR });
    await holder.done;
    const short = acquire({ currency: EUR }, 100);
    const byKey = acquire({ key: "t1/aa" }, 100);
    const long = acquire({ currency: EUR }, 1_000);
    clock.advance(99);
    await settle();
    expect(short.error).to.equal(undefined);
    clock.advance(1);
    await Promise.all([short.done, byKey.done]);
    expect(short.error).to.be.instanceOf(NoPsamFree).with.property("message", "all 1 PSAMs that fit were busy until the deadline");
    expect(byKey.error).to.be.instanceOf(NoPsamFree).with.property("message", "PSAM t1/aa did not become free in time");
    expect(pool.waiting()).to.equal(1);
    pool.release(leaseOf(holder));
    await settle();
    expect(long.lease?.key).to.equal("t1/aa");
    const past = acquire({ currency: EUR }, 0);
    await past.done;
    expect(past.error, "a deadline already past ends at once").to.be.instanceOf(NoPsamFree);
  });

  it("ignores a late release of an older lease of the same PSAM", async () => {
    const { pool, released, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    const first = acquire({});
    await first.done;
    pool.release(leaseOf(first));
    const second = acquire({});
    await second.done;
    expect(second.lease?.key).to.equal("t1/aa");
    const waiter = acquire({});
    pool.release(leaseOf(first));
    await settle();
    expect(pool.counts()).to.deep.equal({ free: 0, leased: 1, total: 1 });
    expect(waiter.lease, "aa is still leased to the second request").to.equal(undefined);
    expect(released.map((l) => l.id)).to.deep.equal([leaseOf(first).id]);
    pool.release(leaseOf(second));
    await settle();
    expect(waiter.lease?.key).to.equal("t1/aa");
  });

  it("forgets a removed terminal's PSAMs and their leases, and serves its waiters when the terminal comes back", async () => {
    const { pool, released, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb")] });
    pool.updateTerminal({ terminalId: "t2", slots: [slot("cc")] });
    const a = acquire({ key: "t1/aa" });
    await a.done;
    pool.removeTerminal("t1");
    expect(pool.has("t1/aa")).to.equal(false);
    expect(pool.counts()).to.deep.equal({ free: 1, leased: 0, total: 1 });
    pool.release(leaseOf(a));
    expect(released, "a lease of a forgotten PSAM is not given back").to.deep.equal([]);
    const forAa = acquire({ key: "t1/aa" });
    const forEur = acquire({ currency: EUR, exclude: new Set(["t2/cc"]) });
    await settle();
    expect(forAa.lease).to.equal(undefined);
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    await settle();
    expect(forAa.lease?.key).to.equal("t1/aa");
    expect(forEur.lease).to.equal(undefined);
    pool.release(leaseOf(a));
    expect(pool.counts(), "the old lease does not free the new one").to.deep.equal({ free: 1, leased: 1, total: 2 });
    // A terminal update that leaves a slot out forgets that slot too.
    pool.updateTerminal({ terminalId: "t1", slots: [] });
    expect(pool.counts()).to.deep.equal({ free: 1, leased: 0, total: 1 });
  });

  it("takes a failed PSAM out of the pool until its terminal says it is ready again", async () => {
    const { pool, acquire } = modelPool();
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    const a = acquire({});
    await a.done;
    pool.markFailed(leaseOf(a));
    pool.release(leaseOf(a));
    const next = acquire({});
    await settle();
    expect(next.lease).to.equal(undefined);
    expect(pool.counts()).to.deep.equal({ free: 0, leased: 0, total: 1 });
    pool.updateSlot("t1", { psamId: "aa", ready: true });
    await settle();
    expect(next.lease?.key).to.equal("t1/aa");
  });

  it("refuses at once a request that would wait when the queue is full, and still serves one that need not wait", async () => {
    const { pool, clock, acquire } = modelPool({ maxWaiters: 2 });
    pool.updateTerminal({ terminalId: "t1", slots: [slot("aa"), slot("bb", { currencies: [USD] })] });
    const holder = acquire({ currency: EUR });
    await holder.done;
    const w1 = acquire({ currency: EUR }, 100);
    const w2 = acquire({ currency: EUR }, 200);
    const w3 = acquire({ currency: EUR }, 200);
    const usd = acquire({ currency: USD });
    await settle();
    expect(w3.error).to.be.instanceOf(NoPsamFree);
    expect(w3.error?.message).to.match(/queue for PSAMs is full \(2 /);
    expect(usd.lease?.key).to.equal("t1/bb");
    expect(pool.waiting()).to.equal(2);
    clock.advance(100);
    await w1.done;
    const w4 = acquire({ currency: EUR }, 200);
    await settle();
    expect(w4.error, "a waiter left, so there is room again").to.equal(undefined);
    expect(w2.error).to.equal(undefined);

    const big = modelPool();
    big.pool.updateTerminal({ terminalId: "t1", slots: [slot("aa")] });
    await big.acquire({}).done;
    const many = Array.from({ length: DEFAULT_MAX_WAITERS + 1 }, () => big.acquire({}));
    await settle();
    expect(many.filter((r) => r.error).length, `by default ${DEFAULT_MAX_WAITERS} may wait`).to.equal(1);
    expect(many.at(-1)?.error).to.be.instanceOf(NoPsamFree);
  });

  describe("property: random acquires, releases, terminal updates and timeouts", () => {
    const TERMINALS = { t1: ["a1", "a2", "a3"], t2: ["b1", "b2"] } as const;
    type Terminal = keyof typeof TERMINALS;
    const KEYS = (Object.keys(TERMINALS) as Terminal[]).flatMap((t) => TERMINALS[t].map((p) => `${t}/${p}`));
    const MAX_WAITERS = 4;

    interface Props {
      currencies: number[];
      keyVersions: number[];
    }
    type Step =
      | { kind: "acquire"; want: Want; wait: number }
      | { kind: "release"; pick: number }
      | { kind: "announce"; terminal: Terminal; present: boolean[]; ready: boolean[] }
      | { kind: "slot"; key: string; ready: boolean }
      | { kind: "fail"; pick: number }
      | { kind: "remove"; terminal: Terminal }
      | { kind: "clear" }
      | { kind: "advance"; ms: number };

    const props: fc.Arbitrary<Props> = fc.record({
      currencies: fc.subarray([EUR, USD], { minLength: 1 }),
      keyVersions: fc.subarray([1, 2], { minLength: 1 }),
    });
    const want: fc.Arbitrary<Want> = fc
      .record({
        currency: fc.constantFrom(undefined, EUR, EUR, USD, 124),
        keyVersion: fc.constantFrom(undefined, 1, 1, 2, 3),
        exclude: fc.subarray(KEYS, { maxLength: 3 }),
        key: fc.option(fc.constantFrom(...KEYS), { freq: 4, nil: undefined }),
        waitWhenEmpty: fc.boolean(),
      })
      .map(({ currency, keyVersion, exclude, key, waitWhenEmpty }) => ({
        ...(currency !== undefined ? { currency } : {}),
        ...(keyVersion !== undefined ? { keyVersion } : {}),
        ...(exclude.length > 0 ? { exclude: new Set(exclude) } : {}),
        ...(key !== undefined ? { key } : {}),
        ...(waitWhenEmpty ? { waitWhenEmpty } : {}),
      }));
    const step: fc.Arbitrary<Step> = fc.oneof(
      { arbitrary: fc.record({ kind: fc.constant("acquire" as const), want, wait: fc.integer({ min: 0, max: 40 }) }), weight: 8 },
      { arbitrary: fc.record({ kind: fc.constant("release" as const), pick: fc.nat() }), weight: 6 },
      {
        arbitrary: fc.record({
          kind: fc.constant("announce" as const),
          terminal: fc.constantFrom("t1" as const, "t2" as const),
          present: fc.array(fc.boolean(), { minLength: 3, maxLength: 3 }).map((a) => a.map((x, i) => x || i === 0)),
          ready: fc.array(fc.oneof({ arbitrary: fc.constant(true), weight: 3 }, { arbitrary: fc.constant(false), weight: 1 }), { minLength: 3, maxLength: 3 }),
        }),
        weight: 3,
      },
      { arbitrary: fc.record({ kind: fc.constant("slot" as const), key: fc.constantFrom(...KEYS), ready: fc.boolean() }), weight: 2 },
      { arbitrary: fc.record({ kind: fc.constant("fail" as const), pick: fc.nat() }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant("remove" as const), terminal: fc.constantFrom("t1" as const, "t2" as const) }), weight: 1 },
      { arbitrary: fc.constant({ kind: "clear" as const }), weight: 1 },
      { arbitrary: fc.record({ kind: fc.constant("advance" as const), ms: fc.integer({ min: 1, max: 30 }) }), weight: 4 },
    );

    interface ModelSlot extends Props {
      ready: boolean;
      lease: Lease | undefined;
      /** Order of last lease, 0 for never since it appeared. */
      lastUse: number;
    }
    interface Req {
      n: number;
      want: Want;
      deadline: number;
      state: "new" | "waiting" | "served" | "failed";
      outcome?: { lease: Lease } | { error: Error };
    }

    /** Whether a PSAM could serve a request, free or not: the rule's "can use". */
    const canUse = (key: string, s: Props, w: Want) =>
      w.key !== undefined
        ? w.key === key
        : !w.exclude?.has(key) &&
          (w.currency === undefined || s.currencies.includes(w.currency)) &&
          (w.keyVersion === undefined || s.keyVersions.includes(w.keyVersion));

    async function run(universe: Record<string, Props>, steps: Step[]): Promise<void> {
      const propsOf = (key: string): Props => {
        const p = universe[key];
        if (!p) throw new Error(`no properties for ${key}`);
        return p;
      };
      const clock = new ModelClock();
      const pool = new PsamPool(() => undefined, { clock, maxWaiters: MAX_WAITERS });
      const slots = new Map<string, ModelSlot>();
      const reqs: Req[] = [];
      const leases: Lease[] = [];
      let uses = 0;
      /** Settled requests, in the order the pool settled them. */
      let events: Req[] = [];

      const free = (s: ModelSlot) => s.ready && s.lease === undefined;
      const waiting = () => reqs.filter((r) => r.state === "waiting");
      const forget = (key: string) => slots.delete(key);
      const announce = (t: Terminal, present: boolean[], ready: boolean[]) => {
        const infos: SlotInfo[] = [];
        TERMINALS[t].forEach((p, i) => {
          const key = `${t}/${p}`;
          if (!present[i]) return void forget(key);
          const old = slots.get(key);
          const info: SlotInfo = { psamId: p, ...propsOf(key), ready: ready[i] ?? true };
          slots.set(key, { ...propsOf(key), ready: info.ready, lease: old?.lease, lastUse: old?.lastUse ?? 0 });
          infos.push(info);
        });
        pool.updateTerminal({ terminalId: t, slots: infos });
      };

      for (const [i, s] of steps.entries()) {
        const where = `step ${i} ${JSON.stringify(s, (_k, v: unknown) => (v instanceof Set ? [...(v as Set<string>)] : v))}`;
        let fresh: Req | undefined;
        const misfit = ({ key, currency, keyVersion, waitWhenEmpty }: Want): "none" | "currency" | "keyVersion" | undefined => {
          const all = [...slots.values()];
          if (key !== undefined) return undefined;
          if (all.length === 0) return waitWhenEmpty ? undefined : "none";
          const accepts = (x: Props) => currency === undefined || x.currencies.includes(currency);
          if (!all.some(accepts)) return "currency";
          if (keyVersion !== undefined && !all.some((x) => accepts(x) && x.keyVersions.includes(keyVersion))) return "keyVersion";
          return undefined;
        };
        let expectMisfit: "none" | "currency" | "keyVersion" | undefined;
        let waitingBefore = 0;
        switch (s.kind) {
          case "acquire": {
            expectMisfit = misfit(s.want);
            waitingBefore = waiting().length;
            fresh = { n: reqs.length, want: s.want, deadline: clock.now() + s.wait, state: "new" };
            const r = fresh;
            reqs.push(r);
            void pool.acquire(s.want, r.deadline).then(
              (lease) => {
                r.outcome = { lease };
                events.push(r);
              },
              (error: Error) => {
                r.outcome = { error };
                events.push(r);
              },
            );
            break;
          }
          case "release": {
            const l = leases[s.pick % Math.max(1, leases.length)];
            if (!l) break;
            const m = slots.get(l.key);
            if (m?.lease?.id === l.id) m.lease = undefined;
            pool.release(l);
            break;
          }
          case "announce":
            announce(s.terminal, s.present, s.ready);
            break;
          case "slot": {
            const m = slots.get(s.key);
            if (m) m.ready = s.ready;
            const [t, p] = s.key.split("/") as [string, string];
            pool.updateSlot(t, { psamId: p, ready: s.ready });
            break;
          }
          case "fail": {
            const l = leases[s.pick % Math.max(1, leases.length)];
            if (!l) break;
            const m = slots.get(l.key);
            if (m) m.ready = false;
            pool.markFailed(l);
            break;
          }
          case "remove":
            for (const k of [...slots.keys()]) if (k.startsWith(`${s.terminal}/`)) forget(k);
            pool.removeTerminal(s.terminal);
            break;
          case "clear":
            slots.clear();
            pool.clear();
            break;
          case "advance":
            clock.advance(s.ms);
            break;
        }
        await settle();

        // What the pool did in this step, in the order it did it.
        for (const r of events) {
          const earlierWaiting = reqs.filter((x) => x.n < r.n && x.state === "waiting");
          const outcome = r.outcome;
          if (!outcome) throw new Error(`${where}: request ${r.n} settled without an outcome`);
          if ("lease" in outcome) {
            const l = outcome.lease;
            const m = slots.get(l.key);
            expect(r === fresh || r.state === "waiting", `${where}: only a new or waiting request is served`).to.equal(true);
            if (!m) throw new Error(`${where}: request ${r.n} got ${l.key}, which is not in the pool`);
            expect(free(m), `${where}: (c) ${l.key} is free when request ${r.n} gets it`).to.equal(true);
            expect(canUse(l.key, m, r.want), `${where}: request ${r.n} can use ${l.key}`).to.equal(true);
            for (const [k, x] of slots)
              expect(free(x) && canUse(k, x, r.want) && x.lastUse < m.lastUse, `${where}: ${k} was less recently used than ${l.key}`).to.equal(false);
            for (const e of earlierWaiting) expect(canUse(l.key, m, e.want), `${where}: (b) request ${e.n} came first and can use ${l.key}`).to.equal(false);
            m.lease = l;
            m.lastUse = ++uses;
            leases.push(l);
            r.state = "served";
          } else {
            const e = outcome.error;
            if (r === fresh && expectMisfit) {
              expect(e, where).to.be.instanceOf(NoPsamFits).and.to.include({ what: expectMisfit });
            } else if (r === fresh && /queue/.test(e.message)) {
              expect(e, where).to.be.instanceOf(NoPsamFree);
              expect(waitingBefore, `${where}: refused for a full queue`).to.equal(MAX_WAITERS);
              for (const [k, x] of slots)
                if (free(x) && canUse(k, x, r.want))
                  expect(
                    earlierWaiting.some((w) => canUse(k, x, w.want)),
                    `${where}: refused while ${k} was free for it`,
                  ).to.equal(true);
            } else {
              expect(e, where).to.be.instanceOf(NoPsamFree);
              expect(r.deadline, `${where}: request ${r.n} timed out only at its deadline`).to.be.at.most(clock.now());
            }
            r.state = "failed";
          }
        }
        events = [];
        if (fresh?.state === "new") {
          expect(expectMisfit, `${where}: a request no PSAM fits is refused at once`).to.equal(undefined);
          expect(waitingBefore, `${where}: the queue has room`).to.be.below(MAX_WAITERS);
          expect(fresh.deadline, `${where}: a request past its deadline does not wait`).to.be.above(clock.now());
          fresh.state = "waiting";
        }

        // After every step.
        const queue = waiting();
        for (const r of queue) expect(r.deadline, `${where}: request ${r.n} waits past its deadline`).to.be.above(clock.now());
        for (const [qi, r] of queue.entries())
          for (const [k, x] of slots)
            if (free(x) && canUse(k, x, r.want))
              expect(
                queue.slice(0, qi).some((e) => canUse(k, x, e.want)),
                `${where}: (a) request ${r.n} waits while ${k} is free and no earlier waiter can use it`,
              ).to.equal(true);
        const held = [...slots.values()].flatMap((x) => (x.lease ? [x.lease.key] : []));
        expect(new Set(held).size, `${where}: (c) no PSAM leased twice`).to.equal(held.length);
        expect(pool.counts(), `${where}: (d) counts`).to.deep.equal({
          free: [...slots.values()].filter(free).length,
          leased: held.length,
          total: slots.size,
        });
        expect(pool.waiting(), `${where}: waiters`).to.equal(queue.length);
      }
    }

    it(`holds the allocation rule over ${RUNS} random sequences`, async function () {
      this.timeout(0);
      const universe = fc.record(Object.fromEntries(KEYS.map((k) => [k, props])));
      const started = performance.now();
      await fc.assert(
        fc.asyncProperty(universe, fc.array(step, { minLength: 1, maxLength: 80, size: "max" }), (u, steps) => run(u, steps)),
        { numRuns: RUNS },
      );
      console.log(`      ${RUNS} sequences in ${Math.round(performance.now() - started)} ms`);
    });
  });
});
