// End to end: every part its own process, the cardholder's purchase through
// the client daemon and the netpurse CLI, then each party's record checked.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import Database from "better-sqlite3";
import { OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { hexOf } from "../../lib/ids.js";
import { launchE2E, type E2E } from "../support/processes.js";
import { SCRIPTS } from "../../services/network/launcher.js";
import { commandFailure, slowIt, tempDir } from "../support/fixtures.js";
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { demoBankPassword } from "../../services/network/layout.js";
import { rm } from "node:fs/promises";
import { postgresBin } from "../../lib/store/postgres-cluster.js";
import { clusterDir } from "../../services/network/postgres.js";
import { money } from "../../lib/money.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;

describe("end to end: a purchase across separate processes", function () {
  this.timeout(180_000);
  let net: E2E;
  before(async () => (net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 2 }] })));
  after(async () => net?.close());

  it("pays through the client daemon, and the card, the PSAM, the payment server and the merchant all agree", async () => {
    const c = net.clients;
    const before = (await c.cardholder.getCard({})).purse!;
    const { offer } = await c.merchant.createOrder({ productId: "ebook-grpc" });
    const paid = await c.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 30_000 });
    const id = offer!.transactionId!.value;

    // The card: debited once, its log holds the purchase with its signature.
    const after = (await c.cardholder.getCard({})).purse!;
    expect(after.balance!.amountMinor).to.equal(before.balance!.amountMinor - 990n);
    expect(after.transactionCounter).to.equal(before.transactionCounter + 1);
    const log = (await c.cardholder.listCardTransactions({ limit: 1 })).transactions[0]!;
    expect(log.transactionId?.value).to.equal(id);
    expect(log.amount!.amountMinor).to.equal(990n);

    // The PSAM: its counter moved once and the debit is in its batch, with the card's signature.
    const psam = hexOf(paid.receipt!.psamId?.value);
    const slots = (await c.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots);
    const slot = slots.find((s) => hexOf(s.psamId?.value) === psam)!;
    expect(slot.psamCounter).to.equal(paid.receipt!.psamCounter);
    expect(slot.batchCount).to.equal(1);
    expect(slot.pendingDebits).to.have.length(0);
    const db = new Database(join(net.paths.terminal("terminal-1"), "terminal.db"), { readonly: true });
    const row = db.prepare("SELECT * FROM psam_transactions WHERE transaction_id = ?").get(id) as {
      amount_minor: number;
      card_signature: string;
      psam_id: string;
    };
    db.close();
    expect(row.amount_minor).to.equal(990);
    expect(row.psam_id).to.equal(psam);
    expect(row.card_signature).to.equal(Buffer.from(log.cardSignature).toString("hex"));

    // The payment server: completed, every step logged.
    const rec = (await c.payment.getPurchase({ transactionId: offer!.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(rec.events.map((e) => e.step)).to.include.members([
      "draw_request_received",
      "debit_command_issued",
      "debit_response_received",
      "purchase_confirmed",
    ]);

    // The merchant: paid, goods released, the receipt the cardholder got; shown again only with the access secret the daemon journaled.
    const asStranger = (await c.merchant.getOrder({ transactionId: offer?.transactionId })).order;
    expect([asStranger?.state, asStranger?.receipt]).to.deep.equal([OrderState.ORDER_STATE_PAID, undefined]);
    const journal = new Database(join(net.paths.client, "client.db"), { readonly: true });
    const { order_access_secret: accessSecret } = journal.prepare("SELECT order_access_secret FROM client_purchases WHERE transaction_id = ?").get(id) as {
      order_access_secret: Buffer;
    };
    journal.close();
    const order = (await c.merchant.getOrder({ transactionId: offer?.transactionId, accessSecret })).order!;
    expect(order.state).to.equal(OrderState.ORDER_STATE_PAID);
    expect(order.receipt!.goods).to.equal(paid.receipt!.goods);
  });

  it("works through the netpurse CLI", async () => {
    // The CLI finds the installation's CA (to check the merchant) in the network's data folder.
    const env = { ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: net.dir };
    const opts = ["--daemon", net.addresses.clientDaemon!];
    const shop = await run(join(ROOT, "bin/netpurse"), ["shop", "--merchant", net.addresses["merchant:demo-shop"]!], { env });
    expect(shop.stdout).to.contain("song-1");
    const pay = await run(join(ROOT, "bin/netpurse"), ["pay", "song-1", "--yes", "--merchant", net.addresses["merchant:demo-shop"]!, ...opts], { env });
    expect(pay.stdout).to.match(/paid EUR 0\.99 to Netpurse Demo Bookshop; card balance now EUR \d+\.\d\d/);
    expect(pay.stdout).to.contain("goods:   licence key");
    // The same at the shop where the merchant compares the card's signature (one round trip).
    const oneTrip = await run(join(ROOT, "bin/netpurse"), ["pay", "song-1", "--yes", "--merchant", net.addresses["merchant:merchant-shop"]!, ...opts], { env });
    expect(oneTrip.stdout).to.contain("left to the merchant");
    expect(oneTrip.stdout).to.match(/paid EUR 0\.99 to Merchant Compares Books/);
    const card = await run(join(ROOT, "bin/netpurse"), ["card", ...opts], { env });
    expect(card.stdout).to.contain("EUR 0.99");
    const refused = await commandFailure(
      run(join(ROOT, "bin/netpurse"), ["pay", "no-such-thing", "--yes", "--merchant", net.addresses["merchant:demo-shop"]!, ...opts], { env }),
    );
    expect(refused.code).to.equal(1);
    expect(refused.stderr).to.contain("NOT_FOUND");
  });
});

