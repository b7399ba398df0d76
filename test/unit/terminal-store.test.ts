// The terminal host's store keeps, of each debit clearing acknowledged, only
// its PSAM counter and transaction (for the ownership checks of jobs), and
// only as far back as a PSAM can still be asked about: it does not grow
// without end.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { openSqlite } from "../../lib/store/db.js";
import { CLEARED_DEBITS_KEPT, TERMINAL_MIGRATIONS, TerminalStore } from "../../services/terminal/store.js";
import { tempDir } from "../support/fixtures.js";

describe("terminal store: cleared debits", () => {
  it("keeps the transaction of the last cleared debits of each PSAM, and forgets those far older", async () => {
    const { dir, cleanup } = await tempDir();
    const db = openSqlite(join(dir, "terminal.db"), TERMINAL_MIGRATIONS);
    try {
      const store = new TerminalStore(db);
      const psam = "0000c1ea";
      const ids: string[] = [];
      const batch = async (batchNumber: number, from: number, to: number) => {
        const records = [];
        for (let c = from; c <= to; c++) {
          const id = randomUUID();
          ids[c] = id;
          records.push({
            psamCounter: c,
            purseId: randomBytes(8),
            keyVersion: 1,
            sessionCounter: c,
            challenge: randomBytes(8),
            cardCounter: c + 1,
            balanceAfter: 0,
            amount: 1,
            currency: 978,
            dateTime: 1_800_000_000,
            transactionRef: id,
            merchantId: "shop",
            cardSignature: randomBytes(8),
            recordMac: randomBytes(8),
          });
        }
        await store.recordTransactions(psam, batchNumber, records, "test");
        await store.acknowledge(psam, batchNumber, { posted: records.length, quarantined: 0, settlementDay: "2026-11-29" });
      };
      await batch(1, 1, 3000);
      expect(await store.settledTransaction(psam, 1)).to.equal(ids[1]);
      await batch(2, 3001, 6000);
      const newest = 6000;
      expect(await store.settledTransaction(psam, newest)).to.equal(ids[newest]);
      expect(await store.settledTransaction(psam, newest - CLEARED_DEBITS_KEPT)).to.equal(ids[newest - CLEARED_DEBITS_KEPT]);
      expect(await store.settledTransaction(psam, newest - CLEARED_DEBITS_KEPT - 1)).to.equal(undefined);
      expect(await store.settledTransaction(psam, 1)).to.equal(undefined);
      const rows = await db.get<{ n: number }>("SELECT COUNT(*) AS n FROM cleared_debits");
      expect(rows?.n).to.equal(CLEARED_DEBITS_KEPT + 1);
    } finally {
      await db.close();
      await cleanup();
    }
  });
});

describe("terminal store: owners of DEBIT commands", () => {
  it("a claim stays its first payment server's, in memory and on disk: another is refused, and a new store reads the same owner", async () => {
    const { dir, cleanup } = await tempDir();
    const path = join(dir, "terminal.db");
    const db = openSqlite(path, TERMINAL_MIGRATIONS);
    try {
      const store = new TerminalStore(db);
      const id = randomUUID();
      const first = await store.claim(id, "payment-1");
      await first.synced;
      expect(first.granted).to.equal(true);
      const second = await store.claim(id, "payment-2");
      await second.synced;
      expect(second.granted).to.equal(false);
      expect(await store.ownerOf(id)).to.equal("payment-1");
      expect(await new TerminalStore(db).ownerOf(id)).to.equal("payment-1");
      expect(await store.ownerOf(randomUUID())).to.equal(undefined);
    } finally {
      await db.close();
      await cleanup();
    }
  });
});
