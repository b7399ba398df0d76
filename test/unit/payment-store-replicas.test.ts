// What the payment store gives replicas sharing its database, by one test
// body on SQLite and on PostgreSQL: a state change is made from the state
// its actor read, so a second actor's change (one that lost its lock
// without knowing) changes nothing; and the per-purse bound counts the
// draw requests being worked on in the database, giving each place back
// with the purchase's move out of RECEIVED, and ignoring places past their time.

import { expect } from "chai";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import type { Db } from "../../lib/store/db.js";
import { openStore } from "../../lib/store/postgres.js";
import { PAYMENT_MIGRATIONS, PaymentStore, type NewPurchase, type Purchase } from "../../services/payment/store.js";
import { tempDir } from "../support/fixtures.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";

const PURSE = "0102030405060708";

function newPurchase(id: string = randomUUID(), purse = PURSE): NewPurchase {
  return {
    transaction_id: id,
    request_hash: "h",
    merchant_id: "demo-shop",
    amount_minor: 99,
    currency: 978,
    exponent: 2,
    purse_id: purse,
    card_counter: 1,
    card_balance: 10_000,
    key_version: 1,
    confirmation_mode: 2,
    completion_token: Buffer.alloc(16, 1),
    key_nonce: Buffer.alloc(16, 2),
    encrypted_session_key: Buffer.alloc(8, 3),
  };
}

const later = (ms: number) => new Date(Date.now() + ms).toISOString();
const received = { step: "draw_request_received", detail: "test" };
const signed = {
  state: "DEBIT_COMMAND_ISSUED" as const,
  terminal_id: "terminal-1",
  psam_id: "0a0b0c0d",
  psam_counter: 1,
  debit_command: Buffer.alloc(4),
  expected_card_signature: null,
};

function storeSuite(name: string, open: (ctx: Mocha.Context) => Promise<{ db: Db; done: () => Promise<void> }>) {
  describe(`payment store for replicas, on ${name}`, function () {
    this.timeout(30_000);
    let db: Db;
    let done: () => Promise<void>;
    let store: PaymentStore;
    before(async function () {
      ({ db, done } = await open(this));
      store = new PaymentStore(db);
    });
    after(async () => done?.());

    async function inserted(id: string = randomUUID()): Promise<Purchase> {
      const p = await store.reserveDraw(PURSE, { insert: newPurchase(id), event: received }, 100, later(60_000));
      if (typeof p !== "object") throw new Error(`not inserted: ${String(p)}`);
      return p;
    }

    it("a second actor's move from a state the first moved on changes nothing, and logs nothing", async () => {
      const p = await inserted();
      // Two actors read RECEIVED; the first ends it, the second (its lock lost) would sign.
      const first = await store.transition(
        p.transaction_id,
        [p.state],
        { state: "REFUSED", error_code: 9, error_reason: 0, error_message: "ended" },
        { step: "draw_request_abandoned", detail: "first" },
      );
      expect(first?.state).to.equal("REFUSED");
      const second = await store.transition(p.transaction_id, [p.state], signed, { step: "debit_command_issued", detail: "second" });
      expect(second).to.equal(undefined);
      expect((await store.require(p.transaction_id)).state).to.equal("REFUSED");
      expect((await store.events(p.transaction_id)).map((e) => e.step)).to.deep.equal(["draw_request_received", "draw_request_abandoned"]);
    });

    it("counts a purse's places and unanswered DEBIT commands against the bound, and refuses at it without recording", async () => {
      const purse = "1111111111111111";
      const reserve = (id: string, until = later(60_000)) => store.reserveDraw(purse, { insert: newPurchase(id, purse), event: received }, 2, until);
      const a = await reserve(randomUUID());
      const b = await reserve(randomUUID());
      expect(typeof a).to.equal("object");
      expect(typeof b).to.equal("object");
      const over = randomUUID();
      expect(await reserve(over), "two places taken").to.equal(2);
      expect(await store.get(over), "not recorded").to.equal(undefined);
      // a is signed: its place goes, and it counts as awaiting the card's answer instead.
      await store.transition((a as Purchase).transaction_id, ["RECEIVED"], signed, { step: "debit_command_issued", detail: "" });
      expect(await store.awaitingCardAnswer(purse)).to.equal(1);
      expect(await reserve(over), "one awaiting, one place").to.equal(2);
      // b ends without its DEBIT command: its place is given back.
      await store.releaseDraw((b as Purchase).transaction_id);
      expect(await reserve(over)).to.include({ transaction_id: over, state: "RECEIVED" });
    });

    it("ignores a place past its time (a replica that died holding it) and drops it", async () => {
      const purse = "2222222222222222";
      const dead = await store.reserveDraw(purse, { insert: newPurchase(randomUUID(), purse), event: received }, 1, later(-1));
      expect(typeof dead).to.equal("object");
      const next = await store.reserveDraw(purse, { insert: newPurchase(randomUUID(), purse), event: received }, 1, later(60_000));
      expect(typeof next, "the expired place does not count").to.equal("object");
      expect(await store.reserveDraw(purse, { insert: newPurchase(randomUUID(), purse), event: received }, 1, later(60_000))).to.equal(1);
    });
  });
}

storeSuite("SQLite", async () => {
  const { dir, cleanup } = await tempDir();
  const db = await openStore(join(dir, "payment.db"), PAYMENT_MIGRATIONS);
  return { db, done: async () => (await db.close(), await cleanup()) };
});

storeSuite("PostgreSQL", async (ctx) => {
  const pg: TestPostgres = await postgresOrSkip(ctx);
  const db = await openStore(pg.url, PAYMENT_MIGRATIONS, { schema: "payment" });
  return { db, done: async () => (await db.close(), await pg.stop()) };
});
