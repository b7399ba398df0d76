// End to end, the client daemon killed at each step of a load and of a
// purchase: the daemon is its own process, made to SIGKILL itself at a
// named journal step (the test-only NETPURSE_TEST_DAEMON_DIE_AT), then
// started again, and its start-up recovery and a SyncCard finish what it
// left. No row of client.db may stay in a non-final state, and the money
// must agree: the card holds its first value plus what the load server
// loaded minus what the payment server was paid, and the bank debited the
// account exactly for the loads.
//
// The fast form (npm test) kills at the steps where the money is most at
// risk; NETPURSE_CRASH_SWEEP=full kills at every step, twice.

import { expect } from "chai";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { Status } from "nice-grpc";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { LoadOutcome, LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { DIE_AT_ENV, DIE_STEPS, type DieStep } from "../../client/daemon/test-crash.js";
import { bearer, clientFactory, openChannel } from "../../lib/grpc/client.js";
import { txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { openSqlite } from "../../lib/store/db.js";
import { DEMO_BANK, demoBankPassword } from "../../services/network/layout.js";
import { SCRIPTS } from "../../services/network/launcher.js";
import { EUR } from "../support/fixtures.js";
import { testSecurity, waitFor } from "../support/network.js";
import { launchE2E, type E2E } from "../support/processes.js";
import { defined } from "../support/offers.js";

const FULL = process.env.NETPURSE_CRASH_SWEEP === "full";
/** The fast form's steps: a load before and after the bank's hold and after the card's credit; a purchase before the DEBIT command and around the card's debit. */
const FAST: DieStep[] = ["load:STARTED", "load:OFFERED", "load:CARD_ANSWERED", "purchase:STARTED", "purchase:DEBIT_SENT", "purchase:before-CARD_ANSWERED"];
const STEPS: DieStep[] = FULL ? [...DIE_STEPS, ...DIE_STEPS] : FAST;
const LOAD_MINOR = 500;

describe("end to end: the client daemon killed at each step of a load and a purchase", function () {
  this.timeout(FULL ? 600_000 : 120_000);
  let net: E2E;
  after(async () => net?.close());
  afterEach(function () {
    // The daemon's own account of what went wrong: its log dies with the data folder.
    if (this.currentTest?.state === "failed" && net) {
      const log = join(net.dir, "logs", "client-daemon.log");
      if (existsSync(log)) process.stderr.write(`--- ${log} (last lines) ---\n${readFileSync(log, "utf8").split("\n").slice(-60).join("\n")}\n`);
    }
  });

  it(`leaves no journal row open and the money agrees (${FULL ? "full: every step, twice" : "fast: the riskiest steps"})`, async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 2 }] });
    const security = await testSecurity(net.dir);
    const bankAddress = defined(net.addresses.bank, "the bank's address");
    const factory = clientFactory();
    const bankChannel = openChannel(bankAddress, security.cardholder.channel({ kind: "bank" }));
    const operator = await security.of("operator", "operator");
    const loadChannel = openChannel(defined(net.addresses.load, "the load server's address"), operator.channel({ kind: "load" }));
    const bank = factory.create(BankServiceDefinition, bankChannel);
    const loadServer = factory.create(LoadServiceDefinition, loadChannel);
    const { accessToken } = await bank.login({ accountId: DEMO_BANK.accountId, password: await demoBankPassword(net.dir) });
    const accountBalance = async () => {
      const a = await bank.getAccount({ accountId: DEMO_BANK.accountId }, { metadata: bearer(accessToken) });
      return { balance: Number(a.balance?.amountMinor), available: Number(a.available?.amountMinor) };
    };

    /** The daemon process, started again; dying at `step` if given. */
    const startDaemon = async (step?: DieStep) => {
      await net.launcher.stop("client-daemon");
      await net.launcher.start("client-daemon", SCRIPTS.clientDaemon, ["--card", net.cardPath, "--data", net.dir], 60_000, step ? { [DIE_AT_ENV]: step } : {});
    };
    const withDaemon = async <T>(fn: (c: ReturnType<typeof factory.create<typeof CardholderServiceDefinition>>) => Promise<T>) => {
      const channel = openChannel(defined(net.addresses.clientDaemon, "the daemon's socket"), { insecure: true });
      try {
        return await fn(factory.create(CardholderServiceDefinition, channel));
      } finally {
        channel.close();
      }
    };
    const journal = async () => {
      const db = openSqlite(join(net.paths.client, "client.db"), []);
      try {
        const loads = await db.all<{ transaction_id: string; state: string }>("SELECT transaction_id, state FROM client_loads");
        const purchases = await db.all<{ transaction_id: string; state: string; proof_reported: number; expected_signature_digest: Buffer | null }>(
          "SELECT transaction_id, state, proof_reported, expected_signature_digest FROM client_purchases",
        );
        return { loads, purchases };
      } finally {
        await db.close();
      }
    };
    const open = async () => {
      const j = await journal();
      return [
        ...j.loads.filter((r) => !["DONE", "FAILED"].includes(r.state)).map((r) => `load ${r.transaction_id} ${r.state}`),
        ...j.purchases
          .filter(
            (r) => !["RECEIPT", "FAILED"].includes(r.state) || (r.state === "RECEIPT" && !r.proof_reported && (r.expected_signature_digest?.length ?? 0) > 0),
          )
          .map((r) => `purchase ${r.transaction_id} ${r.state}`),
      ];
    };

    const cardBefore = await withDaemon(async (c) => Number((await c.getCard({})).purse?.balance?.amountMinor));
    const bankBefore = await accountBalance();
    for (const step of STEPS) {
      await startDaemon(step);
      const dying = defined(net.launcher.get("client-daemon"), "the daemon process");
      const died = new Promise<void>((resolve) => dying.child.once("exit", () => resolve()));
      const e = await withDaemon(async (c) => {
        if (step.startsWith("load:")) {
          const amount = money(LOAD_MINOR, EUR, 2);
          return c.loadCard(
            { accountId: DEMO_BANK.accountId, bankAddress: bankAddress, amount, approvedAmount: amount, bankAccessToken: accessToken, requestId: "" },
            { deadline: 30_000 },
          );
        }
        const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
        return c.payOffer({ offer, approvedAmount: offer?.amount, requestId: "" }, { deadline: 30_000 });
      }).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e, `the daemon died at ${step}`).to.have.property("code", Status.UNAVAILABLE);
      await died;
      // Started again: its start-up recovery, and a SyncCard, finish what the dead one left.
      await startDaemon();
      await waitFor(
        async () => {
          await withDaemon((c) => c.syncCard({}, { deadline: 30_000 }));
          return (await open()).length === 0;
        },
        30_000,
        `the journal rows left at ${step} to end (open: ${(await open()).join(", ")})`,
      );
    }

    // The money: every load the load server made credited the card and was debited at the bank, every purchase paid debited the card.
    const { loads, purchases } = await journal();
    let loaded = 0;
    for (const l of loads) {
      const at = await loadServer.getLoad({ transactionId: txnId(l.transaction_id) }).catch(() => undefined);
      const made = at?.outcome === LoadOutcome.LOAD_OUTCOME_LOADED;
      // A load the load server made is DONE in the journal; a DONE one is known there, loaded or not.
      if (made) expect(l.state, `load ${l.transaction_id}`).to.equal("DONE");
      if (l.state === "DONE")
        expect(at?.outcome, `load ${l.transaction_id} DONE`).to.be.oneOf([LoadOutcome.LOAD_OUTCOME_LOADED, LoadOutcome.LOAD_OUTCOME_NOT_LOADED]);
      if (made) loaded += LOAD_MINOR;
    }
    let paid = 0;
    for (const p of purchases) {
      const at = (await net.clients.payment.getPurchase({ transactionId: txnId(p.transaction_id) }).catch(() => undefined))?.purchase;
      const done = at?.state === PurchaseState.PURCHASE_STATE_COMPLETED;
      expect(done, `purchase ${p.transaction_id} ${p.state}`).to.equal(p.state === "RECEIPT");
      if (done) paid += Number(at.amount?.amountMinor);
    }
    const cardAfter = await withDaemon(async (c) => Number((await c.getCard({})).purse?.balance?.amountMinor));
    expect(cardAfter, "card = before + loads - purchases").to.equal(cardBefore + loaded - paid);
    expect(await accountBalance(), "the bank debited the loads, holds none").to.deep.equal({
      balance: bankBefore.balance - loaded,
      available: bankBefore.balance - loaded,
    });
    expect(loaded, "some loads were made").to.be.greaterThan(0);
    expect(paid, "some purchases were paid").to.be.greaterThan(0);
    bankChannel.close();
    loadChannel.close();
  });
});
