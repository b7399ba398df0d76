// End to end, past one machine (issue #15): two payment servers (replicas of
// payment-1 on one PostgreSQL database), two concentrators and two terminal
// hosts, each its own process, and the parts failing under purchases: a
// payment server SIGKILLed right after it issued a DEBIT command (the other
// finishes the purchase), the concentrator holding a leased PSAM SIGKILLed
// (its terminal host moves to the other, the purchase finishes and settles),
// the database's connections cut and the server restarted (calls fail
// UNAVAILABLE, retries succeed). After each: no purchase left unfinished,
// no PSAM holding an open debit, and the money agrees — the card's balance
// is its start less the paid purchases, each paid purchase is one record in
// one PSAM's batch, and the bank account paid exactly the loads. A seeded
// random mix of these with purchases and loads closes it;
// NETPURSE_FAILOVER_STEPS sets its length (default 8; CI's slow pass runs more).

import { expect } from "chai";
import pg from "pg";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { completeRequest, failure, openCard, openIssued, plainDrawRequest, sealDrawRequest } from "../support/card-client.js";
import { slowIt } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";
import { defined } from "../support/offers.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";
import { launchE2E, type E2E } from "../support/processes.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { testSecurity } from "../support/network.js";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadOutcome, LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { bankAccessToken, bankTokensFile } from "../../client/cli/bank-session.js";
import { loadCard } from "../../client/load/load.js";
import { money } from "../../lib/money.js";
import { DEMO_BANK, demoBankPassword, EUR } from "../../services/network/layout.js";

/** Recovery's timings: short, so that the test need not wait minutes. */
const RECOVERY_ARGS = ["--proof-timeout-ms", "2000", "--sweep-every-ms", "300", "--psam-wait-ms", "3000", "--abandon-received-after-ms", "5000"];
const NOT_FINAL = ["RECEIVED", "DEBIT_COMMAND_ISSUED", "DEBIT_RESPONSE_RECEIVED", "PROVEN", "IN_DOUBT"];
const CARD_LOG_SENT = 4;
const START_BALANCE = 10_000;