describe("end to end: a load across separate processes, through the CLI", function () {
  this.timeout(180_000);
  let net: E2E;
  /** The demo account's password, as `npm start` made it (DATA/bank/demo-password). */
  let password: string;
  before(async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }] });
    password = await demoBankPassword(net.dir);
  });
  after(async () => net?.close());

  // The CLIs find the installation's CA (to check the bank and merchants) in the network's data folder; scripts give the bank password in the environment.
  /** null: no password in the environment. */
  const env = (bankPassword: string | null = password) => {
    const e: NodeJS.ProcessEnv = { ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: net.dir };
    if (bankPassword === null) delete e.NETPURSE_BANK_PASSWORD;
    else e.NETPURSE_BANK_PASSWORD = bankPassword;
    return e;
  };
  const netpurse = (...args: string[]) => run(join(ROOT, "bin/netpurse"), [...args, "--daemon", net.addresses.clientDaemon!], { env: env() });
  const netpurseWith = (bankPassword: string | null, ...args: string[]) =>
    run(join(ROOT, "bin/netpurse"), [...args, "--daemon", net.addresses.clientDaemon ?? ""], { env: env(bankPassword) });
  const bankCli = (bankPassword: string | null, ...args: string[]) => run(join(ROOT, "bin/netpurse-bank"), args, { env: env(bankPassword) });
  const bank = () => net.addresses.bank ?? "";
  const statement = () => bankCli(password, "statement", "demo-account", "--bank", bank());
  const cardBalance = async () => (await net.clients.cardholder.getCard({})).purse?.balance?.amountMinor ?? -1n;

  it("loads the card from the bank account; the bank's statement shows the debit", async () => {
    const before = (await net.clients.cardholder.getCard({})).purse!;
    const r = await netpurse("load", "5.00", "--yes", "--bank", net.addresses.bank!, "--account", "demo-account");
    expect(r.stdout).to.contain("card credit");
    expect(r.stdout).to.match(/loaded EUR 5\.00; card balance now EUR \d+\.\d\d/);
    expect(r.stdout).to.contain("bank debited the account");
    expect((await net.clients.cardholder.getCard({})).purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor + 500n);
    const s = await statement();
    expect(s.stdout).to.match(/balance EUR 995\.00 +available EUR 995\.00/);
    expect(s.stdout).to.contain("load to card");
    expect(s.stdout).to.contain("EUR -5.00");
    const bad = await commandFailure(netpurse("load", "5.001", "--yes", "--bank", net.addresses.bank!));
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain("more than 2 decimals");
    const poor = await commandFailure(netpurse("load", "2000.00", "--yes", "--bank", net.addresses.bank!));
    expect(poor.code).to.equal(1);
    expect(poor.stderr).to.match(/FAILED_PRECONDITION \[ERROR_REASON_(INSUFFICIENT_FUNDS|MAX_BALANCE_EXCEEDED)\]/);
  });

  slowIt(
    "[slow] with the load server down, the funds stay held and nothing touches the card; 'netpurse card sync' finishes the load once it is back",
    async () => {
      const before = (await net.clients.cardholder.getCard({})).purse!;
      // The account as it stands (other tests of this network may have loaded before): 3.00 less after the load.
      const account = /balance EUR (\d+\.\d\d) +available EUR \1/.exec((await statement()).stdout)?.[1] ?? "?";
      const after = (Number(account) - 3).toFixed(2);
      await net.launcher.stop("load");
      const down = await commandFailure(netpurse("load", "3.00", "--yes", "--bank", net.addresses.bank!));
      expect(down.code).to.equal(1);
      expect(down.stderr).to.contain("UNAVAILABLE");
      expect((await net.clients.cardholder.getCard({})).purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor);
      expect((await statement()).stdout).to.contain("on hold for loads not yet confirmed");
      await net.launcher.start("load", SCRIPTS.load, ["--listen", net.addresses.load!, "--data", net.dir, "--clearing", net.addresses.clearing!]);
      const sync = await netpurse("card", "sync");
      // The daemon's own periodic recovery may have finished it first; either way the money below must agree.
      expect(sync.stdout).to.match(/loaded +posted|no pending loads/);
      expect((await net.clients.cardholder.getCard({})).purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor + 300n);
      const s = await statement();
      expect(s.stdout).to.match(new RegExp(`balance EUR ${after.replace(".", "\\.")} +available EUR ${after.replace(".", "\\.")}`));
      expect(s.stdout).to.not.contain("on hold");
      expect((await netpurse("card", "sync")).stdout).to.contain("no pending loads");
    },
  );

  it("logs in with $NETPURSE_BANK_PASSWORD and keeps only the access token (mode 0600), with which the next load needs no password; no log holds either", async () => {
    const tokens = join(net.dir, "client", "bank-tokens.json");
    expect(statSync(tokens).mode & 0o777).to.equal(0o600);
    const kept = readFileSync(tokens, "utf8");
    expect(kept).to.not.contain(password);
    const accessToken =
      (JSON.parse(kept) as { tokens: Record<string, { accessToken: string } | undefined> }).tokens[`${bank()} demo-account`]?.accessToken ?? "";
    expect(accessToken).to.match(/^[A-Za-z0-9_-]{43}$/);
    // No password at hand, no terminal: the kept token is enough.
    const before = await cardBalance();
    const again = await netpurseWith(null, "load", "1.00", "--yes", "--bank", bank());
    expect(again.stdout).to.match(/loaded EUR 1\.00; card balance now/);
    expect(await cardBalance()).to.equal(before + 100n);
    // Without a kept token: no password and no terminal is a usage error saying how to give one; a wrong one is UNAUTHENTICATED.
    rmSync(tokens);
    const none = await commandFailure(netpurseWith(null, "load", "1.00", "--yes", "--bank", bank()));
    expect(none.code).to.equal(2);
    expect(none.stderr).to.contain("NETPURSE_BANK_PASSWORD");
    const wrong = await commandFailure(netpurseWith("not the password", "load", "1.00", "--yes", "--bank", bank()));
    expect(wrong.code).to.equal(1);
    expect(wrong.stderr).to.contain("UNAUTHENTICATED");
    expect(await cardBalance()).to.equal(before + 100n);
    // Every process's log: neither the password nor any access token.
    for (const f of readdirSync(join(net.dir, "logs"))) {
      const text = readFileSync(join(net.dir, "logs", f), "utf8");
      expect(text, f).to.not.contain(password);
      expect(text, f).to.not.contain(accessToken);
    }
  });

  it("netpurse-bank: open-account sets the holder's password (from a file), statement logs in with it, set-password replaces it", async () => {
    const first = join(net.dir, "bob-password");
    const second = join(net.dir, "bob-new-password");
    writeFileSync(first, "bob's first password\n", { mode: 0o600 });
    writeFileSync(second, "bob's second password\n", { mode: 0o600 });
    const opened = await bankCli(null, "open-account", "--id", "bob", "--holder", "Bob", "--deposit", "100.00", "--password-file", first);
    expect(opened.stdout).to.contain("opened account bob for Bob with EUR 100.00");
    const short = await commandFailure(bankCli("short", "open-account", "--id", "carol", "--holder", "Carol"));
    expect(short.code).to.equal(2);
    expect(short.stderr).to.contain("at least 8 characters");
    const s = await bankCli(null, "statement", "bob", "--bank", bank(), "--password-file", first);
    expect(s.stdout).to.match(/account bob \(Bob\) +balance EUR 100\.00 +available EUR 100\.00/);
    // Demo's password is not Bob's.
    expect((await commandFailure(bankCli(password, "statement", "bob", "--bank", bank()))).stderr).to.contain("UNAUTHENTICATED");
    expect((await bankCli(null, "set-password", "bob", "--password-file", second)).stdout).to.contain("password of account bob set");
    expect((await commandFailure(bankCli(null, "statement", "bob", "--bank", bank(), "--password-file", first))).stderr).to.contain("UNAUTHENTICATED");
    expect((await bankCli("bob's second password", "statement", "bob", "--bank", bank())).stdout).to.contain("account bob (Bob)");
  });

  slowIt(
    "[slow] with the bank killed, 'netpurse load' retries under one request id, fails naming the load that may still complete; the bank back, 'card sync' makes it once",
    async () => {
      // A load that works keeps the access token: the next load needs neither the bank's Login nor a password.
      await netpurse("load", "2.00", "--yes", "--bank", bank());
      const tokens = JSON.parse(readFileSync(join(net.dir, "client", "bank-tokens.json"), "utf8")) as { tokens: Record<string, { accessToken: string }> };
      const accessToken = tokens.tokens[`${bank()} demo-account`]?.accessToken ?? "";
      // The bank's own record of the account and of one load, in its store.
      const bankRecord = (id: string) => {
        const db = new Database(join(net.paths.bank, "bank.db"), { readonly: true });
        try {
          return {
            balance: (db.prepare("SELECT balance_minor FROM accounts WHERE account_id = 'demo-account'").get() as { balance_minor: number }).balance_minor,
            lines: db.prepare("SELECT amount_minor FROM statement WHERE transaction_id = ?").all(id),
            holds: db.prepare("SELECT amount_minor, state FROM holds WHERE transaction_id = ?").all(id),
          };
        } finally {
          db.close();
        }
      };
      const bankBefore = bankRecord("").balance;
      const before = await cardBalance();
      const loadRows = () => {
        const db = new Database(join(net.paths.client, "client.db"), { readonly: true });
        try {
          return db.prepare("SELECT transaction_id, request_id, state FROM client_loads").all() as {
            transaction_id: string;
            request_id: string | null;
            state: string;
          }[];
        } finally {
          db.close();
        }
      };
      const rowsBefore = loadRows().length;

      // The bank is gone. Without a password in the environment the CLI can only use the kept token, so it goes straight to the daemon.
      await net.launcher.kill("bank");
      const down = await commandFailure(netpurseWith(null, "load", "1.20", "--yes", "--bank", bank()));
      expect(down.code).to.equal(1);
      const retries = [...down.stderr.matchAll(/asking again in (\d) s under the same request id ([\w-]+) \(it never makes a second load\)/g)];
      expect(retries.map((r) => r[1])).to.deep.equal(["1", "2", "4"]);
      const requestId = retries[0]?.[2] ?? "";
      expect(retries.map((r) => r[2])).to.deep.equal([requestId, requestId, requestId]);
      const named = /load ([0-9a-f-]{36}) is journaled \(STARTED\) and may still complete: do not load again\. Run 'netpurse card sync'/.exec(down.stderr);
      expect(named, down.stderr).to.not.equal(null);
      const id = named?.[1] ?? "";
      expect(down.stderr).to.contain(`[load ${id}: journal state STARTED; it may still complete`);
      // One journaled load for the command and its three retries, the one named; nothing reached the card.
      const rows = loadRows();
      expect(rows).to.have.length(rowsBefore + 1);
      expect(rows.filter((r) => r.request_id === requestId)).to.deep.equal([{ transaction_id: id, request_id: requestId, state: "STARTED" }]);
      expect(await cardBalance()).to.equal(before);

      // The bank back on its address and data: the load is finished by 'netpurse card sync' (or by the daemon's own periodic recovery, if that came first).
      await net.launcher.start("bank", SCRIPTS.bank, ["--listen", bank(), "--load-server", net.addresses.load ?? "", "--data", net.dir]);
      const sync = await netpurse("card", "sync");
      expect(sync.stdout).to.match(new RegExp(`${id} +loaded +posted|no pending loads`));
      expect(loadRows().find((r) => r.transaction_id === id)?.state).to.equal("DONE");

      const loadedOnce = async () => {
        // The card: credited EUR 1.20 once, by that transaction.
        expect(await cardBalance()).to.equal(before + 120n);
        const log = (await net.clients.cardholder.listCardTransactions({ limit: 0 })).transactions.filter((t) => t.transactionId?.value === id);
        expect(log.map((t) => t.amount?.amountMinor)).to.deep.equal([120n]);
        // The bank: one debit of EUR 1.20 for it, its hold posted, the account EUR 1.20 lower.
        expect(bankRecord(id)).to.deep.equal({ balance: bankBefore - 120, lines: [{ amount_minor: -120 }], holds: [{ amount_minor: 120, state: "POSTED" }] });
      };
      await loadedOnce();
      // The statement the account holder reads shows it once, and nothing on hold.
      const s = await statement();
      expect(s.stdout.match(/EUR -1\.20/g)).to.have.length(1);
      expect(s.stdout).to.not.contain("on hold");

      // Nothing makes it twice: another sync, and the CLI's request id asked again.
      expect((await netpurse("card", "sync")).stdout).to.contain("no pending loads");
      const again = await net.clients.cardholder.loadCard({
        bankAddress: bank(),
        accountId: "demo-account",
        amount: money(120n, 978, 2),
        approvedAmount: money(120n, 978, 2),
        bankAccessToken: accessToken,
        requestId,
      });
      expect(again.transactionId?.value).to.equal(id);
      expect(again.steps.map((s) => s.detail).join()).to.contain("nothing was loaded again");
      await loadedOnce();
    },
  );
});

