// The migrations that replaced SQLite's rowid with a seq column of their own
// (issue #15): rows made before them are numbered in the order they were
// made, rows made after them follow, on SQLite (a store upgraded in place)
// and on PostgreSQL (which has no rowid).

import { expect } from "chai";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import type { Db } from "../../lib/store/db.js";
import { openStore } from "../../lib/store/postgres.js";
import { BANK_MIGRATIONS, BankStore } from "../../services/bank/store.js";
import { CLEARING_MIGRATIONS, ClearingStore } from "../../services/clearing/store.js";
import { tempDir } from "../support/fixtures.js";
import { defined } from "../support/offers.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";

/** An old hold, written as the bank wrote it before seq. */
const oldHold = (db: Db, accountId: string, id: string, createdAt: string) =>
  db.run(
    "INSERT INTO holds (transaction_id, account_id, purse_id, amount_minor, request_hash, offer, key_nonce, state, created_at) VALUES (?, ?, 'aa', 100, 'h', ?, ?, 'HELD', ?)",
    [id, accountId, Buffer.from("offer"), Buffer.alloc(16), createdAt],
  );

const oldAccount = (db: Db, accountId: string) =>
  db.run("INSERT INTO accounts (account_id, holder, currency, exponent, balance_minor, opened_at) VALUES (?, 'H', 978, 2, 100000, ?)", [
    accountId,
    new Date().toISOString(),
  ]);

