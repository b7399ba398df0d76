// Contract of netpurse.bank.v1.BankService and netpurse.load.v1.LoadService:
// the real bank and load server on loopback (with the real software security
// module), driven through the generated clients by a cardholder's client
// that can misbehave, and by the client daemon. Every case checks what a
// cardholder and a bank would: the card's balance and log, the account's
// balance, the hold, and the load server's record.

import { expect } from "chai";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { randomBytes, randomUUID } from "node:crypto";
import { HoldState, type Hold } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadConfirmation, LoadOutcome, LoadState, type GetLoadResponse } from "../../gen/netpurse/load/v1/load.js";
import { PurseStatus } from "../../gen/netpurse/card/v1/card.js";
import { SW } from "../../lib/apdu/apdu.js";
import { purseId, txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { loadTransactionKey, seal } from "../../lib/protocol/encryption-layer.js";
import { InitializeForLoadResponse, LoadCommand, LoadResponse, LoadResult } from "../../lib/protocol/load.js";
import { LogKind } from "../../lib/protocol/purse.js";
import { loadInitCommand } from "../../client/load/offer.js";
import { purseState } from "../../client/card/purse-state.js";
import { failure, flipBit } from "../support/card-client.js";
import { account, EUR, flipByte, freshCardholder, holdOf, LOADED, loadRequest, NOT_LOADED, offerFor, openAccount, zeroValue } from "../support/load.js";
import { startNetwork, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";

describe("contract: netpurse.bank.v1.BankService and netpurse.load.v1.LoadService", function () {
  this.timeout(60_000);
  let net: Network;

  before(async () => {
    // Paging lists hundreds of holds of one account: far above the bank's cap on holds, whose own test is in bank-auth.test.ts.
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], maxHoldsPerAccount: 1_000 });
  });
  after(async () => net?.close());

  const balance = async (h: { reader: { readPurse(): Promise<{ balance: number }> } }) => (await h.reader.readPurse()).balance;
  const loadState = async (o: { transactionId?: { value: string } }) => (await net.clients.load.getLoad({ transactionId: o.transactionId })).state;

  /** A whole well-behaved load through the step functions: offer, request, LOAD, CompleteLoad, ConfirmLoad. */
  async function loadStepByStep(h: Awaited<ReturnType<typeof freshCardholder>>, amountMinor: number) {
    const offer = await offerFor(net, h.reader, h.accountId, amountMinor);
    const { request } = await loadRequest(h.reader, offer);
    const issued = await net.clients.load.processLoadRequest(request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    const done = await net.clients.load.completeLoad({
      transactionId: offer.transactionId,
      loadResponse: answer.raw,
      zeroValueInitializeResponse: Buffer.alloc(0),
    });
    const bank = await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
    return { offer, issued, answer, done, bank };
  }

  describe("a load, end to end", () => {
    it("through the client daemon: the card holds the value, the bank moved exactly that amount, the hold is posted", async () => {
      const { accountId, token } = await openAccount(net, { accountId: "acct-daemon", holder: "Daemon Holder", deposit: 50_000 });
      const before = (await net.clients.cardholder.getCard({})).purse!;
      const amount = money(2_000, EUR, 2);
      const r = await net.clients.cardholder.loadCard({ bankAddress: net.bank.address, accountId, amount, approvedAmount: amount, bankAccessToken: token });
      expect(r.outcome).to.equal(LOADED);
      expect(r.holdState).to.equal(HoldState.HOLD_STATE_POSTED);
      expect(r.purse!.balance!.amountMinor).to.equal(before.balance!.amountMinor + 2_000n);
      expect(r.purse!.transactionCounter).to.equal(before.transactionCounter + 1);
      expect(await account(net, accountId)).to.deep.include({ balance: 48_000, available: 48_000 });
      expect(r.steps.map((s) => s.name)).to.include.members(["load offer", "load request", "LOAD command", "card credit", "confirmation", "bank"]);
      const log = (await net.clients.cardholder.listCardTransactions({ limit: 1 })).transactions[0]!;
      expect(log.transactionId?.value).to.equal(r.transactionId?.value);
      expect(log.amount!.amountMinor).to.equal(2_000n);
      const statement = (await net.bankAs(accountId).getAccount({ accountId })).statement;
      expect(statement[0]).to.deep.include({ text: `load to card ${Buffer.from(before.purseId!.value).toString("hex")}` });
      expect(statement[0]!.amount!.amountMinor).to.equal(-2_000n);
    });

    it("refuses a load the cardholder did not approve, without asking the bank", async () => {
      const e = await failure(
        net.clients.cardholder.loadCard({
          bankAddress: net.bank.address,
          accountId: "acct-daemon",
          amount: money(2_000, EUR, 2),
          approvedAmount: money(200, EUR, 2),
          bankAccessToken: net.bankToken("acct-daemon"),
        }),
      );
      expect(e).to.deep.include({ code: "FAILED_PRECONDITION", reason: "NOT_APPROVED" });
      expect((await account(net, "acct-daemon")).holds).to.have.length(1);
    });

    it("step by step: S1 verified, LOAD with S2, S3 verified, the credit in the card's log with its S3", async () => {
      const h = await freshCardholder(net);
      const { answer, done, bank, issued } = await loadStepByStep(h, 1_500);
      expect(answer.parsed).to.deep.include({ result: LoadResult.LOADED, counter: 1, balance: 1_500 });
      expect(done.load!.outcome).to.equal(LOADED);
      expect(bank.holdState).to.equal(HoldState.HOLD_STATE_POSTED);
      expect(Number(bank.balance!.amountMinor)).to.equal(100_000 - 1_500);
      const [entry] = await h.reader.readLog(1);
      expect(entry).to.deep.include({ kind: LogKind.LOAD, amount: 1_500, balance: 1_500, counter: 1, moduleCounter: issued.hsmCounter });
      expect(entry!.cardSignature.equals(answer.parsed!.s3)).to.equal(true);
    });

    it("the same load request twice gets the same LOAD command; the bank confirmation twice posts once", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 700);
      const { request } = await loadRequest(h.reader, offer);
      const a = await net.clients.load.processLoadRequest(request);
      const b = await net.clients.load.processLoadRequest(request);
      expect(Buffer.from(b.loadCommand).equals(Buffer.from(a.loadCommand))).to.equal(true);
      const answer = await h.reader.load(Buffer.from(a.loadCommand));
      const done = await net.clients.load.completeLoad({
        transactionId: offer.transactionId,
        loadResponse: answer.raw,
        zeroValueInitializeResponse: Buffer.alloc(0),
      });
      await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
      const again = await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
      expect(again.holdState).to.equal(HoldState.HOLD_STATE_POSTED);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000 - 700 });
    });
  });

  describe("the bank's offer", () => {
    it("holds the funds at offer time; the same offer asked again makes no second hold", async () => {
      const h = await freshCardholder(net);
      const id = randomUUID();
      const a = await offerFor(net, h.reader, h.accountId, 3_000, id);
      const b = await offerFor(net, h.reader, h.accountId, 3_000, id);
      expect(Buffer.from(b.keyNonce).equals(Buffer.from(a.keyNonce))).to.equal(true);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 97_000 });
      expect(await holdOf(net, h.accountId, a)).to.equal(HoldState.HOLD_STATE_HELD);
    });

    it("a transaction id reused with another amount gets ALREADY_EXISTS, and nothing more is held", async () => {
      const h = await freshCardholder(net);
      const id = randomUUID();
      await offerFor(net, h.reader, h.accountId, 1_000, id);
      const e = await failure(offerFor(net, h.reader, h.accountId, 9_000, id));
      expect(e).to.deep.include({ code: "ALREADY_EXISTS", reason: "TRANSACTION_ID_REUSED" });
      expect((await account(net, h.accountId)).available).to.equal(99_000);
    });

    const refusals: [string, Parameters<typeof freshCardholder>[1], number, string, string][] = [
      ["a load above the card's maximum balance", { value: 45_000, maxBalance: 50_000 }, 6_000, "FAILED_PRECONDITION", "MAX_BALANCE_EXCEEDED"],
      ["insufficient funds", { deposit: 1_000 }, 2_000, "FAILED_PRECONDITION", "INSUFFICIENT_FUNDS"],
      ["an expired card", { expiry: "2020-01-31" }, 1_000, "FAILED_PRECONDITION", "CARD_EXPIRED"],
    ];
    for (const [name, card, amountMinor, code, reason] of refusals) {
      it(`refuses ${name} (${code} ${reason}) and holds nothing`, async () => {
        const h = await freshCardholder(net, card);
        expect(await failure(offerFor(net, h.reader, h.accountId, amountMinor))).to.deep.include({ code, reason });
        const a = await account(net, h.accountId);
        expect(a.available).to.equal(a.balance);
        expect(a.holds).to.have.length(0);
      });
    }

    it("refuses a blocked card (FAILED_PRECONDITION CARD_BLOCKED)", async () => {
      const h = await freshCardholder(net);
      const purse = { ...purseState(await h.reader.readPurse()), status: PurseStatus.PURSE_STATUS_BLOCKED };
      const e = await failure(
        net.bankAs(h.accountId).createLoadOffer({ transactionId: txnId(randomUUID()), accountId: h.accountId, amount: money(500, EUR, 2), purse }),
      );
      expect(e).to.deep.include({ code: "FAILED_PRECONDITION", reason: "CARD_BLOCKED" });
    });

    it("malformed requests get INVALID_ARGUMENT naming the field; an unknown account PERMISSION_DENIED (the token's account only)", async () => {
      const h = await freshCardholder(net);
      const purse = purseState(await h.reader.readPurse());
      const ok = { transactionId: txnId(randomUUID()), accountId: h.accountId, amount: money(500, EUR, 2), purse };
      const cases: [Partial<typeof ok>, string][] = [
        [{ transactionId: txnId("not-a-uuid") }, "transaction_id"],
        [{ accountId: "" }, "account_id"],
        [{ amount: money(0, EUR, 2) }, "amount.amount_minor"],
        [{ purse: undefined }, "purse"],
        [{ purse: { ...purse, purseId: purseId("0102") } }, "purse.purse_id"],
      ];
      for (const [patch, field] of cases) {
        const e = await failure(net.bankAs(h.accountId).createLoadOffer({ ...ok, ...patch }));
        expect(e.code, field).to.equal("INVALID_ARGUMENT");
        expect(e.details, field).to.contain(field);
      }
      expect(await failure(net.bankAs(h.accountId).createLoadOffer({ ...ok, accountId: "nobody" }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "NOT_ALLOWED",
      });
      expect((await account(net, h.accountId)).holds).to.have.length(0);
    });
  });

  describe("attacks on the load", () => {
    it("a forged S1 gets PERMISSION_DENIED BAD_SIGNATURE; no LOAD command exists, and the bank's hold is released", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      const { request } = await loadRequest(h.reader, offer, { patchInit: (raw) => flipByte(raw, -1) });
      expect(await failure(net.clients.load.processLoadRequest(request))).to.deep.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      const settled = await net.clients.load.completeLoad({
        transactionId: offer.transactionId,
        loadResponse: Buffer.alloc(0),
        zeroValueInitializeResponse: Buffer.alloc(0),
      });
      expect(settled.load!.outcome).to.equal(NOT_LOADED);
      expect((await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: settled.load!.confirmation })).holdState).to.equal(
        HoldState.HOLD_STATE_RELEASED,
      );
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
      expect(await balance(h)).to.equal(0);
    });

    it("a card asked for more than the bank authorised gives an S1 the security module refuses", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 1_000);
      const { request } = await loadRequest(h.reader, offer, { askAmount: 10_000 });
      expect(await failure(net.clients.load.processLoadRequest(request))).to.deep.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect(await balance(h)).to.equal(0);
    });

    it("a forged S2 is refused by the card (6982); its zero-value S1 then proves no load and the hold is released", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const forged = flipByte(issued.loadCommand, LoadCommand.offset("s2"));
      expect((await h.reader.load(forged)).sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
      const zero = await zeroValue(h.reader, offer, issued);
      const done = await net.clients.load.completeLoad({
        transactionId: offer.transactionId,
        loadResponse: Buffer.alloc(0),
        zeroValueInitializeResponse: zero.raw,
      });
      expect(done.load!.outcome).to.equal(NOT_LOADED);
      expect((await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation })).holdState).to.equal(
        HoldState.HOLD_STATE_RELEASED,
      );
      expect(await balance(h)).to.equal(0);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
    });

    it("a forged S3 gets PERMISSION_DENIED and leaves the load pending and the funds held; the card's history then proves it", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 2_500);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      const forged = flipByte(answer.raw, LoadResponse.offset("s3"));
      const e = await failure(
        net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: forged, zeroValueInitializeResponse: Buffer.alloc(0) }),
      );
      expect(e).to.deep.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
      expect(await loadState(offer)).to.equal(LoadState.LOAD_STATE_PENDING);
      expect(await holdOf(net, h.accountId, offer)).to.equal(HoldState.HOLD_STATE_HELD);
      const history = await net.clients.load.reportCardHistory({ purseId: offer.purseId, cardLog: await h.reader.readLogRaw() });
      expect(history.settled.map((s) => s.outcome)).to.deep.equal([LOADED]);
      await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: history.settled[0]!.confirmation });
      expect(await account(net, h.accountId)).to.deep.include({ balance: 97_500, available: 97_500 });
      expect(await balance(h)).to.equal(2_500);
    });

    it("a replayed LOAD command is refused by the card; the card is credited once", async () => {
      const h = await freshCardholder(net);
      const { offer, issued } = await loadStepByStep(h, 1_000);
      expect((await h.reader.load(Buffer.from(issued.loadCommand))).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED); // no session
      // A fresh session for the very same load: the old command's S2 was made for the old challenge and counter.
      await h.reader.initializeForLoad(loadInitCommand(offer));
      expect((await h.reader.load(Buffer.from(issued.loadCommand))).sw).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
      // A session for another load: the command does not even match it.
      const offer2 = await offerFor(net, h.reader, h.accountId, 1_000);
      await h.reader.initializeForLoad(loadInitCommand(offer2));
      expect((await h.reader.load(Buffer.from(issued.loadCommand))).sw).to.equal(SW.WRONG_DATA);
      expect(await balance(h)).to.equal(1_000);
      expect((await h.reader.readPurse()).counter).to.equal(1);
    });

    it("a confirmation forged for the bank, or taken from another load, or altered, posts nothing", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 4_000);
      const fake = LoadConfirmation.encode({
        transactionId: offer.transactionId,
        bankId: offer.bankId,
        purseId: offer.purseId,
        amount: offer.amount,
        outcome: NOT_LOADED,
        cardCounter: 0,
        cardSignature: Buffer.alloc(0),
        proof: "forged",
        settledAt: new Date(),
      }).finish();
      const wrongKey = seal(
        loadTransactionKey(randomBytes(32), offer.bankId, offer.transactionId!.value, offer.keyNonce),
        "LOAD_CONFIRMATION",
        offer.transactionId!.value,
        fake,
      );
      expect(await failure(net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: wrongKey }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      const other = await freshCardholder(net);
      const { done } = await loadStepByStep(other, 100);
      expect(await failure(net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      for (const where of ["iv", "ciphertext", "tag"] as const) {
        expect(
          await failure(net.clients.bank.confirmLoad({ transactionId: done.load!.transactionId, confirmation: flipBit(done.load!.confirmation!, where) })),
        ).to.deep.include({ code: "PERMISSION_DENIED", reason: "SEAL_BROKEN" });
      }
      expect(await holdOf(net, h.accountId, offer)).to.equal(HoldState.HOLD_STATE_HELD);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 96_000 });
    });

    it("an authorisation from another load, or for another card, is refused; a transaction's card data cannot be swapped", async () => {
      const h = await freshCardholder(net);
      const a = await offerFor(net, h.reader, h.accountId, 1_000);
      const b = await offerFor(net, h.reader, h.accountId, 1_000);
      const { request } = await loadRequest(h.reader, a);
      expect(await failure(net.clients.load.processLoadRequest({ ...request, authorization: b.authorization }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      const stranger = await freshCardholder(net);
      const { request: strangers } = await loadRequest(stranger.reader, a);
      expect(await failure(net.clients.load.processLoadRequest(strangers))).to.deep.include({ code: "PERMISSION_DENIED", reason: "CONFIRMATION_MISMATCH" });
      await net.clients.load.processLoadRequest(request);
      const { request: again } = await loadRequest(h.reader, a);
      expect(await failure(net.clients.load.processLoadRequest(again))).to.deep.include({ code: "ALREADY_EXISTS", reason: "TRANSACTION_ID_REUSED" });
      expect(await failure(net.clients.load.processLoadRequest({ ...request, bankId: "other-bank" }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "UNKNOWN_BANK",
      });
      expect(await failure(net.clients.load.processLoadRequest({ ...request, initializeResponse: request.initializeResponse.subarray(1) }))).to.deep.include({
        code: "INVALID_ARGUMENT",
      });
    });

    it("the security module refuses a card with no room by the time of the request: NOT_LOADED, hold released", async () => {
      const h = await freshCardholder(net, { maxBalance: 3_000 });
      const first = await offerFor(net, h.reader, h.accountId, 2_000);
      const second = await offerFor(net, h.reader, h.accountId, 2_000); // fits on its own, not after the first
      const { request } = await loadRequest(h.reader, first);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      await net.clients.load.completeLoad({ transactionId: first.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) });
      const { request: late } = await loadRequest(h.reader, second);
      expect(await failure(net.clients.load.processLoadRequest(late))).to.deep.include({ code: "FAILED_PRECONDITION", reason: "MAX_BALANCE_EXCEEDED" });
      const settled = await net.clients.load.completeLoad({
        transactionId: second.transactionId,
        loadResponse: Buffer.alloc(0),
        zeroValueInitializeResponse: Buffer.alloc(0),
      });
      expect(settled.load!.outcome).to.equal(NOT_LOADED);
      expect((await net.clients.bank.confirmLoad({ transactionId: second.transactionId, confirmation: settled.load!.confirmation })).holdState).to.equal(
        HoldState.HOLD_STATE_RELEASED,
      );
      expect(await balance(h)).to.equal(2_000);
    });
  });

  it("a client that hides an expired card from the bank is stopped by the security module: NOT_LOADED, hold released", async () => {
    const h = await freshCardholder(net, { expiry: "2020-01-31" });
    const purse = { ...purseState(await h.reader.readPurse()), expiryDate: "2099-12-31" };
    const { offer } = await net.bankAs(h.accountId).createLoadOffer({
      transactionId: txnId(randomUUID()),
      accountId: h.accountId,
      amount: money(1_000, EUR, 2),
      purse,
    });
    const { request } = await loadRequest(h.reader, offer!);
    expect(await failure(net.clients.load.processLoadRequest(request))).to.deep.include({ code: "FAILED_PRECONDITION", reason: "CARD_EXPIRED" });
    const settled = await net.clients.load.completeLoad({
      transactionId: offer!.transactionId,
      loadResponse: Buffer.alloc(0),
      zeroValueInitializeResponse: Buffer.alloc(0),
    });
    expect(settled.load!.outcome).to.equal(NOT_LOADED);
    await net.clients.bank.confirmLoad({ transactionId: offer!.transactionId, confirmation: settled.load!.confirmation });
    expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
    expect(await balance(h)).to.equal(0);
  });

  it("the card's history in a load request confirms an earlier pending load of the card (pending deposit)", async () => {
    const h = await freshCardholder(net);
    const first = await offerFor(net, h.reader, h.accountId, 1_200);
    const { request } = await loadRequest(h.reader, first);
    const issued = await net.clients.load.processLoadRequest(request);
    expect((await h.reader.load(Buffer.from(issued.loadCommand))).parsed!.result).to.equal(LoadResult.LOADED);
    // The client went away here: the load server never saw the card's answer.
    expect(await loadState(first)).to.equal(LoadState.LOAD_STATE_PENDING);
    const second = await offerFor(net, h.reader, h.accountId, 300);
    const { request: next } = await loadRequest(h.reader, second, { cardLog: await h.reader.readLogRaw(8) });
    const r = await net.clients.load.processLoadRequest(next);
    expect(r.settled.map((x) => [x.transactionId?.value, x.outcome])).to.deep.equal([[first.transactionId!.value, LOADED]]);
    expect((await net.clients.loadAsOperator.getLoad({ transactionId: first.transactionId })).proof).to.contain("card history");
    await net.clients.bank.confirmLoad({ transactionId: first.transactionId, confirmation: r.settled[0]!.confirmation });
    expect(await holdOf(net, h.accountId, first)).to.equal(HoldState.HOLD_STATE_POSTED);
  });

  it("a history record altered by the client proves nothing: the load stays pending", async () => {
    const h = await freshCardholder(net);
    const offer = await offerFor(net, h.reader, h.accountId, 800);
    const { request } = await loadRequest(h.reader, offer);
    const issued = await net.clients.load.processLoadRequest(request);
    await h.reader.load(Buffer.from(issued.loadCommand));
    const [record] = await h.reader.readLogRaw(1);
    const r = await net.clients.load.reportCardHistory({ purseId: offer.purseId, cardLog: [flipByte(record!, -1)] });
    expect(r.settled).to.have.length(0);
    expect(await loadState(offer)).to.equal(LoadState.LOAD_STATE_PENDING);
    expect(await holdOf(net, h.accountId, offer)).to.equal(HoldState.HOLD_STATE_HELD);
  });

  it("AbandonLoad ends a load no LOAD command exists for, NOT_LOADED, releasing the hold; not one with a command", async () => {
    const h = await freshCardholder(net);
    const offer = await offerFor(net, h.reader, h.accountId, 1_000);
    const abandon = { transactionId: offer.transactionId, bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization };
    expect(await failure(net.clients.load.abandonLoad({ ...abandon, authorization: flipBit(offer.authorization!, "tag") }))).to.deep.include({
      code: "PERMISSION_DENIED",
      reason: "SEAL_BROKEN",
    });
    // Another bank's certificate does not let it end this bank's load.
    const otherBank = openChannel(net.load.address, (await net.security.of("bank", "other-bank")).channel({ kind: "load" }));
    try {
      expect(await failure(clientFactory().create(LoadServiceDefinition, otherBank).abandonLoad(abandon))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "NOT_ALLOWED",
      });
    } finally {
      otherBank.close();
    }
    const done = await net.clients.load.abandonLoad(abandon);
    expect(done.load!.outcome).to.equal(NOT_LOADED);
    expect((await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation })).holdState).to.equal(
      HoldState.HOLD_STATE_RELEASED,
    );
    const { request } = await loadRequest(h.reader, offer);
    expect(await failure(net.clients.load.processLoadRequest(request))).to.deep.include({ code: "ALREADY_EXISTS" });
    expect(await balance(h)).to.equal(0);

    const other = await offerFor(net, h.reader, h.accountId, 1_000);
    await net.clients.load.processLoadRequest((await loadRequest(h.reader, other)).request);
    const e = await failure(
      net.clients.load.abandonLoad({ transactionId: other.transactionId, bankId: other.bankId, keyNonce: other.keyNonce, authorization: other.authorization }),
    );
    expect(e).to.deep.include({ code: "FAILED_PRECONDITION", reason: "WRONG_STATE" });
  });

  it("holds whose cardholder never came back: the bank asks the load server, releases those with no LOAD command, posts those settled, and leaves a pending one held", async () => {
    const h = await freshCardholder(net);
    const never = await offerFor(net, h.reader, h.accountId, 1_000); // the client vanished with the offer
    const settled = await offerFor(net, h.reader, h.accountId, 2_000); // loaded, but the confirmation never reached the bank
    const issued = await net.clients.load.processLoadRequest((await loadRequest(h.reader, settled)).request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    await net.clients.load.completeLoad({ transactionId: settled.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) });
    const pending = await offerFor(net, h.reader, h.accountId, 500); // the card may hold its LOAD: only the card can settle it
    await net.clients.load.processLoadRequest((await loadRequest(h.reader, pending)).request);
    expect(await net.bank.server.resolveStaleHolds(60_000)).to.equal(0); // none is old enough yet
    expect(await net.bank.server.resolveStaleHolds(0)).to.be.at.least(2);
    expect(await holdOf(net, h.accountId, never)).to.equal(HoldState.HOLD_STATE_RELEASED);
    expect(await holdOf(net, h.accountId, settled)).to.equal(HoldState.HOLD_STATE_POSTED);
    expect(await holdOf(net, h.accountId, pending)).to.equal(HoldState.HOLD_STATE_HELD);
    expect(await account(net, h.accountId)).to.deep.include({ balance: 98_000, available: 97_500 });
    expect(await balance(h)).to.equal(2_000);
  });

  describe("who reads a load's record (GetLoad)", () => {
    /** A load with its LOAD command issued (PENDING, with a proof reference), then credited and settled when asked. */
    async function issuedLoad() {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 1_500);
      const issued = await net.clients.load.processLoadRequest((await loadRequest(h.reader, offer)).request);
      const settle = async () => {
        const answer = await h.reader.load(Buffer.from(issued.loadCommand));
        await net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) });
      };
      return { h, offer, issued, settle };
    }
    /** What a caller without a right to the record must see: the id and the state, every other field empty. */
    const stateOnly = (r: GetLoadResponse, id: string, state: LoadState) =>
      expect(r).to.deep.equal({
        transactionId: txnId(id),
        bankId: "",
        purseId: undefined,
        amount: undefined,
        state,
        outcome: LoadOutcome.LOAD_OUTCOME_UNSPECIFIED,
        proof: "",
        hsmId: new Uint8Array(0),
        hsmCounter: 0,
        proofReference: undefined,
      });

    it("a stranger with the load's id sees its state only: no card, amount, outcome, security module or proof reference", async () => {
      const { offer, settle } = await issuedLoad();
      const id = defined(offer.transactionId, "the transaction id").value;
      stateOnly(await net.clients.load.getLoad({ transactionId: offer.transactionId }), id, LoadState.LOAD_STATE_PENDING);
      // A certificate of the installation proves nothing here unless it is the operator's: not even another bank's.
      const otherBank = openChannel(net.load.address, (await net.security.of("bank", "other-bank")).channel({ kind: "load" }));
      try {
        stateOnly(
          await clientFactory().create(LoadServiceDefinition, otherBank).getLoad({ transactionId: offer.transactionId }),
          id,
          LoadState.LOAD_STATE_PENDING,
        );
      } finally {
        otherBank.close();
      }
      await settle();
      stateOnly(await net.clients.load.getLoad({ transactionId: offer.transactionId }), id, LoadState.LOAD_STATE_SETTLED);
      expect(await failure(net.clients.load.getLoad({ transactionId: txnId(randomUUID()) }))).to.deep.include({ code: "NOT_FOUND" });
    });

    it("the operator's certificate reads the whole record, which the same question without it does not get", async () => {
      const { offer, issued, settle } = await issuedLoad();
      const pending = await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId });
      expect((await net.clients.load.getLoad({ transactionId: offer.transactionId })).proofReference).to.equal(undefined);
      expect(pending).to.deep.include({ bankId: offer.bankId, state: LoadState.LOAD_STATE_PENDING, hsmCounter: issued.hsmCounter });
      expect(pending.purseId).to.deep.equal(offer.purseId);
      expect(pending.amount).to.deep.equal(money(1_500, EUR, 2));
      expect(pending.proofReference).to.deep.equal(issued.proofReference);
      await settle();
      const settled = await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId });
      expect(settled).to.deep.include({ state: LoadState.LOAD_STATE_SETTLED, outcome: LOADED, proof: "S3 verified" });
    });

    it("the holder of the load's offer (the cardholder's client) reads it with the offer's authorisation; a forged or another load's is refused", async () => {
      const { h, offer, issued } = await issuedLoad();
      const holder = { transactionId: offer.transactionId, bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization };
      const r = await net.clients.load.getLoad(holder);
      expect(r.proofReference).to.deep.equal(issued.proofReference);
      expect(r.amount).to.deep.equal(money(1_500, EUR, 2));
      for (const where of ["iv", "ciphertext", "tag"] as const)
        expect(
          await failure(net.clients.load.getLoad({ ...holder, authorization: flipBit(defined(offer.authorization, "the authorisation"), where) })),
          where,
        ).to.deep.include({
          code: "PERMISSION_DENIED",
          reason: "SEAL_BROKEN",
        });
      // The cardholder's own other load proves nothing about this one.
      const other = await offerFor(net, h.reader, h.accountId, 500);
      expect(await failure(net.clients.load.getLoad({ ...holder, keyNonce: other.keyNonce, authorization: other.authorization }))).to.deep.include({
        code: "PERMISSION_DENIED",
        reason: "SEAL_BROKEN",
      });
      // Half a proof is a malformed request, not a stranger's question.
      expect(await failure(net.clients.load.getLoad({ ...holder, authorization: undefined }))).to.deep.include({
        code: "INVALID_ARGUMENT",
        reason: "INVALID_FIELD",
      });
    });
  });

  describe("negative result handling", () => {
    it("a zero-value answer made before the load proves nothing: the card took the load, and it counts as loaded", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      // A lying client asks for its "proof" first, with everything it knows before the load server answers...
      const early = await h.reader.initializeForLoad(loadInitCommand(offer, 0));
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      expect(issued.proofReference?.value).to.not.equal(offer.transactionId!.value);
      expect((await h.reader.load(Buffer.from(issued.loadCommand))).parsed!.result).to.equal(LoadResult.LOADED);
      // ...then claims the card never answered.
      const done = await net.clients.load.completeLoad({
        transactionId: offer.transactionId,
        loadResponse: Buffer.alloc(0),
        zeroValueInitializeResponse: early.raw,
      });
      expect(done.load!.outcome).to.equal(LOADED);
      await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
      expect(await account(net, h.accountId)).to.deep.include({ balance: 98_000, available: 98_000 });
      expect(await balance(h)).to.equal(2_000);
    });

    it("a genuine negative result (the card was blocked before LOAD): counters equal, the zero-value S1 matches, the hold is released", async () => {
      const h = await freshCardholder(net, { blockMidLoad: true });
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      expect(answer.parsed).to.deep.include({ result: LoadResult.BLOCKED, counter: 0, balance: 0 });
      const zero = await zeroValue(h.reader, offer, issued);
      const done = await net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: zero.raw });
      expect(done.load!.outcome).to.equal(NOT_LOADED);
      expect((await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId })).proof).to.contain("counters equal");
      expect((await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation })).holdState).to.equal(
        HoldState.HOLD_STATE_RELEASED,
      );
      expect(await account(net, h.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
    });

    it("a card that claims a failure after a real load (counters differ) is treated as loaded", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 3_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      const lie = Buffer.from(answer.raw);
      lie[0] = LoadResult.MAX_BALANCE_EXCEEDED;
      const zero = await zeroValue(h.reader, offer, issued);
      const done = await net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: lie, zeroValueInitializeResponse: zero.raw });
      expect(done.load!.outcome).to.equal(LOADED);
      expect((await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId })).proof).to.contain("decreased to the original");
      await net.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
      expect(await account(net, h.accountId)).to.deep.include({ balance: 97_000 });
      expect(await balance(h)).to.equal(3_000);
    });

    it("a client that also puts the original counter into the zero-value answer (counters 'equal') is treated as loaded", async () => {
      const h = await freshCardholder(net);
      const offer = await offerFor(net, h.reader, h.accountId, 3_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      const lie = Buffer.from(answer.raw);
      lie[0] = LoadResult.BLOCKED;
      const zero = Buffer.from((await zeroValue(h.reader, offer, issued)).raw);
      zero.writeUInt32BE(0, InitializeForLoadResponse.offset("counter"));
      zero.writeUInt32BE(0, InitializeForLoadResponse.offset("balance"));
      const done = await net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: lie, zeroValueInitializeResponse: zero });
      expect(done.load!.outcome).to.equal(LOADED);
      expect((await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId })).proof).to.contain("counters equal");
    });

    it("a counter increased by accident in the zero-value answer of a card really not loaded: the server decreases it, S1 matches, not loaded", async () => {
      const h = await freshCardholder(net, { blockMidLoad: true });
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      const zero = Buffer.from((await zeroValue(h.reader, offer, issued)).raw);
      zero.writeUInt32BE(7, InitializeForLoadResponse.offset("counter"));
      const done = await net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: zero });
      expect(done.load!.outcome).to.equal(NOT_LOADED);
      expect((await net.clients.loadAsOperator.getLoad({ transactionId: offer.transactionId })).proof).to.contain("decreased to the original");
    });

    it("a negative result without the card's zero-value answer is INVALID_ARGUMENT, and the load stays pending", async () => {
      const h = await freshCardholder(net, { blockMidLoad: true });
      const offer = await offerFor(net, h.reader, h.accountId, 2_000);
      const { request } = await loadRequest(h.reader, offer);
      const issued = await net.clients.load.processLoadRequest(request);
      const answer = await h.reader.load(Buffer.from(issued.loadCommand));
      const e = await failure(
        net.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) }),
      );
      expect(e).to.deep.include({ code: "INVALID_ARGUMENT" });
      expect(e.details).to.contain("zero_value_initialize_response");
      expect(await loadState(offer)).to.equal(LoadState.LOAD_STATE_PENDING);
    });
  });

  describe("the bank's lists, a page at a time (ListHolds, ListStatementLines)", () => {
    /** The bank as the holder of the account. */
    const bank = (accountId: string) => net.bankAs(accountId);
    const ids = (hs: Hold[]) => hs.map((h) => h.transactionId!.value);

    /** Every page of a list from `pageToken` on, and each page's size. */
    async function pages<T>(page: (pageToken: string) => Promise<{ items: T[]; next: string }>, pageToken = "") {
      const all: T[] = [];
      const sizes: number[] = [];
      do {
        const r = await page(pageToken);
        all.push(...r.items);
        sizes.push(r.items.length);
        pageToken = r.next;
      } while (pageToken);
      return { all, sizes };
    }
    const holdPages = (accountId: string, pageSize: number, pageToken = "") =>
      pages(async (t) => {
        const r = await bank(accountId).listHolds({ accountId, pageSize, pageToken: t });
        return { items: r.holds, next: r.nextPageToken };
      }, pageToken);
    const linePages = (accountId: string, pageSize: number) =>
      pages(async (t) => {
        const r = await bank(accountId).listStatementLines({ accountId, pageSize, pageToken: t });
        return { items: r.lines, next: r.nextPageToken };
      });

    /** A fresh card and account with `n` load offers of 0.01 held; `made` oldest first. */
    async function withHolds(n: number) {
      const h = await freshCardholder(net);
      const made: string[] = [];
      for (let i = 0; i < n; i++) made.push((await offerFor(net, h.reader, h.accountId, 1)).transactionId!.value);
      return { ...h, made };
    }

    /** INVALID_ARGUMENT, reason INVALID_FIELD, naming `field`. */
    async function refusedNaming(call: Promise<unknown>, field: string, what = field) {
      const f = await failure(call);
      expect(f, what).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD" });
      expect(f.details, what).to.match(new RegExp(`^${field}: `));
      return f;
    }

    it("ListHolds: pages of 3 together are every hold, newest first, each once; one default page is the same list", async () => {
      const h = await withHolds(7);
      const { all, sizes } = await holdPages(h.accountId, 3);
      expect(sizes).to.deep.equal([3, 3, 1]);
      expect(ids(all)).to.deep.equal([...h.made].reverse());
      const one = await bank(h.accountId).listHolds({ accountId: h.accountId });
      expect(one.nextPageToken).to.equal("");
      expect(one.holds).to.deep.equal(all);
      expect(ids((await bank(h.accountId).getAccount({ accountId: h.accountId })).holds)).to.have.members(ids(all));
    });

    it("ListStatementLines: pages of 1 and of 3 together are every line, newest first, each once", async () => {
      const h = await freshCardholder(net);
      for (let i = 0; i < 3; i++) await loadStepByStep(h, 100);
      const card = (await h.reader.readPurse()).purseId.toString("hex");
      const one = await bank(h.accountId).listStatementLines({ accountId: h.accountId });
      expect(one.nextPageToken).to.equal("");
      expect(one.lines.map((l) => Number(l.balanceAfter!.amountMinor))).to.deep.equal([99_700, 99_800, 99_900, 100_000]);
      expect(one.lines.map((l) => l.text)).to.deep.equal([...Array<string>(3).fill(`load to card ${card}`), "opening deposit"]);
      for (const [size, expected] of [
        [1, [1, 1, 1, 1]],
        [3, [3, 1]],
      ] as const) {
        const { all, sizes } = await linePages(h.accountId, size);
        expect(sizes, `page_size ${size}`).to.deep.equal(expected);
        expect(all, `page_size ${size}`).to.deep.equal(one.lines);
      }
      expect((await bank(h.accountId).getAccount({ accountId: h.accountId })).statement).to.deep.equal(one.lines);
    });

    it("a hold made between two pages is neither listed twice nor makes another one skipped", async () => {
      const h = await withHolds(4);
      const first = await bank(h.accountId).listHolds({ accountId: h.accountId, pageSize: 2 });
      await offerFor(net, h.reader, h.accountId, 1);
      const rest = await holdPages(h.accountId, 2, first.nextPageToken);
      expect(rest.sizes).to.deep.equal([2]);
      expect(ids([...first.holds, ...rest.all])).to.deep.equal([...h.made].reverse());
    });

    it("page_size 0 is the default, 50; above the maximum, 200, it is taken as 200; negative is INVALID_ARGUMENT naming page_size", async () => {
      const h = await withHolds(205);
      const first = await bank(h.accountId).listHolds({ accountId: h.accountId });
      expect(first.holds).to.have.length(50);
      expect(first.nextPageToken).to.not.equal("");
      const big = await bank(h.accountId).listHolds({ accountId: h.accountId, pageSize: 1_000_000 });
      expect(big.holds).to.have.length(200);
      const last = await bank(h.accountId).listHolds({ accountId: h.accountId, pageSize: 1_000_000, pageToken: big.nextPageToken });
      expect(last.holds).to.have.length(5);
      expect(last.nextPageToken).to.equal("");
      expect(ids([...big.holds, ...last.holds])).to.deep.equal([...h.made].reverse());
      await refusedNaming(bank(h.accountId).listHolds({ accountId: h.accountId, pageSize: -1 }), "page_size", "ListHolds");
      await refusedNaming(bank(h.accountId).listStatementLines({ accountId: h.accountId, pageSize: -1 }), "page_size", "ListStatementLines");
    });

    it("a page_token that does not decode (garbled, cut, extended, made up) is INVALID_ARGUMENT naming page_token", async () => {
      const h = await withHolds(3);
      const { nextPageToken: token } = await bank(h.accountId).listHolds({ accountId: h.accountId, pageSize: 1 });
      expect(token).to.match(/^[A-Za-z0-9_-]+$/);
      const garbled = token.slice(0, 12) + (token[12] === "A" ? "B" : "A") + token.slice(13);
      const madeUp = Buffer.from(JSON.stringify({ v: 1, l: "holds", s: `account ${h.accountId}`, p: { t: "2000-01-01T00:00:00.000Z", r: 1 } })).toString(
        "base64url",
      );
      for (const bad of ["x", "!!!!", "a token", garbled, token.slice(0, -3), `${token}A`, madeUp]) {
        await refusedNaming(bank(h.accountId).listHolds({ accountId: h.accountId, pageToken: bad }), "page_token", bad);
        await refusedNaming(bank(h.accountId).listStatementLines({ accountId: h.accountId, pageToken: bad }), "page_token", bad);
      }
      expect(ids((await bank(h.accountId).listHolds({ accountId: h.accountId, pageToken: token })).holds)).to.deep.equal([h.made[1], h.made[0]]);
    });

    it("a page_token made for another account or the other list is INVALID_ARGUMENT naming page_token", async () => {
      const a = await withHolds(2);
      const b = await withHolds(2);
      await loadStepByStep(a, 100); // a second statement line
      const { nextPageToken: holdsOfA } = await bank(a.accountId).listHolds({ accountId: a.accountId, pageSize: 1 });
      const { nextPageToken: linesOfA } = await bank(a.accountId).listStatementLines({ accountId: a.accountId, pageSize: 1 });
      expect(holdsOfA).to.not.equal("");
      expect(linesOfA).to.not.equal("");
      const cases: [string, () => Promise<unknown>][] = [
        ["holds of a, for b's holds", () => bank(b.accountId).listHolds({ accountId: b.accountId, pageToken: holdsOfA })],
        ["statement of a, for b's statement", () => bank(b.accountId).listStatementLines({ accountId: b.accountId, pageToken: linesOfA })],
        ["holds of a, for a's statement", () => bank(a.accountId).listStatementLines({ accountId: a.accountId, pageToken: holdsOfA })],
        ["statement of a, for a's holds", () => bank(a.accountId).listHolds({ accountId: a.accountId, pageToken: linesOfA })],
      ];
      for (const [what, call] of cases) {
        const f = await refusedNaming(call(), "page_token", what);
        expect(f.details, what).to.contain("was made for the");
      }
      expect((await bank(a.accountId).listHolds({ accountId: a.accountId, pageToken: holdsOfA })).holds).to.have.length(2);
    });

    it("refuses an account not the token's, known or not (PERMISSION_DENIED), and a malformed one (INVALID_ARGUMENT naming account_id)", async () => {
      const h = await freshCardholder(net);
      const asH = bank(h.accountId);
      expect(await failure(asH.listHolds({ accountId: "no-such-account" }))).to.include({ code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" });
      expect(await failure(asH.listStatementLines({ accountId: "no-such-account" }))).to.include({ code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" });
      await refusedNaming(asH.listHolds({ accountId: "not an id" }), "account_id");
      await refusedNaming(asH.listStatementLines({ accountId: "" }), "account_id");
    });
  });
});
