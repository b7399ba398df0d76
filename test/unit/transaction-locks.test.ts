// Per-key locks across processes (lib/store/locks.ts): two stores on one
// PostgreSQL database stand for two replicas. A lock held by one keeps the
// other waiting (or its try refused), is released when its holder's
// connection dies, and is seen from the other; on SQLite the same interface
// is the in-process mutex.

import { expect } from "chai";
import { join } from "node:path";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { Status } from "nice-grpc";
import { LockBusy, transactionLocks } from "../../lib/store/locks.js";
import { openPostgres } from "../../lib/store/postgres.js";
import { tempDir } from "../support/fixtures.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The error a promise rejects with (the test fails if it resolves). */
async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error("it resolved; a rejection was expected");
    },
    (e: unknown) => e,
  );
}

/** Whether `e` is the lock's UNAVAILABLE, retryable answer to a caller whose deadline passed. */
function isLockBusy(e: unknown): void {
  expect(e).to.be.instanceOf(LockBusy);
  expect((e as LockBusy).code).to.equal(Status.UNAVAILABLE);
  expect((e as LockBusy).details).to.match(/before the call's deadline; nothing was done: retry$/);
}

/** Two stores of one database (lock pools of 4), as two replicas have; the suite skipped loudly without PostgreSQL. */
async function twoStores(ctx: Mocha.Context): Promise<{ pg: TestPostgres; a: Db; b: Db }> {
  const pg = await postgresOrSkip(ctx);
  return { pg, a: await openPostgres(pg.url, [], { lockPoolSize: 4 }), b: await openPostgres(pg.url, [], { lockPoolSize: 4 }) };
}

/** Closes what twoStores opened (a store a test abandoned is closed already). */
async function closeStores(pg: TestPostgres | undefined, a: Db | undefined, b: Db | undefined): Promise<void> {
  await a?.close().catch(() => undefined);
  await b?.close().catch(() => undefined);
  await pg?.stop();
}

describe("transaction locks", function () {
  this.timeout(30_000);

  describe("on PostgreSQL, shared by two stores of one database", () => {
    let pg: TestPostgres;
    let a: Db;
    let b: Db;
    before(async function () {
      ({ pg, a, b } = await twoStores(this));
    });
    after(() => closeStores(pg, a, b));

    it("keeps the second holder of a key waiting until the first is done, and runs other keys side by side", async () => {
      const la = transactionLocks(a, { namespace: "t1" });
      const lb = transactionLocks(b, { namespace: "t1" });
      expect(la.shared).to.equal(true);
      const order: string[] = [];
      let releaseA!: () => void;
      const aHolds = la.run("purchase-1", async () => {
        order.push("a in");
        await new Promise<void>((r) => (releaseA = r));
        order.push("a out");
      });
      await sleep(100);
      const bWaits = lb.run("purchase-1", async () => void order.push("b in"));
      const other = await lb.run("purchase-2", async () => "ran while a held purchase-1");
      expect(other).to.equal("ran while a held purchase-1");
      await sleep(200);
      expect(order).to.deep.equal(["a in"]);
      releaseA();
      await Promise.all([aHolds, bWaits]);
      expect(order).to.deep.equal(["a in", "a out", "b in"]);
    });

    it("refuses a try while another store holds the key (and tells it is held elsewhere), and takes it once free", async () => {
      const la = transactionLocks(a, { namespace: "t2" });
      const lb = transactionLocks(b, { namespace: "t2" });
      let releaseA!: () => void;
      const aHolds = la.run("k", () => new Promise<void>((r) => (releaseA = r)));
      await sleep(100);
      expect(await lb.tryRun("k", async () => "b ran")).to.deep.equal({ ran: false });
      expect([...(await lb.heldElsewhere(["k", "free"]))]).to.deep.equal(["k"]);
      // The holder itself is not "elsewhere": what it holds it knows.
      expect(la.heldHere("k")).to.equal(true);
      expect([...(await la.heldElsewhere(["k"]))]).to.deep.equal([]);
      // Another namespace is another lock.
      expect(await transactionLocks(b, { namespace: "t2-other" }).tryRun("k", async () => "ran")).to.deep.equal({ ran: true, value: "ran" });
      releaseA();
      await aHolds;
      expect(await lb.tryRun("k", async () => "b ran")).to.deep.equal({ ran: true, value: "b ran" });
      expect([...(await lb.heldElsewhere(["k"]))]).to.deep.equal([]);
    });

    it("is released by PostgreSQL when its holder's connections are dropped (a crash), and the waiter takes it at once", async () => {
      const c = await openPostgres(pg.url, []);
      const lc = transactionLocks(c, { namespace: "t3" });
      const lb = transactionLocks(b, { namespace: "t3" });
      let wrote: string | undefined;
      const cHolds = lc.run("k", async () => {
        await sleep(1_000);
        // What the dead holder does after its death reaches nothing.
        await c.run("SELECT 1").then(
          () => (wrote = "written"),
          (e: Error) => (wrote = e.constructor.name),
        );
      });
      await sleep(100);
      const started = Date.now();
      const bWaits = lb.run("k", async () => Date.now() - started);
      await sleep(100);
      await c.abandon?.();
      const waited = await bWaits;
      expect(waited, "ms b waited after the crash").to.be.below(900);
      await cHolds.catch(() => undefined);
      expect(wrote).to.equal("StoreUnavailable");
    });

    it("takes one lock connection per key at a time in a process: the tasks waiting for a key queue in the process, in order", async () => {
      const la = transactionLocks(a, { namespace: "t4" });
      let release!: () => void;
      const order: number[] = [];
      const first = la.run("one-key", () => new Promise<void>((r) => (release = r)));
      const queued = Array.from({ length: 9 }, (_, i) => la.run("one-key", async () => void order.push(i)));
      await sleep(200);
      const waiting = await b.get<{ n: number }>("SELECT COUNT(*) AS n FROM pg_locks WHERE locktype = 'advisory' AND NOT granted");
      expect(waiting?.n, "sessions waiting on the server for an advisory lock").to.equal(0);
      expect([...(await transactionLocks(b, { namespace: "t4" }).heldElsewhere(["one-key"]))]).to.deep.equal(["one-key"]);
      release();
      await Promise.all([first, ...queued]);
      expect(order).to.deep.equal([0, 1, 2, 3, 4, 5, 6, 7, 8]);
    });
  });

  describe("on PostgreSQL, bounded by the caller's deadline", () => {
    let pg: TestPostgres;
    let a: Db;
    let b: Db;
    before(async function () {
      ({ pg, a, b } = await twoStores(this));
    });
    after(() => closeStores(pg, a, b));

    it("waits for a key another store holds until the deadline, then UNAVAILABLE without running the task; the key is had once free", async () => {
      const la = transactionLocks(a, { namespace: "d1" });
      const lb = transactionLocks(b, { namespace: "d1" });
      let releaseA!: () => void;
      const aHolds = la.run("k", () => new Promise<void>((r) => (releaseA = r)));
      await sleep(100);
      let ran = false;
      const started = Date.now();
      isLockBusy(await rejection(lb.run("k", { deadline: Date.now() + 300 }, async () => void (ran = true))));
      expect(Date.now() - started, "ms waited").to.be.within(250, 1_000);
      expect(ran).to.equal(false);
      releaseA();
      await aHolds;
      expect(await lb.run("k", { deadline: Date.now() + 300 }, async () => "b ran")).to.equal("b ran");
    });

    it("waits for its turn behind this process's task of the key until the deadline; the task given up never runs", async () => {
      const la = transactionLocks(a, { namespace: "d2" });
      let release!: () => void;
      const first = la.run("k", () => new Promise<void>((r) => (release = r)));
      let ran = false;
      const started = Date.now();
      isLockBusy(await rejection(la.run("k", { deadline: Date.now() + 200 }, async () => void (ran = true))));
      expect(Date.now() - started, "ms waited").to.be.within(150, 1_000);
      release();
      await first;
      await sleep(100);
      expect(ran, "the task given up ran after all").to.equal(false);
    });

    it("with every lock connection taken (4), one more step waits until its deadline, not the pool's 5 s, and runs once one is free", async () => {
      const la = transactionLocks(a, { namespace: "d3" });
      const releases: (() => void)[] = [];
      const holding = [1, 2, 3, 4].map((i) => la.run(`k${i}`, () => new Promise<void>((r) => releases.push(r))));
      await sleep(200);
      const started = Date.now();
      const e = await rejection(la.run("k5", { deadline: Date.now() + 300 }, async () => "ran"));
      isLockBusy(e);
      expect((e as LockBusy).details).to.contain("no connection of the payment server's lock pool came free");
      expect(Date.now() - started, "ms waited").to.be.below(1_000);
      const waiting = la.run("k5", { deadline: Date.now() + 2_000 }, async () => "ran");
      await sleep(100);
      releases[0]?.();
      expect(await waiting).to.equal("ran");
      for (const r of releases) r();
      await Promise.all(holding);
    });

    it("never counts a lock its own sessions hold as held elsewhere, even between their lock and their task (the hold watcher's question)", async () => {
      const la = transactionLocks(a, { namespace: "d4" });
      let stop = false;
      let cycles = 0;
      const cycling = (async () => {
        while (!stop) {
          await la.run("k", async () => undefined);
          cycles++;
        }
      })();
      let looks = 0;
      let reported = 0;
      const until = Date.now() + 1_500;
      while (Date.now() < until) {
        looks++;
        if ((await la.heldElsewhere(["k"])).size > 0) reported++;
      }
      stop = true;
      await cycling;
      expect(cycles, "lock cycles").to.be.above(50);
      expect(looks, "looks").to.be.above(50);
      expect(reported, "looks that saw its own lock as another's").to.equal(0);
      // Another store's hold still is.
      let releaseB!: () => void;
      const bHolds = transactionLocks(b, { namespace: "d4" }).run("k", () => new Promise<void>((r) => (releaseB = r)));
      await sleep(100);
      expect([...(await la.heldElsewhere(["k"]))]).to.deep.equal(["k"]);
      releaseB();
      await bHolds;
    });

    it("a task that lets its lock go while it waits lets another store take the key meanwhile, and has it again after", async () => {
      const la = transactionLocks(a, { namespace: "d5" });
      const lb = transactionLocks(b, { namespace: "d5" });
      const order: string[] = [];
      const aRuns = la.run("k", { deadline: Date.now() + 2_000 }, async (held) => {
        order.push("a");
        const got = await held.without(
          async () => {
            expect(la.heldHere("k"), "held while let go").to.equal(false);
            await lb.run("k", { deadline: Date.now() + 1_000 }, async () => void order.push("b, while a waits"));
            return "a PSAM";
          },
          () => order.push("dropped"),
        );
        expect(la.heldHere("k")).to.equal(true);
        order.push(`a again, with ${got}`);
      });
      await aRuns;
      expect(order).to.deep.equal(["a", "b, while a waits", "a again, with a PSAM"]);

      // Not had again by the deadline (b holds it): what the wait got is dropped, and the task gets UNAVAILABLE.
      let releaseB!: () => void;
      let bHolds: Promise<void> | undefined;
      const dropped: string[] = [];
      const e = await rejection(
        la.run("k", { deadline: Date.now() + 400 }, (held) =>
          held.without(
            async () => {
              bHolds = lb.run("k", () => new Promise<void>((r) => (releaseB = r)));
              await sleep(300);
              return "a PSAM";
            },
            (got) => dropped.push(got),
          ),
        ),
      );
      isLockBusy(e);
      expect(dropped).to.deep.equal(["a PSAM"]);
      releaseB();
      await bHolds;
    });
  });

  describe("on SQLite", () => {
    it("is the in-process mutex: a try while a task holds the key runs nothing; nothing is held elsewhere", async () => {
      const { dir, cleanup } = await tempDir();
      const db = openSqlite(join(dir, "x.db"), []);
      try {
        const locks = transactionLocks(db, { namespace: "x" });
        expect(locks.shared).to.equal(false);
        let release!: () => void;
        const holding = locks.run("k", () => new Promise<void>((r) => (release = r)));
        expect(await locks.tryRun("k", async () => 1)).to.deep.equal({ ran: false });
        expect(locks.heldHere("k")).to.equal(true);
        expect([...(await locks.heldElsewhere(["k"]))]).to.deep.equal([]);
        release();
        await holding;
        expect(await locks.tryRun("k", async () => 1)).to.deep.equal({ ran: true, value: 1 });
        // Alone on its store, a task letting its lock go to wait keeps it: no one else could take it.
        await locks.run("k", (held) =>
          held.without(
            async () => expect(await locks.tryRun("k", async () => 1)).to.deep.equal({ ran: false }),
            () => undefined,
          ),
        );
        // Its turn behind another task of the key is bounded by the deadline too.
        let release2!: () => void;
        const second = locks.run("k", () => new Promise<void>((r) => (release2 = r)));
        isLockBusy(await rejection(locks.run("k", { deadline: Date.now() + 100 }, async () => 1)));
        release2();
        await second;
      } finally {
        await db.close();
        await cleanup();
      }
    });
  });
});
