// The SQLite store commits without syncing and syncs the write-ahead log
// itself, once for every commit made before the sync began: no call is
// answered before what it wrote, or could have read, is on disk; concurrent
// writers share syncs; a process killed at any moment keeps every write it
// was answered for.

import { expect } from "chai";
import { spawn } from "node:child_process";
import { statSync } from "node:fs";
import { join } from "node:path";
import Database from "better-sqlite3";
import { openSqlite, StoreUnavailable } from "../../lib/store/db.js";
import { processStats } from "../../lib/stats.js";
import { tempDir } from "../support/fixtures.js";

const MIGRATIONS = ["CREATE TABLE steps (id INTEGER PRIMARY KEY, what TEXT NOT NULL)"];
const fsyncs = () => processStats().fsyncs;

describe("SQLite store: group commit", () => {
  it("answers a write only after a sync that began after its commit", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "s.db"), MIGRATIONS);
    try {
      for (let i = 0; i < 5; i++) {
        const before = fsyncs();
        await db.run("INSERT INTO steps (what) VALUES (?)", [`step ${i}`]);
        expect(fsyncs(), `write ${i}`).to.be.greaterThan(before);
        const before2 = fsyncs();
        await db.transaction(async (tx) => {
          await tx.run("INSERT INTO steps (what) VALUES (?)", [`tx ${i}`]);
        });
        expect(fsyncs(), `transaction ${i}`).to.be.greaterThan(before2);
      }
    } finally {
      await db.close();
      await cleanup();
    }
  });

  it("holds a read that could see an unsynced write until that write is on disk, and answers a quiet read at once", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "s.db"), MIGRATIONS);
    try {
      await db.run("INSERT INTO steps (what) VALUES ('first')");
      const quiet = fsyncs();
      expect(await db.get<{ n: number }>("SELECT COUNT(*) AS n FROM steps")).to.deep.equal({ n: 1 });
      expect(fsyncs(), "a read with nothing unsynced makes no sync").to.equal(quiet);
      const writing = db.run("INSERT INTO steps (what) VALUES ('second')");
      const before = fsyncs();
      const seen = await db.get<{ n: number }>("SELECT COUNT(*) AS n FROM steps");
      expect(seen).to.deep.equal({ n: 2 });
      expect(fsyncs(), "the read that saw the second row waited for its sync").to.be.greaterThan(before);
      await writing;
    } finally {
      await db.close();
      await cleanup();
    }
  });

  it("hands a transaction's outcome over before its sync when asked, and says when the sync is done", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "s.db"), MIGRATIONS);
    try {
      const before = fsyncs();
      const { value, synced } = await db.transactionBeforeSync(async (tx) => {
        await tx.run("INSERT INTO steps (id, what) VALUES (7, 'claimed')");
        return tx.get<{ what: string }>("SELECT what FROM steps WHERE id = 7");
      });
      expect(value).to.deep.equal({ what: "claimed" });
      expect(fsyncs(), "no sync yet when the outcome is handed over").to.equal(before);
      await synced;
      expect(fsyncs()).to.be.greaterThan(before);
    } finally {
      await db.close();
      await cleanup();
    }
  });

  it("holds a read of another connection's commit (an operator's tool) until a sync, and syncs a write made through get", async () => {
    const { dir, cleanup } = await tempDir();
    const path = join(dir, "s.db");
    const db = openSqlite(path, MIGRATIONS);
    const tool = new Database(path);
    tool.pragma("synchronous = OFF"); // the worst case: it never syncs its own commit
    try {
      await db.get("SELECT 1");
      tool.prepare("INSERT INTO steps (id, what) VALUES (1, 'deposit by a tool')").run();
      const before = fsyncs();
      expect(await db.get("SELECT what FROM steps WHERE id = 1")).to.deep.equal({ what: "deposit by a tool" });
      expect(fsyncs(), "the read that saw the tool's commit waited for a sync").to.be.greaterThan(before);
      const before2 = fsyncs();
      expect(await db.get("UPDATE steps SET what = 'changed' WHERE id = 1 RETURNING what")).to.deep.equal({ what: "changed" });
      expect(fsyncs(), "a write through get is synced before it is answered").to.be.greaterThan(before2);
    } finally {
      tool.close();
      await db.close();
      await cleanup();
    }
  });

  it("stops answering for good after a failed sync: a later sync could succeed without the lost pages", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "s.db"), MIGRATIONS);
    try {
      await db.run("INSERT INTO steps (id, what) VALUES (1, 'synced')");
      // Fault injection: the store's own descriptor of the log is closed under it, so its next fdatasync fails.
      const wal = (db as unknown as { wal: { close(): Promise<void> } }).wal;
      await wal.close();
      const failure = async (p: Promise<unknown>) =>
        p.then(
          () => "answered",
          (e: Error) => e.message,
        );
      expect(await failure(db.run("INSERT INTO steps (id, what) VALUES (2, 'not synced')"))).to.not.equal("answered");
      expect(await failure(db.get("SELECT COUNT(*) AS n FROM steps"))).to.match(/could not be synced.*restart the service/);
      const error = await db.get("SELECT 1").catch((e: unknown) => e);
      expect(error).to.be.instanceOf(StoreUnavailable);
      expect(await failure(db.transaction((tx) => tx.run("INSERT INTO steps (id, what) VALUES (3, 'x')")))).to.match(/restart the service/);
    } finally {
      await cleanup();
    }
  });

  it("lets 200 concurrent writers share a handful of syncs, and every row is there after reopening", async () => {
    const { dir, cleanup } = await tempDir();
    const path = join(dir, "s.db");
    const db = openSqlite(path, MIGRATIONS);
    try {
      const before = fsyncs();
      await Promise.all(
        Array.from({ length: 200 }, (_, i) =>
          db.transaction(async (tx) => {
            await tx.run("INSERT INTO steps (id, what) VALUES (?, ?)", [i + 1, `writer ${i}`]);
          }),
        ),
      );
      const syncs = fsyncs() - before;
      expect(syncs).to.be.within(1, 20);
      await db.close();
      const again = new Database(path, { readonly: true });
      expect(again.prepare("SELECT COUNT(*) AS n FROM steps").get()).to.deep.equal({ n: 200 });
      again.close();
    } finally {
      await cleanup();
    }
  });

  it("a failed transaction rolls back and writes nothing; the store goes on", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "s.db"), MIGRATIONS);
    try {
      await db.run("INSERT INTO steps (id, what) VALUES (1, 'kept')");
      const failed = db.transaction(async (tx) => {
        await tx.run("INSERT INTO steps (id, what) VALUES (2, 'rolled back')");
        await tx.run("INSERT INTO steps (id, what) VALUES (1, 'duplicate')");
      });
      const error = await failed.then(
        () => undefined,
        (e: Error) => e,
      );
      expect(error?.message).to.match(/UNIQUE/);
      expect(await db.all("SELECT id, what FROM steps ORDER BY id")).to.deep.equal([{ id: 1, what: "kept" }]);
    } finally {
      await db.close();
      await cleanup();
    }
  });

  it("checkpoints the log into the database file in a worker every thousand commits, so the log does not grow without end", async function () {
    this.timeout(30_000);
    const { dir, cleanup } = await tempDir();
    const path = join(dir, "s.db");
    const db = openSqlite(path, MIGRATIONS);
    const until = async (what: string, ok: () => boolean) => {
      for (let i = 0; !ok(); i++) {
        if (i > 200) throw new Error(`${what} did not happen`);
        await new Promise((r) => setTimeout(r, 25));
      }
    };
    try {
      const mainBefore = statSync(path).size;
      for (let i = 0; i < 1_100; i++) await db.run("INSERT INTO steps (what) VALUES (?)", ["x".repeat(200)]);
      await until("the first checkpoint", () => statSync(path).size > mainBefore + 100_000);
      const logAfterFirst = statSync(`${path}-wal`).size;
      // The log starts over once a checkpoint has copied all of it, though the writes never pause:
      // four thousand more commits do not make it four times longer.
      for (let i = 0; i < 4_000; i++) await db.run("INSERT INTO steps (what) VALUES (?)", ["y".repeat(200)]);
      expect(statSync(`${path}-wal`).size, "the log's length after 5,100 commits").to.be.lessThan(1.5 * logAfterFirst);
      expect(await db.get("SELECT COUNT(*) AS n FROM steps")).to.deep.equal({ n: 5_100 });
    } finally {
      await db.close();
      await cleanup();
    }
  });

  it("keeps every write a killed process was answered for", async function () {
    this.timeout(30_000);
    const { dir, cleanup } = await tempDir();
    const path = join(dir, "s.db");
    try {
      // A writer in a process of its own prints each id once its insert is answered; it is killed mid-stream.
      const script = `
        import { openSqlite } from "./lib/store/db.js";
        const db = openSqlite(${JSON.stringify(path)}, ${JSON.stringify(MIGRATIONS)});
        let next = 1;
        const writer = async () => { for (;;) { const id = next++; await db.run("INSERT INTO steps (id, what) VALUES (?, 'w')", [id]); process.stdout.write(id + "\\n"); } };
        for (let i = 0; i < 8; i++) writer();
      `;
      const child = spawn(process.execPath, ["--import", "tsx", "--input-type=module", "-e", script], {
        cwd: process.cwd(),
        stdio: ["ignore", "pipe", "inherit"],
      });
      const answered: number[] = [];
      let buffered = "";
      await new Promise<void>((resolve) => {
        child.stdout.on("data", (chunk: Buffer) => {
          buffered += chunk.toString();
          const lines = buffered.split("\n");
          buffered = lines.pop()!;
          for (const l of lines) answered.push(Number(l));
          if (answered.length >= 300 && !child.killed) {
            child.kill("SIGKILL");
            resolve();
          }
        });
      });
      await new Promise((r) => child.once("exit", r));
      const db = new Database(path, { readonly: true });
      const rows = new Set((db.prepare("SELECT id FROM steps").all() as { id: number }[]).map((r) => r.id));
      db.close();
      const lost = answered.filter((id) => !rows.has(id));
      expect(lost, "answered writes missing after the kill").to.deep.equal([]);
    } finally {
      await cleanup();
    }
  });
});