describe("end to end: the README's first command (npm start -- --once)", function () {
  this.timeout(180_000);
  slowIt("[slow] sets up the demo data, runs the network, makes a purchase and stops cleanly — twice", async () => {
    const { dir, cleanup } = await tempDir("netpurse-start-");
    try {
      for (const round of [1, 2]) {
        const { stdout } = await run(process.execPath, ["--import", "tsx", "services/network/main.ts", "--once", "--data", dir], {
          cwd: ROOT,
          timeout: 120_000,
        });
        expect(stdout, `round ${round}`).to.contain("goods released");
        expect(stdout, `round ${round}`).to.contain("the bank verified the confirmation and debited the account");
        expect(stdout, `round ${round}`).to.contain("logged in to the bank as the holder of demo-account");
        expect(stdout).to.contain("stopped.");
        // The demo password is printed once, when it is made, and kept (mode 0600) for the next runs.
        const password = await demoBankPassword(dir);
        expect(statSync(join(dir, "bank", "demo-password")).mode & 0o777).to.equal(0o600);
        if (round === 1) {
          expect(stdout).to.contain("issuer: personalised card");
          expect(stdout).to.contain(`the password of account demo-account is ${password}`);
        } else {
          expect(stdout).to.not.contain("issuer: created master keys");
          expect(stdout).to.not.contain(password);
        }
        for (const f of readdirSync(join(dir, "logs"))) expect(readFileSync(join(dir, "logs", f), "utf8"), f).to.not.contain(password);
        // Other users of the machine read nothing of it: every folder is 0700, every database, log and card 0600.
        const loose = readdirSync(dir, { recursive: true, encoding: "utf8" }).filter((f) => {
          const mode = statSync(join(dir, f)).mode;
          const secret = /\.(db|db-wal|db-shm|log|card\.json)$/.test(f);
          return (mode & 0o077) !== 0 && ((mode & 0o170000) === 0o040000 || secret);
        });
        expect(loose, `round ${round}: readable by others`).to.deep.equal([]);
      }
    } finally {
      await cleanup();
    }
  });
});