for (const engine of ["SQLite", "PostgreSQL"] as const) {
  describe(`stores' sequence columns on ${engine}`, function () {
    this.timeout(60_000);
    let pg: TestPostgres | undefined;
    let cleanup: (() => Promise<void>) | undefined;
    /** Where a store of `name` is kept on this engine, and its schema there. */
    let location: (name: string) => string;

    before(async function () {
      if (engine === "PostgreSQL") {
        pg = await postgresOrSkip(this);
        const url = pg.url;
        location = () => url;
      } else {
        const t = await tempDir("netpurse-seq-");
        cleanup = t.cleanup;
        location = (name) => join(t.dir, `${name}.db`);
      }
    });
    after(async () => {
      await pg?.stop();
      await cleanup?.();
    });

    const schemaOf = (name: string) => `${name}_${randomBytes(4).toString("hex")}`;

    it("numbers the holds made before the migration per account, by time then id, and a new hold after the account's last", async () => {
      const name = schemaOf("bank");
      const old = await openStore(location(name), BANK_MIGRATIONS.slice(0, 2), { schema: name });
      const t1 = "2026-11-01T10:00:00.000Z";
      const t2 = "2026-11-01T10:00:00.500Z";
      try {
        await oldAccount(old, "a");
        await oldAccount(old, "b");
        await oldHold(old, "a", "a-later", t2);
        await oldHold(old, "a", "a-2", t1);
        await oldHold(old, "b", "b-1", t2);
        await oldHold(old, "a", "a-1", t1);
      } finally {
        await old.close();
      }
      const db = await openStore(location(name), BANK_MIGRATIONS, { schema: name });
      try {
        const seqs = await db.all<{ transaction_id: string; seq: number }>("SELECT transaction_id, seq FROM holds ORDER BY account_id, seq");
        expect(seqs).to.deep.equal([
          { transaction_id: "a-1", seq: 1 },
          { transaction_id: "a-2", seq: 2 },
          { transaction_id: "a-later", seq: 3 },
          { transaction_id: "b-1", seq: 1 },
        ]);
        const store = new BankStore(db);
        const template = defined(await store.hold("a-1"), "hold a-1");
        await db.transaction((tx) => store.insertHold(tx, { ...template, transaction_id: "a-new", created_at: t1 }));
        expect(await store.hold("a-new")).to.include({ seq: 4 });
        // Newest first, ties on created_at in the order made; page after page, each once.
        const first = await store.holdsPage("a", undefined, 2);
        expect(first.map((h) => h.transaction_id)).to.deep.equal(["a-later", "a-new"]);
        const rest = await store.holdsPage("a", first[1], 10);
        expect(rest.map((h) => h.transaction_id)).to.deep.equal(["a-2", "a-1"]);
      } finally {
        await db.close();
      }
    });

    it("numbers the access tokens made before the migration, and keeps an account's newest after it", async () => {
      const name = schemaOf("bank");
      const old = await openStore(location(name), BANK_MIGRATIONS.slice(0, 2), { schema: name });
      const at = "2026-11-01T10:00:00.000Z";
      try {
        await oldAccount(old, "a");
        await old.run("INSERT INTO credentials (account_id, password_hash, set_at) VALUES ('a', 'hash', ?)", [at]);
        for (const t of ["t3", "t1", "t2"])
          await old.run("INSERT INTO access_tokens (token_hash, account_id, issued_at, expires_at) VALUES (?, 'a', ?, ?)", [t, at, "2999-01-01T00:00:00.000Z"]);
      } finally {
        await old.close();
      }
      const db = await openStore(location(name), BANK_MIGRATIONS, { schema: name });
      try {
        expect(await db.all("SELECT token_hash, seq FROM access_tokens ORDER BY seq")).to.deep.equal([
          { token_hash: "t1", seq: 1 },
          { token_hash: "t2", seq: 2 },
          { token_hash: "t3", seq: 3 },
        ]);
        const store = new BankStore(db);
        // Two new tokens in the same millisecond, keeping 3: the two oldest go.
        for (const t of ["n1", "n2"]) {
          expect(
            await store.addAccessToken({ tokenHash: t, accountId: "a", issuedAt: new Date(at), expiresAt: new Date("2999-01-01T00:00:00Z") }, 3, "hash"),
          ).to.equal(true);
        }
        expect(await db.all("SELECT token_hash, seq FROM access_tokens ORDER BY seq")).to.deep.equal([
          { token_hash: "t3", seq: 3 },
          { token_hash: "n1", seq: 4 },
          { token_hash: "n2", seq: 5 },
        ]);
      } finally {
        await db.close();
      }
    });

    it("numbers the batches accepted before the migration under each batch number by when they came, and the first stays the one shown", async () => {
      const name = schemaOf("clearing");
      const old = await openStore(location(name), CLEARING_MIGRATIONS.slice(0, 2), { schema: name });
      const batch = (mac: string, receivedAt: string, batchNumber = 7) =>
        old.run(
          `INSERT INTO batches (psam_id, batch_number, terminal_id, record_count, total_minor, currency, batch_mac, closed_at, posted, quarantined,
             settlement_day, received_at, resubmissions) VALUES ('c1ea0001', ?, 't', 1, 99, 978, ?, NULL, 1, 0, '2026-11-01', ?, 0)`,
          [batchNumber, mac, receivedAt],
        );
      try {
        await batch("ff", "2026-11-01T10:00:01.000Z");
        await batch("00", "2026-11-01T10:00:00.000Z");
        await batch("aa", "2026-11-01T10:00:00.000Z", 8);
      } finally {
        await old.close();
      }
      const db = await openStore(location(name), CLEARING_MIGRATIONS, { schema: name });
      try {
        expect(await db.all("SELECT batch_number, batch_mac, seq FROM batches ORDER BY batch_number, seq")).to.deep.equal([
          { batch_number: 7, batch_mac: "00", seq: 1 },
          { batch_number: 7, batch_mac: "ff", seq: 2 },
          { batch_number: 8, batch_mac: "aa", seq: 1 },
        ]);
        const store = new ClearingStore(db);
        expect(await store.batch("c1ea0001", 7)).to.include({ batch_mac: "00" });
        const later = { ...defined(await store.batch("c1ea0001", 8), "batch 8"), batch_mac: "01", received_at: "2026-11-01T09:00:00.000Z" };
        await db.transaction((q) => store.insertBatch(q, later));
        // Accepted later, even with an earlier clock: the one shown stays the first.
        expect(await store.batch("c1ea0001", 8)).to.include({ batch_mac: "aa" });
        expect(await db.get("SELECT seq FROM batches WHERE batch_mac = '01'")).to.deep.equal({ seq: 2 });
      } finally {
        await db.close();
      }
    });
  });
}
