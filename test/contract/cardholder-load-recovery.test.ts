// The client daemon finishes loads that stopped half-way: the client
// "disappears" after each step (a crash injected in its journal, everything
// else the real network), and the next transaction, a `card sync`, or the
// next load finishes it. The card's own history confirms a credit whose
// confirmation was lost (the pending deposit); a card that never took its
// LOAD proves it with its zero-value S1. Each case checks the card, the
// account and the hold.

import { expect } from "chai";
import { join } from "node:path";
import { BankServiceDefinition, HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadState } from "../../gen/netpurse/load/v1/load.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { createLogger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { openSqlite } from "../../lib/store/db.js";
import { CardholderDaemon } from "../../client/daemon/daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal, type SqliteLoadJournal } from "../../client/daemon/journal.js";
import { account, Crash, CrashingLoadJournal, EUR, freshCardholder, LOADED, NOT_LOADED, TEST_PASSWORD_COST, type LoadStep } from "../support/load.js";
import { hashPassword } from "../../services/bank/credentials.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { startNetwork, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";
import { NetpurseError, Status } from "../../lib/grpc/errors.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { txnId } from "../../lib/ids.js";
import { randomBytes } from "node:crypto";
import { writeBankFile } from "../../services/bank/identity.js";
import { startBankServer } from "../../services/bank/server.js";