describe("end to end: the bigger layout (npm start -- --once --payment-servers 2 --concentrators 2 --terminals 2)", function () {
  this.timeout(240_000);
  slowIt(
    "[slow] runs two payment servers, two concentrators and two terminal hosts on a PostgreSQL server of its own, twice, with a clean audit",
    async function () {
      if (!postgresBin()) {
        if (process.env.NETPURSE_REQUIRE_POSTGRES === "1") throw new Error("NETPURSE_REQUIRE_POSTGRES=1 but there is no initdb here");
        this.skip();
      }
      const { dir, cleanup } = await tempDir("netpurse-start-big-");
      const args = [
        "--import",
        "tsx",
        "services/network/main.ts",
        "--once",
        "--data",
        dir,
        "--payment-servers",
        "2",
        "--concentrators",
        "2",
        "--terminals",
        "2",
      ];
      try {
        for (const round of [1, 2]) {
          const { stdout } = await run(process.execPath, args, { cwd: ROOT, timeout: 180_000, env: { ...process.env, NETPURSE_DATABASE_URL: "" } });
          expect(stdout, `round ${round}`).to.contain("layout: 2 payment servers, 2 concentrators, 2 terminal hosts");
          expect(stdout, `round ${round}`).to.match(/terminal pool ready: 2 terminal hosts, \d+ PSAMs/);
          expect(stdout, `round ${round}`).to.contain("payment                127.0.0.1:7420,127.0.0.1:7421");
          expect(stdout, `round ${round}`).to.contain("audit clean: 8 of 8 checks hold");
          expect(stdout).to.contain("stopped.");
          // The services' role and both passwords: never on a command line, in a log or in the output.
          const passwords = ["password", "services-password"].map((f) => readFileSync(join(dir, "postgres", f), "utf8").trim());
          for (const p of passwords) {
            expect(stdout).to.not.contain(p);
            for (const f of readdirSync(join(dir, "logs"))) expect(readFileSync(join(dir, "logs", f), "utf8"), f).to.not.contain(p);
          }
          expect(stdout).to.contain("postgres://netpurse_services:***@127.0.0.1:7490/netpurse");
        }
        // Both replicas opened the one shared database.
        for (const log of ["payment.log", "payment-r2.log"]) expect(readFileSync(join(dir, "logs", log), "utf8"), log).to.match(/PostgreSQL store open/);
      } finally {
        await rm(clusterDir(dir), { recursive: true, force: true });
        await cleanup();
      }
    },
  );
});
