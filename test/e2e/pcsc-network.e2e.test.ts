// The whole network with the card and every PSAM behind real PC/SC readers:
// pcscd with vsmartcard's vpcd driver, the project's emulated cards on it,
// and the client daemon and the terminal hosts reaching them through
// pcsclite. A purchase in each confirmation mode and a load; a card taken
// out mid-DEBIT finished from its log; a PSAM taken out leaving the pool at
// once and joining it again; pcscd restarted under a running daemon.
// Skipped loudly where PC/SC cannot be set up (test/support/pcsc.ts).

import { expect } from "chai";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { setTimeout as sleep } from "node:timers/promises";
import { Status } from "nice-grpc";
import { PurseIns } from "../../lib/protocol/purse.js";
import { PsamSlotState } from "../../gen/netpurse/terminal/v1/terminal.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { money } from "../../lib/money.js";
import { hexOf } from "../../lib/ids.js";
import { reasonOf } from "../../lib/grpc/errors.js";
import { DEMO_SHOPS } from "../../services/network/layout.js";
import type { ReaderSurvey } from "../../client/cli/readers.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { account, EUR, openAccount } from "../support/load.js";
import type { ReaderSlot } from "../../services/emulator/emulator.js";
import type { EmulatorControl } from "../../services/emulator/emulator-process.js";

const run = promisify(execFile);
const NETPURSE = join(process.cwd(), "bin", "netpurse");

/**
 * `netpurse readers --json`, in a process of its own: this process does not
 * open and close PC/SC contexts of its own between steps (the binding's
 * close can wait for pcscd without a limit), and a PC/SC program is what a
 * cardholder would look with.
 */
async function readersNow(): Promise<ReaderSurvey[]> {
  return JSON.parse((await run(NETPURSE, ["readers", "--json"], { timeout: 30_000 })).stdout) as ReaderSurvey[];
}