describe("client daemon: loads the client dropped out of half-way", function () {
  this.timeout(60_000);
  let net: Network;
  let n = 0;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }] });
  });
  after(async () => net?.close());

  /** A cardholder with an empty card, an account of EUR 1000.00, and a daemon whose journal crashes where told. */
  async function cardholder() {
    const h = await freshCardholder(net);
    const db = openSqlite(join(net.data, `client-load-${++n}`, "client.db"), CLIENT_MIGRATIONS);
    const loads = new CrashingLoadJournal(db);
    const daemon = new CardholderDaemon({
      transport: new InProcessTransport(h.card),
      journal: new SqliteJournal(db),
      loads,
      log: createLogger(`client-load-${n}`),
      security: net.security.cardholder,
    });
    const load = (minor: number) =>
      daemon.service.loadCard(
        {
          bankAddress: net.bank.address,
          accountId: h.accountId,
          amount: money(minor, EUR, 2),
          approvedAmount: money(minor, EUR, 2),
          requestId: "",
          bankAccessToken: h.token,
        },
        {} as never,
      );
    const close = async () => {
      await daemon.close();
      await db.close();
    };
    return { ...h, db, daemon, loads, load, close };
  }

  const open = async (c: { loads: SqliteLoadJournal }) => c.loads.openLoads();
  const cardBalance = async (c: { reader: { readPurse(): Promise<{ balance: number }> } }) => (await c.reader.readPurse()).balance;
  /** The load server's whole record, as the operator reads it. */
  const loadAtServer = (transactionId: string) => net.clients.loadAsOperator.getLoad({ transactionId: txnId(transactionId) });

  /**
   * A load the client drops out of right after the card's credit was journaled: the injected crash must be
   * what ended it (nothing else, and not no error at all), and the load must be left pending everywhere: open
   * in the journal with the card's answer, PENDING at the load server, the funds held at the bank, the card credited.
   */
  async function pendingDeposit(c: Awaited<ReturnType<typeof cardholder>>, minor: number) {
    c.loads.crashAfter = "loadAnswered";
    const e = await c.load(minor).then(
      () => undefined,
      (x: unknown) => x,
    );
    c.loads.crashAfter = undefined;
    expect(e, "the injected crash ended the load").to.be.instanceOf(Error);
    expect((e as Error).message).to.contain("crashed after loadAnswered");
    const loads = await open(c);
    expect(loads.map((l) => l.state)).to.deep.equal(["CARD_ANSWERED"]);
    const pending = loads[0]!;
    expect((await loadAtServer(pending.transactionId)).state).to.equal(LoadState.LOAD_STATE_PENDING);
    const held = await account(net, c.accountId);
    expect(held).to.deep.include({ balance: 100_000, available: 100_000 - minor });
    expect(held.holds.find((h) => h.transactionId?.value === pending.transactionId)?.state).to.equal(HoldState.HOLD_STATE_HELD);
    expect(await cardBalance(c)).to.equal(minor);
    return pending;
  }

  const drops: [LoadStep, string, number, number][] = [
    // step the client dropped out after, what the resumed load ends as, card balance, account balance
    ["loadStarted", "the bank's offer (never received): asked again by its id, the same hold, then loaded", 2_000, 98_000],
    ["loadOffered", "the offer: the load is made from it", 2_000, 98_000],
    ["loadRequested", "the card's INITIALIZE FOR LOAD (the request never left): the load server never saw it, so the load is made again", 2_000, 98_000],
    ["loadSent", "the LOAD command (the card never saw it): its zero-value S1 proves no load, the hold is released", 0, 100_000],
    ["loadAnswered", "the card's credit (the load server never heard): the card's history confirms it", 2_000, 98_000],
    ["loadSettled", "the load server's confirmation (the bank never got it): delivered", 2_000, 98_000],
  ];
  for (const [step, what, card, bank] of drops) {
    it(`after ${what}`, async () => {
      const c = await cardholder();
      try {
        c.loads.crashAfter = step;
        // The daemon reports the crash as an error of its own; the journal kept the step.
        expect(String(((await c.load(2_000).catch((e: unknown) => e)) as Error).message)).to.contain(`crashed after ${step}`);
        c.loads.crashAfter = undefined;
        expect(await open(c)).to.have.length(1);
        const { loads } = await c.daemon.service.syncCard({}, {} as never);
        expect(loads).to.have.length(1);
        expect(loads![0]!.outcome).to.equal(card ? LOADED : NOT_LOADED);
        expect(loads![0]!.holdState).to.equal(card ? HoldState.HOLD_STATE_POSTED : HoldState.HOLD_STATE_RELEASED);
        expect(await cardBalance(c)).to.equal(card);
        expect(await account(net, c.accountId)).to.deep.include({ balance: bank, available: bank });
        expect(await open(c)).to.have.length(0);
        // Nothing more happens on a second sync: the money moved once.
        expect((await c.daemon.service.syncCard({}, {} as never)).loads).to.have.length(0);
        expect(await account(net, c.accountId)).to.deep.include({ balance: bank });
      } finally {
        await c.close();
      }
    });
  }

  describe("a load whose bank offer never arrived, resumed without the account holder's access token (the daemon keeps tokens in memory only)", () => {
    /** The daemon after a restart: the same journal and card, no access token. */
    const restarted = (c: Awaited<ReturnType<typeof cardholder>>) =>
      new CardholderDaemon({
        transport: new InProcessTransport(c.card),
        journal: new SqliteJournal(c.db),
        loads: c.loads,
        log: createLogger("client-restarted"),
        security: net.security.cardholder,
      });

    it("before the bank was asked: the load ends, nothing is held, the card is untouched, and the next load goes ahead", async () => {
      const c = await cardholder();
      const again = restarted(c);
      try {
        c.loads.crashAfter = "loadStarted";
        expect(String(((await c.load(2_000).catch((e: unknown) => e)) as Error).message)).to.contain("crashed after loadStarted");
        const synced = (await again.service.syncCard({}, {} as never)).loads ?? [];
        expect(synced).to.have.length(1);
        expect(synced[0]?.detail).to.contain("no access token");
        expect(await open(c)).to.have.length(0);
        expect(await cardBalance(c)).to.equal(0);
        expect(await account(net, c.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
        expect((await c.load(500)).outcome).to.equal(LOADED);
        expect(await cardBalance(c)).to.equal(500);
      } finally {
        await again.close();
        await c.close();
      }
    });

    it("after the bank made its hold: the load ends, the card is untouched, and the bank's sweep releases the hold", async () => {
      const c = await cardholder();
      // The bank's answer is lost: the daemon never journals the offer.
      const lostOffer = new (class extends CrashingLoadJournal {
        override async loadOffered(): Promise<void> {
          throw new Crash("the bank's answer was lost");
        }
      })(c.db);
      const losing = new CardholderDaemon({
        transport: new InProcessTransport(c.card),
        journal: new SqliteJournal(c.db),
        loads: lostOffer,
        log: createLogger("client-lost-offer"),
        security: net.security.cardholder,
      });
      const again = restarted(c);
      try {
        const lost = await losing.service
          .loadCard(
            {
              bankAddress: net.bank.address,
              accountId: c.accountId,
              amount: money(2_000, EUR, 2),
              approvedAmount: money(2_000, EUR, 2),
              requestId: "",
              bankAccessToken: c.token,
            },
            {} as never,
          )
          .catch((e: unknown) => e);
        expect((lost as Error).message).to.contain("the bank's answer was lost");
        expect(await account(net, c.accountId)).to.deep.include({ balance: 100_000, available: 98_000 });
        const synced = (await again.service.syncCard({}, {} as never)).loads ?? [];
        expect(synced[0]?.detail).to.contain("no access token");
        expect(await open(c)).to.have.length(0);
        expect(await cardBalance(c)).to.equal(0);
        // Nobody comes back for the hold: the bank's sweep asks the load server to end the load, which never had a LOAD command.
        await net.bank.server.resolveStaleHolds(0);
        expect(await account(net, c.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
      } finally {
        await losing.close();
        await again.close();
        await c.close();
      }
    });
  });

  it("a load request that got through but whose answer was lost: the next purchase waits for the card's zero-value proof, then goes ahead", async () => {
    const c = await cardholder();
    try {
      // The client vanishes after the load server issued the LOAD command, before it could journal it.
      const lost = new (class extends CrashingLoadJournal {
        override async loadSent(): Promise<void> {
          throw new Crash("the answer to the load request was lost");
        }
      })(c.db);
      const daemon = new CardholderDaemon({
        transport: new InProcessTransport(c.card),
        journal: new SqliteJournal(c.db),
        loads: lost,
        log: createLogger("client-lost"),
        security: net.security.cardholder,
      });
      const lostAnswer = await daemon.service
        .loadCard(
          {
            bankAddress: net.bank.address,
            accountId: c.accountId,
            amount: money(2_000, EUR, 2),
            approvedAmount: money(2_000, EUR, 2),
            requestId: "",
            bankAccessToken: c.token,
          },
          {} as never,
        )
        .then(
          () => undefined,
          (x: unknown) => x,
        );
      expect(lostAnswer, "the injected crash ended the load").to.be.instanceOf(Error);
      expect((lostAnswer as Error).message).to.contain("the answer to the load request was lost");
      const [open1] = await open(c);
      expect(open1!.state).to.equal("REQUESTED");
      expect((await loadAtServer(open1!.transactionId)).state).to.equal(LoadState.LOAD_STATE_PENDING);
      // The proof reference the card's zero-value answer needs is not for strangers: the client gets it by showing its offer.
      const asStranger = await net.clients.load.getLoad({ transactionId: txnId(defined(open1, "the open load").transactionId) });
      expect([asStranger.state, asStranger.proofReference, asStranger.amount]).to.deep.equal([LoadState.LOAD_STATE_PENDING, undefined, undefined]);
      const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
      const e = (await c.daemon.service.payOffer({ offer, approvedAmount: offer!.amount, requestId: "" }, {} as never).catch((x: unknown) => x)) as Error;
      expect(e.message).to.contain("the card holds EUR 0.00"); // the load was proven not made (the card is still empty), so the purchase is refused on its balance
      expect((await loadAtServer(open1!.transactionId)).outcome).to.equal(NOT_LOADED);
      expect(await account(net, c.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
      expect(await cardBalance(c)).to.equal(0);
    } finally {
      await c.close();
    }
  });

  it("a load the load server will not even record (a bank it does not know) ends at once and does not block the card", async () => {
    const c = await cardholder();
    const dir = join(net.data, "stranger-bank");
    await writeBankFile(join(dir, "bank.json"), "stranger-bank", randomBytes(32).toString("hex"));
    const stranger = await startBankServer({
      security: await net.security.of("bank", "stranger-bank"),
      listen: "127.0.0.1:0",
      dir,
      loadServer: net.load.address,
    });
    try {
      const passwordHash = await hashPassword("stranger's password", TEST_PASSWORD_COST);
      await stranger.store.open({ accountId: "acct", holder: "Stranger", currency: EUR, exponent: 2, openingMinor: 10_000, passwordHash });
      const channel = openChannel(stranger.address, net.security.cardholder.channel({ kind: "bank" }));
      const { accessToken } = await clientFactory()
        .create(BankServiceDefinition, channel)
        .login({ accountId: "acct", password: "stranger's password" })
        .finally(() => channel.close());
      const amount = money(1_000, EUR, 2);
      const e = (await c.daemon.service
        .loadCard(
          { bankAddress: stranger.address, accountId: "acct", amount, approvedAmount: amount, bankAccessToken: accessToken, requestId: "" },
          {} as never,
        )
        .catch((x: unknown) => x)) as NetpurseError;
      expect(e).to.be.instanceOf(NetpurseError);
      expect([e.code, e.reason]).to.deep.equal([Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_UNKNOWN_BANK]);
      expect(await open(c)).to.have.length(0);
      // The card was never at risk, so it is free for the next transaction.
      expect((await c.load(500)).outcome).to.equal(LOADED);
      expect(await cardBalance(c)).to.equal(500);
    } finally {
      await stranger.close();
      await c.close();
    }
  });

  it("a pending deposit is confirmed with the card's next purchase", async () => {
    const c = await cardholder();
    try {
      const pending = await pendingDeposit(c, 3_000);
      const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
      await c.daemon.service.payOffer({ offer, approvedAmount: offer!.amount, requestId: "" }, {} as never);
      expect((await loadAtServer(pending.transactionId)).state).to.equal(LoadState.LOAD_STATE_SETTLED);
      expect(await account(net, c.accountId)).to.deep.include({ balance: 97_000, available: 97_000 });
      expect(await cardBalance(c)).to.equal(3_000 - 99);
    } finally {
      await c.close();
    }
  });

  it("a pending deposit is confirmed with the card's next load", async () => {
    const c = await cardholder();
    try {
      const pending = await pendingDeposit(c, 1_000);
      const r = await c.load(500);
      expect(r.outcome).to.equal(LOADED);
      expect(await cardBalance(c)).to.equal(1_500);
      expect(await account(net, c.accountId)).to.deep.include({ balance: 98_500, available: 98_500 });
      expect(await open(c)).to.have.length(0);
      expect((await loadAtServer(pending.transactionId)).outcome).to.equal(LOADED);
    } finally {
      await c.close();
    }
  });
});
