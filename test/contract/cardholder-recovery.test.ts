// The client daemon finishes what a crash interrupted: the card's own log
// tells whether a DEBIT whose answer was lost was made, and the daemon
// completes or reverses the purchase accordingly. The crash is injected in
// the daemon's journal; everything else is the real network.

import { expect } from "chai";
import { join } from "node:path";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { OrderState } from "../../gen/netpurse/merchant/v1/merchant.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { createLogger } from "../../lib/log.js";
import { openSqlite } from "../../lib/store/db.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { CardholderDaemon } from "../../client/daemon/daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal, SqliteLoadJournal } from "../../client/daemon/journal.js";
import type { DebitSent } from "../../client/purchase.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { startNetwork, type Network } from "../support/network.js";

class Crash extends Error {}

/** A journal that crashes the purchase right after one step was written. */
class CrashingJournal extends SqliteJournal {
  crashAfter: "debitSent" | "cardAnswered" | undefined;

  override async debitSent(id: string, d: DebitSent) {
    await super.debitSent(id, d);
    if (this.crashAfter === "debitSent") throw new Crash("crashed before the card saw DEBIT");
  }

  override async cardAnswered(id: string, sw: number, raw: Buffer) {
    if (this.crashAfter === "cardAnswered") throw new Crash("crashed after the card debited, before its answer was journaled");
    await super.cardAnswered(id, sw, raw);
  }
}

describe("client daemon: finishing purchases a crash interrupted", function () {
  this.timeout(60_000);
  let net: Network;
  let daemon: CardholderDaemon;
  let journal: CrashingJournal;
  let loads: SqliteLoadJournal;
  let cardPath: string;

  before(async () => {
    net = await startNetwork();
    const issuer = await Issuer.open(net.paths.issuer);
    cardPath = join(net.paths.cards, "bob.card.json");
    await issuer.personaliseCard({ path: cardPath, currency: 978, exponent: 2, initialValue: 5_000, maxBalance: 50_000, expiry: "2031-12-31" });
    await issuer.close();
    const db = openSqlite(join(net.data, "client-bob", "client.db"), CLIENT_MIGRATIONS);
    journal = new CrashingJournal(db);
    loads = new SqliteLoadJournal(db);
    daemon = new CardholderDaemon({
      transport: new InProcessTransport(await SoftwareCard.open(cardPath)),
      journal,
      loads,
      log: createLogger("client-bob"),
      security: net.security.cardholder,
    });
  });
  after(async () => {
    await daemon?.close();
    await net?.close();
  });

  const pay = async () => {
    const { offer } = await net.clients.merchant.createOrder({ productId: "ebook-smart-cards" });
    const e = await daemon.service.payOffer({ offer, approvedAmount: offer!.amount, requestId: "" }, {} as never).catch((x: unknown) => x);
    return { offer: offer!, error: e as Error };
  };
  const balance = async () => {
    const c = await daemon.service.getCard({}, {} as never);
    return Number(c.purse!.balance!.amountMinor);
  };

  it("a card debited whose answer was lost: the debit is found in the card's log, proven, and the goods fetched", async () => {
    const before = await balance();
    journal.crashAfter = "cardAnswered";
    const { offer, error } = await pay();
    journal.crashAfter = undefined;
    expect(error).to.not.equal(undefined);
    expect(await balance()).to.equal(before - 250); // the card did pay
    expect((await journal.get(offer.transactionId!.value))!.state).to.equal("DEBIT_SENT");

    expect(await daemon.resume()).to.equal(1);
    expect((await journal.get(offer.transactionId!.value))!.state).to.equal("RECEIPT");
    expect((await net.clients.payment.getPurchase({ transactionId: offer.transactionId })).purchase!.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect((await net.clients.merchant.getOrder({ transactionId: offer.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_PAID);
    expect(await balance()).to.equal(before - 250);
  });

  it("a DEBIT the card never saw: its log shows no debit, the PSAM reverses, nothing is paid", async () => {
    const before = await balance();
    journal.crashAfter = "debitSent";
    const { offer } = await pay();
    journal.crashAfter = undefined;
    expect((await journal.get(offer.transactionId!.value))!.state).to.equal("DEBIT_SENT");
    const open = async () =>
      (await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots).reduce((n, s) => n + s.pendingDebits.length, 0);
    expect(await open()).to.equal(1);

    expect(await daemon.resume()).to.equal(0);
    const row = (await journal.get(offer.transactionId!.value))!;
    expect(row.state).to.equal("FAILED");
    expect(row.error).to.contain("reversed");
    expect((await net.clients.payment.getPurchase({ transactionId: offer.transactionId })).purchase!.state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
    expect(await open()).to.equal(0);
    expect(await balance()).to.equal(before);
    expect((await net.clients.merchant.getOrder({ transactionId: offer.transactionId })).order!.state).to.equal(OrderState.ORDER_STATE_OFFERED);
  });

  it("a second card in the reader tells nothing about the first one's purchase", async () => {
    journal.crashAfter = "debitSent";
    const { offer } = await pay();
    journal.crashAfter = undefined;
    const other = new CardholderDaemon({
      transport: new InProcessTransport(await SoftwareCard.open(net.cardPath)),
      journal,
      loads,
      log: createLogger("client-other"),
      security: net.security.cardholder,
    });
    expect(await other.resume()).to.equal(0);
    expect((await journal.get(offer.transactionId!.value))!.state).to.equal("DEBIT_SENT"); // left for the right card
    await other.close();
    expect(await daemon.resume()).to.equal(0);
    expect((await journal.get(offer.transactionId!.value))!.state).to.equal("FAILED");
  });
});
