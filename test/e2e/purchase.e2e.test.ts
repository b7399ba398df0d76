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
import { commandFailure, tempDir } from "../support/fixtures.js";

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

    // The merchant: paid, goods released, the receipt the cardholder got.
    const order = (await c.merchant.getOrder({ transactionId: offer!.transactionId })).order!;
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
  before(async () => (net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }] })));
  after(async () => net?.close());

  // The CLIs find the installation's CA (to check the bank and merchants) in the network's data folder.
  const env = () => ({ ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: net.dir });
  const netpurse = (...args: string[]) => run(join(ROOT, "bin/netpurse"), [...args, "--daemon", net.addresses.clientDaemon!], { env: env() });
  const statement = () => run(join(ROOT, "bin/netpurse-bank"), ["statement", "demo-account", "--bank", net.addresses.bank!], { env: env() });

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

  it("with the load server down, the funds stay held and nothing touches the card; 'netpurse card sync' finishes the load once it is back", async () => {
    const before = (await net.clients.cardholder.getCard({})).purse!;
    await net.launcher.stop("load");
    const down = await commandFailure(netpurse("load", "3.00", "--yes", "--bank", net.addresses.bank!));
    expect(down.code).to.equal(1);
    expect(down.stderr).to.contain("UNAVAILABLE");
    expect((await net.clients.cardholder.getCard({})).purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor);
    expect((await statement()).stdout).to.contain("on hold for loads not yet confirmed");
    await net.launcher.start("load", SCRIPTS.load, ["--listen", net.addresses.load!, "--data", net.dir]);
    const sync = await netpurse("card", "sync");
    expect(sync.stdout).to.match(/loaded +posted/);
    expect((await net.clients.cardholder.getCard({})).purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor + 300n);
    const s = await statement();
    expect(s.stdout).to.match(/balance EUR 992\.00 +available EUR 992\.00/);
    expect(s.stdout).to.not.contain("on hold");
    expect((await netpurse("card", "sync")).stdout).to.contain("no pending loads");
  });
});

describe("end to end: the README's first command (npm start -- --once)", function () {
  this.timeout(180_000);
  it("sets up the demo data, runs the network, makes a purchase and stops cleanly — twice", async () => {
    const { dir, cleanup } = await tempDir("netpurse-start-");
    try {
      for (const round of [1, 2]) {
        const { stdout } = await run(process.execPath, ["--import", "tsx", "services/network/main.ts", "--once", "--data", dir], {
          cwd: ROOT,
          timeout: 120_000,
        });
        expect(stdout, `round ${round}`).to.contain("goods released");
        expect(stdout, `round ${round}`).to.contain("the bank verified the confirmation and debited the account");
        expect(stdout).to.contain("stopped.");
        if (round === 1) expect(stdout).to.contain("issuer: personalised card");
        else expect(stdout).to.not.contain("issuer: created master keys");
      }
    } finally {
      await cleanup();
    }
  });
});
