// The services' stores on PostgreSQL (issue #15), against a real one
// (test/support/postgres.ts): the network on one database, each service in
// its schema, and the checks that SQLite's single writer used to make safe
// now made safe by one SERIALIZABLE transaction each, raced from several
// servers sharing the database, as replicas would: the bank's cap on holds,
// a shop's cap on unpaid orders, and a settlement day closed while a batch
// is being posted to it. And the orders that leaned on SQLite's rowid: an
// account's holds page by page, its newest access tokens, the first batch
// under a batch number.

import { storeSchema } from "../../services/merchant/server.js";
import { expect } from "chai";
import type { Client } from "nice-grpc";
import { randomBytes, randomUUID } from "node:crypto";
import { execFile } from "node:child_process";
import { copyFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { BankServiceDefinition, HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { bearer, clientFactory, openChannel } from "../../lib/grpc/client.js";
import { pageToken } from "../../lib/grpc/page-token.js";
import { txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { purseState } from "../../client/card/purse-state.js";
import { accessTokenHash, newAccessToken } from "../../services/bank/credentials.js";
import { startBankServer } from "../../services/bank/server.js";
import { dayOf, nextDay } from "../../services/clearing/store.js";
import { startMerchant } from "../../services/merchant/server.js";
import { DEMO_BANK, DEMO_SHOPS } from "../../services/network/layout.js";
import { failure } from "../support/card-client.js";
import { tempDir } from "../support/fixtures.js";
import { account, EUR, freshCardholder, openAccount } from "../support/load.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";

const run = promisify(execFile);
const BANK_CLI = new URL("../../bin/netpurse-bank", import.meta.url).pathname;

describe("contract: the services' stores on PostgreSQL, shared by several servers", function () {
  this.timeout(120_000);
  let pg: TestPostgres | undefined;
  let net: Network;
  const closing: (() => Promise<void>)[] = [];

  before(async function () {
    pg = await postgresOrSkip(this);
    net = await startNetwork({ database: pg.url, terminals: [{ id: "terminal-1", psams: 1 }] });
  });
  after(async () => {
    for (const c of closing.reverse()) await c();
    await net?.close();
    await pg?.stop();
  });

  /** Another server of the network's bank (its bank.json, its database): a replica, with its own cap on holds. */
  async function bankReplica(maxHoldsPerAccount: number) {
    const bank = await startBankServer({
      security: await net.security.of("bank", DEMO_BANK.bankId),
      listen: "127.0.0.1:0",
      dir: net.paths.bank,
      ...net.storeOption,
      loadServer: net.load.address,
      maxHoldsPerAccount,
    });
    const channel = openChannel(bank.address, net.security.cardholder.channel({ kind: "bank" }));
    closing.push(async () => {
      channel.close();
      await bank.close();
    });
    return { bank, as: (token: string) => clientFactory().create(BankServiceDefinition, channel, { "*": { metadata: bearer(token) } }) };
  }

  /** Calls made side by side: how many were answered, and how each of the others failed. */
  async function sideBySide(calls: Promise<unknown>[]) {
    const outcomes = await Promise.allSettled(calls);
    const refused = await Promise.all(outcomes.flatMap((o) => (o.status === "rejected" ? [failure(Promise.reject(o.reason as Error))] : [])));
    return { answered: outcomes.length - refused.length, refused };
  }

  it("keeps every service's tables in its schema of the one database", async () => {
    const schemas = await net.bank.store.db.all<{ name: string }>(
      "SELECT schema_name AS name FROM information_schema.schemata WHERE schema_name NOT LIKE 'pg_%' AND schema_name <> 'information_schema' ORDER BY 1",
    );
    // A shop's schema is named after its merchant id (demo-shop: merchant_demo_shop_ and 8 hex digits), so that shops share the database.
    expect(DEMO_SHOPS.map((d) => d.shop.merchantId).sort()).to.deep.equal(["client-shop", "demo-shop", "merchant-shop", "server-shop"]);
    expect(schemas.map((s) => s.name)).to.include.members(["bank", "clearing", "load", "payment", "validation"]);
    for (const id of ["client_shop", "demo_shop", "merchant_shop", "server_shop"])
      expect(
        schemas.filter((s) => new RegExp(`^merchant_${id}_[0-9a-f]{8}$`).test(s.name)),
        id,
      ).to.have.length(1);
  });

  it("gives merchant ids that differ only in case or punctuation schemas of their own, each a valid PostgreSQL name", () => {
    const names = ["shop-1", "shop.1", "Shop-1", "shop_1", "s".repeat(64)].map((id) => storeSchema("merchant", id));
    expect(new Set(names).size).to.equal(5);
    expect(names[3]).to.equal("merchant_shop_1");
    for (const n of names) expect(n).to.match(/^[a-z_][a-z0-9_]{0,62}$/);
  });

  it("two bank servers on one database, asked for 12 holds at once on one account, hold 3, the cap, and no more", async () => {
    const h = await freshCardholder(net, { deposit: 100_000 });
    const [a, b] = [await bankReplica(3), await bankReplica(3)];
    const purse = purseState(await h.reader.readPurse());
    const asked = Array.from({ length: 12 }, (_, i) =>
      (i % 2 ? a : b).as(h.token).createLoadOffer({ transactionId: txnId(randomUUID()), accountId: h.accountId, amount: money(1_000, EUR, 2), purse }),
    );
    const { answered, refused } = await sideBySide(asked);
    expect(answered).to.equal(3);
    for (const f of refused) expect(f).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_HOLDS" });
    const now = await account(net, h.accountId);
    expect(now.holds.filter((x) => x.state === HoldState.HOLD_STATE_HELD)).to.have.length(3);
    expect(now).to.deep.include({ balance: 100_000, available: 100_000 - 3 * 1_000 });
  });

  it("two bank servers on one database never hold more than the funds available, however the offers interleave", async () => {
    const h = await freshCardholder(net, { deposit: 5_000, maxBalance: 50_000 });
    const [a, b] = [await bankReplica(50), await bankReplica(50)];
    const purse = purseState(await h.reader.readPurse());
    const { answered, refused } = await sideBySide(
      Array.from({ length: 10 }, (_, i) =>
        (i % 2 ? a : b).as(h.token).createLoadOffer({ transactionId: txnId(randomUUID()), accountId: h.accountId, amount: money(1_500, EUR, 2), purse }),
      ),
    );
    // 5_000 holds 3 loads of 1_500, not a fourth.
    expect(answered).to.equal(3);
    for (const f of refused) expect(f).to.include({ code: "FAILED_PRECONDITION", reason: "INSUFFICIENT_FUNDS" });
    expect(await account(net, h.accountId)).to.deep.include({ balance: 5_000, available: 500 });
  });

  it("lists an account's holds page by page, each once, newest first, holds made in the same millisecond in the order they were made", async () => {
    const h = await freshCardholder(net, { deposit: 100_000 });
    const made: string[] = [];
    // Three through the bank (its cap), then seven written in one millisecond, as a busy bank would.
    const purse = purseState(await h.reader.readPurse());
    for (let i = 0; i < 3; i++) {
      const id = randomUUID();
      await net.bankAs(h.accountId).createLoadOffer({ transactionId: txnId(id), accountId: h.accountId, amount: money(100, EUR, 2), purse });
      made.push(id);
    }
    const sameMoment = new Date(Date.now() + 1_000).toISOString();
    const template = defined(await net.bank.store.hold(defined(made[0], "the first hold's id")), "the first hold");
    for (let i = 0; i < 7; i++) {
      // Ids in descending order: an order by id would list them backwards.
      const id = `ffffffff-0000-4000-8000-${String(900_000_000_000 - i).padStart(12, "0")}`;
      await net.bank.store.db.transaction((tx) => net.bank.store.insertHold(tx, { ...template, transaction_id: id, created_at: sameMoment }));
      made.push(id);
    }
    const listed: string[] = [];
    let token = "";
    let pages = 0;
    do {
      const r = await net.bankAs(h.accountId).listHolds({ accountId: h.accountId, pageSize: 3, pageToken: token });
      listed.push(...r.holds.map((x) => defined(x.transactionId, "a hold's id").value));
      token = r.nextPageToken;
      pages++;
    } while (token);
    expect(pages).to.equal(4);
    expect(listed).to.deep.equal([...made].reverse());
  });

  it("refuses a holds page token of a bank from before seq (SQLite's rowid in it) as INVALID_ARGUMENT, rather than reading it as a seq", async () => {
    const h = await openAccount(net, { accountId: `old-token-${randomBytes(3).toString("hex")}` });
    const old = pageToken("holds", `account ${h.accountId}`, { t: new Date().toISOString(), r: 1 });
    expect(await failure(net.bankAs(h.accountId).listHolds({ accountId: h.accountId, pageSize: 2, pageToken: old }))).to.deep.include({
      code: "INVALID_ARGUMENT",
      reason: "INVALID_FIELD",
    });
  });

  it("keeps an account's 10 newest access tokens, the last made winning among those issued in the same millisecond", async () => {
    const h = await openAccount(net, { accountId: `tokens-${randomBytes(3).toString("hex")}` });
    const hash = defined(await net.bank.store.passwordHash(h.accountId), "the password hash");
    const issuedAt = new Date();
    const expiresAt = new Date(issuedAt.getTime() + 600_000);
    const tokens = Array.from({ length: 12 }, () => newAccessToken());
    for (const t of tokens)
      expect(await net.bank.store.addAccessToken({ tokenHash: accessTokenHash(t), accountId: h.accountId, issuedAt, expiresAt }, 10, hash)).to.equal(true);
    const channel = openChannel(net.bank.address, net.security.cardholder.channel({ kind: "bank" }));
    closing.push(async () => channel.close());
    const bank = (token: string) => clientFactory().create(BankServiceDefinition, channel, { "*": { metadata: bearer(token) } });
    // The login's own token (issued earlier) and the first two of these are gone; the last ten act for the account.
    for (const t of [h.token, ...tokens.slice(0, 2)])
      expect(await failure(bank(t).getAccount({ accountId: h.accountId }))).to.include({ code: "UNAUTHENTICATED" });
    for (const t of tokens.slice(2)) expect((await bank(t).getAccount({ accountId: h.accountId })).accountId).to.equal(h.accountId);
  });

  it("netpurse-bank --database opens an account in the books the bank servers on that database keep, and lists it", async () => {
    const id = `cli-${randomBytes(3).toString("hex")}`;
    const password = `pw-${randomUUID()}`;
    const env = { ...process.env, NETPURSE_BANK_PASSWORD: password };
    const opened = await run(
      BANK_CLI,
      ["open-account", "--id", id, "--holder", "Carol", "--deposit", "12.34", "--database", defined(net.database, "the database")],
      {
        env,
      },
    );
    expect(opened.stdout).to.contain(`opened account ${id}`);
    // The running bank serves it at once: its holder logs in with the password given.
    await net.loginAs(id, password);
    expect(await account(net, id)).to.deep.include({ balance: 1_234, available: 1_234 });
    const listed = await run(BANK_CLI, ["accounts"], { env: { ...process.env, NETPURSE_DATABASE_URL: defined(net.database, "the database") } });
    expect(listed.stdout).to.match(new RegExp(`^${id}\\s+Carol\\s+12\\.34\\s+12\\.34$`, "m"));
    // The URL's password appears nowhere in what the command says.
    expect(opened.stdout + opened.stderr + listed.stdout + listed.stderr).to.not.contain(defined(pg, "the server").password);
  });

  it("two servers of one shop on one database, asked for 24 orders at once with room for 5 unpaid, make 5", async () => {
    // A shop no other test here buys from: none of its orders is unpaid yet.
    const shop = defined(DEMO_SHOPS[1], "a second demo shop").shop;
    const servers: { server: Awaited<ReturnType<typeof startMerchant>>; client: Client<typeof MerchantServiceDefinition> }[] = [];
    for (let i = 0; i < 2; i++) {
      const { dir, cleanup } = await tempDir("netpurse-shop-replica-");
      await copyFile(join(net.paths.merchant(shop.merchantId), "shop.json"), join(dir, "shop.json"));
      const server = await startMerchant({
        security: await net.security.of("merchant", shop.merchantId),
        listen: "127.0.0.1:0",
        dir,
        ...net.storeOption,
        validation: net.validation.address,
        paymentServer: net.payment.address,
        maxUnpaidOrders: 5,
      });
      const channel = openChannel(server.address, net.security.cardholder.channel({ kind: "merchant" }));
      closing.push(async () => {
        channel.close();
        await server.close();
        await cleanup();
      });
      servers.push({ server, client: clientFactory().create(MerchantServiceDefinition, channel) });
    }
    const [first, second] = servers as [(typeof servers)[0], (typeof servers)[0]];
    const unpaid = async () => (await first.server.db.get<{ n: number }>("SELECT COUNT(*) AS n FROM orders WHERE state = 'OFFERED'"))?.n;
    expect(await unpaid()).to.equal(0);
    // Each insert takes 20 ms (a trigger sleeps in it), as under load: orders counted below the cap overlap in time, as they would.
    await first.server.db.run(
      `CREATE FUNCTION slow_insert() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$ LANGUAGE plpgsql;
       CREATE TRIGGER slow_orders BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION slow_insert();`,
    );
    const productId = defined(shop.products[0], "a product").productId;
    const { answered, refused } = await sideBySide(Array.from({ length: 24 }, (_, i) => (i % 2 ? first : second).client.createOrder({ productId })));
    expect(answered).to.equal(5);
    for (const f of refused) expect(f).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_ORDERS" });
    expect(await unpaid()).to.equal(5);
    await first.server.db.run("DROP TRIGGER slow_orders ON orders; DROP FUNCTION slow_insert();");
  });

  it("keeps the first batch accepted under a PSAM's batch number as the one clearing shows, received in the same millisecond or not", async () => {
    const store = net.clearingServer.store;
    const psam = randomBytes(4).toString("hex");
    const receivedAt = new Date().toISOString();
    const row = {
      psam_id: psam,
      batch_number: 1,
      terminal_id: "terminal-1",
      record_count: 1,
      total_minor: 99,
      currency: EUR,
      closed_at: null,
      posted: 0,
      quarantined: 1,
      settlement_day: dayOf(new Date()),
      received_at: receivedAt,
      resubmissions: 0,
    };
    // The first under a MAC an order by MAC would put last.
    for (const mac of ["ffffffffffffffff", "0000000000000000", "8888888888888888"])
      await store.db.transaction((q) => store.insertBatch(q, { ...row, batch_mac: mac }));
    expect(await store.batch(psam, 1)).to.include({ batch_mac: "ffffffffffffffff" });
  });

  // Last: it closes today's settlement day.
  it("a settlement day closed while a batch is being posted to it: the batch lands in the closed day's settlement or in the next day, never after it was closed", async () => {
    const today = dayOf(new Date());
    const store = net.clearingServer.store;
    const original = store.postingDay.bind(store);
    let arrive!: () => void;
    const arrived = new Promise<void>((r) => (arrive = r));
    let release!: () => void;
    const released = new Promise<void>((r) => (release = r));
    let paused = false;
    // The batch's transaction reads the day open, then waits while the operator closes it.
    store.postingDay = async (q, now) => {
      const day = await original(q, now);
      if (!paused) {
        paused = true;
        arrive();
        await released;
      }
      return day;
    };
    try {
      const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
      const paid = await net.clients.cardholder.payOffer({ offer, approvedAmount: defined(offer, "the offer").amount });
      expect(paid.receipt?.goods).to.match(/^licence key/);
      const closed = await net.clients.concentrator.closeBatches({ terminalId: "", psamId: undefined });
      expect(closed.closed).to.have.length(1);
      await Promise.race([arrived, new Promise((_, reject) => setTimeout(() => reject(new Error("the batch never reached its posting day")), 15_000))]);
      const atClose = defined((await net.clearing.closeSettlementDay({ day: today })).settlement, "the closed day's settlement");
      release();
      const host = defined(net.hosts.get("terminal-1"), "the terminal host").host;
      await waitFor(async () => (await host.data.outbox()).length === 0, 15_000, "the batch acknowledged by clearing");
      const after = defined((await net.clearing.getSettlement({ day: today })).settlement, "the day's settlement");
      const next = defined((await net.clearing.getSettlement({ day: nextDay(today) })).settlement, "the next day's settlement");
      expect(after.purchases, "the closed day's settlement as it was closed").to.equal(atClose.purchases);
      expect(atClose.purchases + next.purchases, "the purchase posted once, to one of the two days").to.equal(1);
      expect(next.purchases, "posted after the day closed: to the next day").to.equal(1);
    } finally {
      release();
      store.postingDay = original;
    }
  });
});