describe("PC/SC: the whole network with the card and every PSAM behind real readers (pcscd + vpcd)", function () {
  this.timeout(120_000);
  let net: Network;
  /** The emulator's control, the card's reader and the PSAMs' readers. */
  let emulator: EmulatorControl;
  let cardReader: ReaderSlot;
  let psamReaders: ReaderSlot[];

  before(async function () {
    net = await startNetwork({ pcsc: this, terminals: [{ id: "terminal-1", psams: 2 }] });
    emulator = net.readers!.control;
    cardReader = net.readers!.readers.find((r) => r.kind === "card")!;
    psamReaders = net.readers!.readers.filter((r) => r.kind === "PSAM");
  });
  after(async () => net?.close());

  const slots = async () => (await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots);
  // In the pool: free, or leased to the payment server (the operator sees BUSY then).
  const inPool = [PsamSlotState.PSAM_SLOT_STATE_READY, PsamSlotState.PSAM_SLOT_STATE_BUSY];
  const balance = async () => Number((await net.clients.cardholder.getCard({}, { deadline: 20_000 })).purse!.balance!.amountMinor);

  it("lists the card and both PSAMs as pcscd sees them (netpurse readers): the PSAMs held by their terminal host", async () => {
    const rows = await readersNow();
    const byName = new Map(rows.map((r) => [r.reader, r]));
    expect(byName.get(cardReader.name)?.holds).to.equal("netpurse card");
    expect(byName.get(cardReader.name)?.detail).to.contain("balance EUR 100.00");
    expect(psamReaders).to.have.length(2);
    for (const r of psamReaders) {
      expect(byName.get(r.name)?.holds, r.name).to.equal("in use");
      expect(byName.get(r.name)?.detail, r.name).to.contain("held by another program");
      expect(byName.get(r.name)?.atr, r.name).to.not.equal("");
    }
  });

  it("bin/netpurse readers prints that table, and --json the same rows", async () => {
    const table = (await run(NETPURSE, ["readers"], { timeout: 30_000 })).stdout;
    const cardLine = table.split("\n").find((l) => l.startsWith(cardReader.name));
    expect(cardLine, table).to.match(/netpurse card\s+purse [0-9a-f]{16}, balance EUR \d+\.\d\d/);
    const rows = await readersNow();
    expect(rows.find((r) => r.reader === cardReader.name)?.holds).to.equal("netpurse card");
    expect(rows.filter((r) => r.holds === "empty").map((r) => r.reader)).to.include(cardReader.name.replace(/ 00 00$/, " 00 01"));
  });

  for (const d of DEMO_SHOPS) {
    it(`pays in ${d.shop.confirmationMode.replace("CONFIRMATION_MODE_", "")} with the card and the PSAMs behind PC/SC`, async () => {
      const before = await balance();
      const merchant = net.merchants[d.shop.merchantId]!;
      const { offer } = await merchant.createOrder({ productId: d.shop.products[0]!.productId });
      const paid = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 60_000 });
      const price = Number(offer!.amount!.amountMinor);
      expect(paid.receipt?.goods, "goods released").to.not.equal("");
      expect(await balance()).to.equal(before - price);
      // The PSAM that signed is one of the PSAMs in a reader, and the card's log holds the purchase.
      const log = (await net.clients.cardholder.listCardTransactions({ limit: 1 })).transactions[0]!;
      expect(log.transactionId?.value).to.equal(offer!.transactionId!.value);
      expect(hexOf(log.psamId?.value)).to.equal(hexOf(paid.receipt!.psamId?.value));
    });
  }

  it("loads the card from a bank account through PC/SC", async () => {
    const before = await balance();
    const a = await openAccount(net, { accountId: "acct-pcsc", deposit: 50_000 });
    const r = await net.clients.cardholder.loadCard(
      {
        bankAddress: net.bank.address,
        accountId: a.accountId,
        amount: money(2_500, EUR, 2),
        approvedAmount: money(2_500, EUR, 2),
        requestId: "",
        bankAccessToken: a.token,
      },
      { deadline: 60_000 },
    );
    expect(Number(r.purse!.balance!.amountMinor)).to.equal(before + 2_500);
    expect(await balance()).to.equal(before + 2_500);
    expect((await account(net, a.accountId)).balance).to.equal(50_000 - 2_500);
  });

  it("a card taken out right after it debited: the purchase is in doubt (NO_CARD), and finished from the card's log once it is back", async () => {
    const before = await balance();
    const { offer } = await net.clients.merchant.createOrder({ productId: DEMO_SHOPS[0]!.shop.products[0]!.productId });
    const price = Number(offer!.amount!.amountMinor);
    // The card debits and logs it; the cardholder pulls it before its answer leaves.
    await emulator.takeOutAfter(cardReader.name, PurseIns.DEBIT);
    const failed = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 60_000 }).catch((e: unknown) => e);
    expect(failed).to.be.instanceOf(Error);
    expect((failed as { code: Status }).code).to.equal(Status.UNAVAILABLE);
    expect(reasonOf(failed), String(failed)).to.equal(ErrorReason.ERROR_REASON_NO_CARD);
    // While the card is out, nothing can be read from it: the same precise error.
    const absent = await net.clients.cardholder.getCard({}, { deadline: 20_000 }).catch((e: unknown) => e);
    expect(reasonOf(absent)).to.equal(ErrorReason.ERROR_REASON_NO_CARD);
    // The reader shows it empty, as any PC/SC program sees it; a moment later the cardholder puts it back.
    const holds = async () => (await readersNow()).find((r) => r.reader === cardReader.name)?.holds;
    await waitFor(async () => (await holds()) === "empty", 10_000, "the reader empty");
    // A moment later the cardholder puts it back; any PC/SC program sees it again (the daemon let go of its
    // broken connection when the card went, or pcscd would keep the reader locked to it).
    await sleep(1_000);
    await emulator.insert(cardReader.name);
    await emulator.whenReady(cardReader.name);
    await waitFor(async () => (await holds()) === "netpurse card", 15_000, "the card answering in its reader again");
    // Back in: the daemon's resume (every 30 s; called here at once) reads the card's log, completes the purchase once, and the goods come.
    let finished = 0;
    for (let i = 0; i < 10 && finished === 0; i++) {
      finished = await net.daemon.daemon.resume();
      if (!finished) await sleep(1_000);
    }
    expect(finished, "purchases finished from the card's log").to.equal(1);
    expect(await balance()).to.equal(before - price);
    const log = (await net.clients.cardholder.listCardTransactions({ limit: 1 })).transactions[0]!;
    expect(log.transactionId?.value).to.equal(offer!.transactionId!.value);
    const rec = (await net.clients.payment.getPurchase({ transactionId: offer!.transactionId })).purchase!;
    expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
  });

  it("a PSAM taken out leaves the pool at once (slot EMPTY), purchases go on with the other, and it joins again when put back", async () => {
    const psamReader = psamReaders[0]!;
    const stateOf = async (reader: string) => (await slots()).find((s) => s.reader === reader)?.state;
    expect(inPool).to.include(await stateOf(psamReader.name));
    await emulator.remove(psamReader.name);
    await waitFor(async () => (await stateOf(psamReader.name)) === PsamSlotState.PSAM_SLOT_STATE_EMPTY, 10_000, "the slot shown EMPTY");
    const removed = hexOf((await slots()).find((s) => s.reader === psamReader.name)!.psamId?.value);
    // Purchases go on, each signed by the PSAM still in its reader.
    for (let i = 0; i < 2; i++) {
      const before = await balance();
      const { offer } = await net.clients.merchant.createOrder({ productId: DEMO_SHOPS[0]!.shop.products[0]!.productId });
      const paid = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 60_000 });
      expect(hexOf(paid.receipt!.psamId?.value)).to.not.equal(removed);
      expect(await balance()).to.equal(before - Number(offer!.amount!.amountMinor));
    }
    await emulator.insert(psamReader.name);
    await waitFor(async () => inPool.includes((await stateOf(psamReader.name))!), 15_000, "the slot in the pool again");
  });

  it("a card that is not a PSAM, in a reader a terminal host takes PSAMs from, is not taken into the pool, nor kept from its owner", async () => {
    // A terminal host whose pattern also matches the cardholder's reader (an operator's mistake, or a card someone slipped in).
    const host = await startTerminalHost({
      security: await net.security.of("terminal", "terminal-x"),
      terminalId: "terminal-x",
      concentrator: net.concentrator.address,
      clearingAddress: net.clearingServer.address,
      dir: join(net.data, "terminals", "terminal-x"),
      psamReaders: `^${cardReader.name}$`,
    });
    try {
      await host.host.whenConnected();
      const x = (await net.clients.concentrator.listTerminals({})).terminals.find((t) => t.terminalId === "terminal-x");
      expect(x?.slots, "slots of terminal-x").to.deep.equal([]);
      // The purse card answered SELECT of the PSAM application with 6A82 and was let go: the reader is free.
      await waitFor(async () => (await readersNow()).find((r) => r.reader === cardReader.name)?.holds === "netpurse card", 15_000, "the card reader free");
      expect(await balance()).to.be.greaterThan(0);
    } finally {
      await host.close();
    }
  });

  it("survives pcscd restarting under the running daemon and terminal host", async () => {
    const before = await balance();
    await net.readers!.pcscd!.restart();
    await emulator.whenReady();
    // The daemon and the hosts reopen their PC/SC contexts on their own; a purchase works again.
    await waitFor(async () => (await slots()).every((s) => inPool.includes(s.state)), 20_000, "both PSAMs back in the pool after the restart");
    const { offer } = await net.clients.merchant.createOrder({ productId: DEMO_SHOPS[0]!.shop.products[0]!.productId });
    let paid: unknown;
    await waitFor(
      async () => {
        paid = await net.clients.cardholder
          .payOffer({ offer, approvedAmount: offer!.amount, requestId: "after-restart" }, { deadline: 30_000 })
          .catch(() => undefined);
        return paid !== undefined;
      },
      30_000,
      "a purchase after pcscd restarted",
    );
    expect(await balance()).to.equal(before - Number(offer!.amount!.amountMinor));
  });
});