/** A small deterministic generator (mulberry32): a failing mix is run again from its seed. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

describe("end to end: replicas, concentrators and PostgreSQL failing under purchases", function () {
  this.timeout(300_000);
  let db: TestPostgres;
  let net: E2E;
  let card: PurseReader;
  /** Every purchase the test began, by transaction id. */
  const tried = new Set<string>();
  /** What loads put on the card, in minor units. */
  let loaded = 0;
  const sql = async <T extends pg.QueryResultRow>(text: string, params: unknown[] = []): Promise<T[]> => {
    const c = new pg.Client({ connectionString: db.url, connectionTimeoutMillis: 5_000 });
    await c.connect();
    try {
      return (await c.query<T>(text, params)).rows;
    } finally {
      await c.end();
    }
  };
  const rows = () => sql<{ id: string; state: string; amount: string }>("SELECT transaction_id AS id, state, amount_minor AS amount FROM payment.purchases");
  const slots = async () => (await net.terminalsAttached()).flatMap((t) => t.slots);
  /** Whether concentrator i (0 = the first) answers. */
  const alive = async (i: number) =>
    net.concentrators[i]!.listTerminals({}, { deadline: 2_000 }).then(
      () => true,
      () => false,
    );
  /** A payment client for one replica's own address (not the balanced target): to pick which one gets a call. */
  const replica = async (n: number) => {
    const security = await testSecurity(net.dir);
    const operator = await security.of("operator", "operator");
    return clientFactory().create(
      PaymentServiceDefinition,
      openChannel(defined(net.addresses[`payment:r${n}`], `replica r${n}`), operator.channel({ kind: "payment" })),
    );
  };

  before(async function () {
    db = await postgresOrSkip(this);
    net = await launchE2E({
      terminals: [
        { id: "terminal-1", psams: 2 },
        { id: "terminal-2", psams: 2 },
      ],
      concentrators: 2,
      paymentServers: 2,
      database: db.url,
      paymentArgs: RECOVERY_ARGS,
    });
    card = await openCard(net.cardPath);
  });
  after(async () => {
    await net?.close();
    await db?.stop();
  });

  /**
   * One purchase at the demo shop (PSAM_VERIFIES: the signing PSAM is held
   * across the card's round trip), its draw request to `first`, retried
   * (the same request, as a client does) on `then`; the card's answer to
   * `then`, retried until it is taken. `between` runs once the DEBIT command
   * is on the card's side. Returns the transaction id.
   */
  async function purchase(
    first: Awaited<ReturnType<typeof replica>>,
    then: Awaited<ReturnType<typeof replica>>,
    between: (id: string) => Promise<void> = async () => undefined,
  ): Promise<string> {
    const o: PaymentOffer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the offer");
    const id = defined(o.transactionId, "the offer's transaction id").value;
    tried.add(id);
    const dr = await plainDrawRequest(card, o);
    dr.cardLog = await card.readLogRaw(CARD_LOG_SENT);
    const req = sealDrawRequest(o, dr);
    let issued;
    for (let attempt = 1, to = first; !issued; attempt++) {
      const call = to.processDrawRequest(req, { deadline: 8_000 });
      const f = await failure(call).catch(() => undefined);
      if (!f) issued = openIssued(o, await call);
      else if (attempt < 40 && ["UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED"].includes(f.code)) {
        to = then;
        await new Promise((r) => setTimeout(r, 250));
      } else if (attempt < 40 && f.reason === "NO_PSAM_ATTACHED") await new Promise((r) => setTimeout(r, 250));
      else throw new Error(`draw request ${id}: ${f.code} ${f.reason} ${f.details}`);
    }
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    await between(id);
    const answer = completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken });
    for (let attempt = 1; ; attempt++) {
      const call = then.completePurchase(answer, { deadline: 8_000 });
      const f = await failure(call).catch(() => undefined);
      if (!f) break;
      if (attempt >= 60 || !["UNAVAILABLE", "CANCELLED", "DEADLINE_EXCEEDED", "ABORTED"].includes(f.code))
        throw new Error(`complete ${id}: ${f.code} ${f.reason} ${f.details}`);
      await new Promise((r) => setTimeout(r, 500));
    }
    return id;
  }

  /** What must hold after every failure: every purchase final, no open debit, and the money agrees across card, PSAMs and the database. */
  async function moneyAgrees(): Promise<void> {
    await waitFor(async () => (await rows()).every((p) => !NOT_FINAL.includes(p.state)), 30_000, "every purchase in a final state").catch(async (e: Error) => {
      throw new Error(`${e.message}: ${JSON.stringify((await rows()).filter((p) => NOT_FINAL.includes(p.state)))}`);
    });
    await waitFor(async () => (await slots()).every((s) => s.pendingDebits.length === 0), 30_000, "no open debit left in any PSAM");
    const all = await rows();
    expect(all.map((p) => p.id)).to.have.members([...tried].filter((t) => all.some((p) => p.id === t)));
    const paid = all.filter((p) => p.state === "COMPLETED" || p.state === "PROVEN");
    const log = await card.readLog();
    expect(log.filter((l) => paid.some((p) => p.id === l.transactionRef)).length, "each paid purchase is one debit in the card's log").to.equal(paid.length);
    expect((await card.readPurse()).balance, "the card's balance is its start plus its loads less the paid purchases").to.equal(
      START_BALANCE + loaded - paid.reduce((n, p) => n + Number(p.amount), 0),
    );
    const [account] = await sql<{ balance_minor: string }>("SELECT balance_minor FROM bank.accounts WHERE account_id = $1", [DEMO_BANK.accountId]);
    expect(Number(account?.balance_minor), "the bank account paid exactly the loads").to.equal(DEMO_BANK.depositMinor - loaded);
    const batched = (await slots()).reduce((n, s) => n + s.batchCount, 0);
    expect(batched, "each paid purchase is one record in one PSAM's batch").to.equal(paid.length);
  }

  slowIt("[slow] a payment server killed right after it issued a DEBIT command: the other replica finishes the purchase, once", async () => {
    const [r1, r2] = [await replica(1), await replica(2)];
    await net.launcher.kill("payment");
    await net.restartPayment([], { NETPURSE_TEST_PAYMENT_CRASH_AT: "after:debit_command_issued" }, 1);
    await net.attached(["terminal-1", "terminal-2"]);
    const id = await purchase(r1, r2);
    await waitFor(() => net.launcher.get("payment") === undefined, 15_000, "replica r1 to die at its kill point");
    const p = defined((await r2.getPurchase({ transactionId: { value: id } })).purchase, "the purchase at r2");
    expect(p.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    await moneyAgrees();
    await net.restartPayment([], {}, 1);
    await net.attached(["terminal-1", "terminal-2"]);
  });

  slowIt("[slow] the concentrator holding the signing PSAM killed mid-purchase: its terminal host moves to the other, the purchase finishes", async () => {
    const [r1, r2] = [await replica(1), await replica(2)];
    let moved = "";
    const id = await purchase(r1, r2, async (current) => {
      // The purchase's PSAM is held for the card's answer: kill the concentrator its terminal host is attached to.
      const rec = defined((await r1.getPurchase({ transactionId: { value: current } })).purchase, "the purchase");
      const terminal = rec.terminalId;
      const lists = await Promise.all(net.concentrators.map((c) => c.listTerminals({})));
      const at = lists.findIndex((l) => l.terminals.some((t) => t.terminalId === terminal));
      expect(at, `terminal ${terminal} attached somewhere`).to.be.at.least(0);
      const name = at === 0 ? "concentrator" : `concentrator-${at + 1}`;
      await net.launcher.kill(name);
      moved = terminal;
      const other = net.concentrators[at === 0 ? 1 : 0]!;
      await waitFor(async () => (await other.listTerminals({})).terminals.some((t) => t.terminalId === terminal), 30_000, `${terminal} re-attached elsewhere`);
    });
    expect(moved).to.not.equal("");
    await net.restartConcentrator(net.concentrators.length === 2 && !(await alive(0)) ? 1 : 2);
    await net.attached(["terminal-1", "terminal-2"]);
    expect(defined((await r2.getPurchase({ transactionId: { value: id } })).purchase, "the purchase").state).to.be.oneOf([
      PurchaseState.PURCHASE_STATE_COMPLETED,
      PurchaseState.PURCHASE_STATE_REVERSED,
    ]);
    await moneyAgrees();
  });

  slowIt(
    "[slow] the database's connections cut and its server restarted between purchases: calls fail UNAVAILABLE, retries succeed, nothing is lost",
    async function () {
      if (!db.canRestart) this.skip();
      const [r1, r2] = [await replica(1), await replica(2)];
      await purchase(r1, r2, async () => {
        // Mid-purchase: every netpurse connection to the database is ended by the server.
        await sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()");
      });
      await db.restart(async () => {
        const f = await failure(r2.getPurchase({ transactionId: { value: [...tried].at(-1)! } }, { deadline: 5_000 }));
        expect(f.code).to.equal("UNAVAILABLE");
      });
      await purchase(r2, r1);
      await moneyAgrees();
    },
  );

  /** Loads EUR 1.00 from the demo bank account through the bank and the load server, as the client module does (on PostgreSQL too). */
  async function load(): Promise<void> {
    const security = await testSecurity(net.dir);
    const bankAddress = defined(net.addresses.bank, "the bank's address");
    const token = await bankAccessToken({
      bank: bankAddress,
      account: DEMO_BANK.accountId,
      security: security.cardholder.channel({ kind: "bank" }),
      file: bankTokensFile(net.dir),
      password: () => demoBankPassword(net.dir),
    });
    const factory = clientFactory();
    const r = await loadCard(
      { bankAddress, accountId: DEMO_BANK.accountId, amount: money(100, EUR, 2), accessToken: token },
      {
        reader: card,
        bank: (a) => factory.create(BankServiceDefinition, openChannel(a, security.cardholder.channel({ kind: "bank" }))),
        load: (a) => factory.create(LoadServiceDefinition, openChannel(a, security.cardholder.channel({ kind: "load" }))),
      },
    );
    expect(r.outcome).to.equal(LoadOutcome.LOAD_OUTCOME_LOADED);
    loaded += 100;
  }

  slowIt("[slow] a seeded mix of purchases, loads, replicas and concentrators killed and restarted, and cut database connections", async () => {
    const steps = Number(process.env.NETPURSE_FAILOVER_STEPS ?? 8);
    const seed = Number(process.env.NETPURSE_FAILOVER_SEED ?? Date.now() % 100_000);
    const next = random(seed);
    const done: string[] = [];
    const clients = [await replica(1), await replica(2)];
    for (let i = 0; i < steps; i++) {
      const pick = next();
      const [a, b] = next() < 0.5 ? [clients[0]!, clients[1]!] : [clients[1]!, clients[0]!];
      if (pick < 0.4) {
        await purchase(a, b);
        done.push("purchase");
      } else if (pick < 0.55) {
        await load();
        done.push("load");
      } else if (pick < 0.7) {
        const n = next() < 0.5 ? 1 : 2;
        await net.launcher.kill(n === 1 ? "payment" : "payment-r2");
        await purchase(n === 1 ? clients[1]! : clients[0]!, n === 1 ? clients[1]! : clients[0]!);
        await net.restartPayment([], {}, n);
        done.push(`replica r${n} killed`);
      } else if (pick < 0.85) {
        const n = next() < 0.5 ? 0 : 1;
        const name = n === 0 ? "concentrator" : "concentrator-2";
        await net.launcher.kill(name);
        await purchase(a, b);
        done.push(`${name} killed`);
        await net.restartConcentrator(n + 1);
      } else {
        await purchase(a, b, async () => {
          await sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()");
        });
        done.push("connections cut");
      }
      await net.attached(["terminal-1", "terminal-2"]);
    }
    try {
      await moneyAgrees();
    } catch (e) {
      throw new Error(`seed ${seed}, steps ${done.join(", ")}: ${(e as Error).message}`, { cause: e });
    }
  });
});
