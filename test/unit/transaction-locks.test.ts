// Per-key locks across processes (lib/store/locks.ts): two stores on one
// PostgreSQL database stand for two replicas. A lock held by one keeps the
// other waiting (or its try refused), is released when its holder's
// connection dies, and is seen from the other; on SQLite the same interface
// is the in-process mutex.

import { expect } from "chai";
import { join } from "node:path";
import { openSqlite, type Db } from "../../lib/store/db.js";
import { transactionLocks } from "../../lib/store/locks.js";
import { openPostgres } from "../../lib/store/postgres.js";
import { tempDir } from "../support/fixtures.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe("transaction locks", function () {
  this.timeout(30_000);

  describe("on PostgreSQL, shared by two stores of one database", () => {
    let pg: TestPostgres;
    let a: Db;
    let b: Db;
    before(async function () {
      pg = await postgresOrSkip(this);
      a = await openPostgres(pg.url, [], { lockPoolSize: 4 });
      b = await openPostgres(pg.url, [], { lockPoolSize: 4 });
    });
    after(async () => {
      await a?.close().catch(() => undefined);
      await b?.close();
      await pg?.stop();
    });

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
      } finally {
        await db.close();
        await cleanup();
      }
    });
  });
});
