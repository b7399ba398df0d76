// The cardholder's request ids, and errors that say what became of a load
// or purchase: a caller that retries under the same request id never gets
// a second load or a second debit, whatever failed in between (the bank
// down, an answer lost), and every error after the daemon journaled the
// transaction names it, its journal state and whether it may still
// complete. Each daemon is the real one on its Unix socket, over gRPC.

import { expect } from "chai";
import { join } from "node:path";
import { ClientError } from "nice-grpc";
import { HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { LoadOutcome } from "../../gen/netpurse/load/v1/load.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { startClientDaemon } from "../../client/daemon/server.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { errorMetadataOf, fieldOf, reasonName, reasonOf } from "../../lib/grpc/errors.js";
import { txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { openSqlite } from "../../lib/store/db.js";
import { startBankServer } from "../../services/bank/server.js";
import { DEMO_BANK } from "../../services/network/layout.js";
import { account, EUR, freshCardholder } from "../support/load.js";
import { startNetwork, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";
import { Status } from "nice-grpc";

/** What a caller sees of a failed call: code, reason, message, and the ErrorInfo metadata naming the transaction. */
async function failed(p: Promise<unknown>) {
  const e = await p.then(
    () => undefined,
    (x: unknown) => x,
  );
  if (!(e instanceof ClientError)) throw new Error(`expected a gRPC error, got ${String(e)}`);
  const r = reasonOf(e);
  return {
    code: Status[e.code],
    reason: r === undefined ? "" : reasonName(r).replace("ERROR_REASON_", ""),
    details: e.details,
    field: fieldOf(e),
    metadata: errorMetadataOf(e),
  };
}

describe("client daemon: request ids, and errors that name the journaled transaction", function () {
  this.timeout(90_000);
  let net: Network;
  let n = 0;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }] });
  });
  after(async () => net?.close());

  /** A cardholder with an empty card, an account of EUR 1000.00, and a daemon of their own on its socket. */
  async function cardholder() {
    const h = await freshCardholder(net);
    const dir = join(net.data, `client-rid-${++n}`);
    const d = await startClientDaemon({ security: net.security.cardholder, card: h.path, dir, resumeEveryMs: 3_600_000 });
    const channel = openChannel(d.address, { insecure: true });
    const c = clientFactory().create(CardholderServiceDefinition, channel);
    const loadReq = (minor: number, requestId: string) => ({
      bankAddress: net.bank.address,
      accountId: h.accountId,
      amount: money(minor, EUR, 2),
      approvedAmount: money(minor, EUR, 2),
      bankAccessToken: h.token,
      requestId,
    });
    const balance = async () => Number(defined((await c.getCard({})).purse?.balance, "the card's balance").amountMinor);
    /** The journal's rows, as the daemon left them. */
    const rows = (table: "client_loads" | "client_purchases") => {
      const db = openSqlite(join(dir, "client.db"), []);
      return db.all<{ transaction_id: string; state: string; request_id: string | null }>(`SELECT * FROM ${table}`).finally(() => db.close());
    };
    return {
      ...h,
      c,
      loadReq,
      balance,
      rows,
      close: async () => {
        channel.close();
        await d.close();
      },
    };
  }

  async function restartBank() {
    const address = net.bank.address;
    net.bank = await startBankServer({
      security: await net.security.of("bank", DEMO_BANK.bankId),
      listen: address,
      dir: net.paths.bank,
      ...net.storeOption,
      loadServer: net.load.address,
    });
  }

  it("the bank down during a load, the caller retrying under the same request id: one load, and the first error names it and says it may complete", async () => {
    const h = await cardholder();
    let bankDown = false;
    try {
      await net.bank.close();
      bankDown = true;
      const first = await failed(h.c.loadCard(h.loadReq(12_000, "retry-bank-down"), { deadline: 30_000 }));
      const row = defined((await h.rows("client_loads"))[0], "the journaled load");
      expect(first).to.include({ code: "UNAVAILABLE" });
      expect(first.metadata).to.deep.equal({ transaction_id: row.transaction_id, state: "STARTED", may_complete: "true" });
      expect(first.details).to.contain(row.transaction_id).and.to.contain("journal state STARTED").and.to.contain("may still complete");

      await restartBank();
      bankDown = false;
      // The caller asks again, as the CLI does, until the daemon has an answer other than "not yet".
      let r;
      for (let i = 0; i < 10 && !r; i++) {
        r = await h.c.loadCard(h.loadReq(12_000, "retry-bank-down"), { deadline: 30_000 }).catch(async (e: unknown) => {
          if (!(e instanceof ClientError && e.code === Status.UNAVAILABLE)) throw e;
          expect(errorMetadataOf(e).transaction_id).to.equal(row.transaction_id);
          await new Promise((w) => setTimeout(w, 500));
          return undefined;
        });
      }
      const done = defined(r, "the retried load's answer");
      expect(done.transactionId?.value).to.equal(row.transaction_id);
      expect([done.outcome, done.holdState]).to.deep.equal([LoadOutcome.LOAD_OUTCOME_LOADED, HoldState.HOLD_STATE_POSTED]);
      // Asked once more (its answer lost, say): the same load, nothing more.
      const again = await h.c.loadCard(h.loadReq(12_000, "retry-bank-down"));
      expect([again.transactionId?.value, again.outcome]).to.deep.equal([row.transaction_id, LoadOutcome.LOAD_OUTCOME_LOADED]);

      // The card credited once, the account debited once, the load server's one load.
      expect(await h.balance()).to.equal(12_000);
      const acct = await account(net, h.accountId);
      expect(acct).to.deep.include({ balance: 88_000, available: 88_000 });
      expect(acct.holds.map((x) => x.state)).to.deep.equal([HoldState.HOLD_STATE_POSTED]);
      expect((await net.clients.loadAsOperator.getLoad({ transactionId: txnId(row.transaction_id) })).outcome).to.equal(LoadOutcome.LOAD_OUTCOME_LOADED);
      expect((await h.rows("client_loads")).map((x) => [x.state, x.request_id])).to.deep.equal([["DONE", "retry-bank-down"]]);
    } finally {
      if (bankDown) await restartBank();
      await h.close();
    }
  });

  it("the same request id with another amount is refused and loads nothing; a malformed request id is INVALID_ARGUMENT", async () => {
    const h = await cardholder();
    try {
      const r = await h.c.loadCard(h.loadReq(1_000, "one-load"));
      expect(r.outcome).to.equal(LoadOutcome.LOAD_OUTCOME_LOADED);
      const other = await failed(h.c.loadCard(h.loadReq(2_000, "one-load")));
      expect(other).to.include({ code: "ALREADY_EXISTS", reason: "REQUEST_ID_REUSED" });
      expect(other.details)
        .to.contain(r.transactionId?.value ?? "?")
        .and.to.contain("use a new request id");
      for (const bad of ["has space", "x".repeat(65), "semi;colon", "ümlaut"]) {
        const f = await failed(h.c.loadCard(h.loadReq(2_000, bad)));
        expect(f, bad).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD", field: "request_id" });
      }
      expect(await h.balance()).to.equal(1_000);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 99_000, available: 99_000 });
      expect(await h.rows("client_loads")).to.have.length(1);
    } finally {
      await h.close();
    }
  });

  it("PayOffer retried under its request id after its answer was lost: one debit, the same receipt; another offer under it is refused", async () => {
    const h = await cardholder();
    try {
      await h.c.loadCard(h.loadReq(2_000, "fund-the-card"));
      const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the offer");
      const paid = await h.c.payOffer({ offer, approvedAmount: offer.amount, requestId: "pay-once" });
      // The caller never saw that answer, and asks again.
      const again = await h.c.payOffer({ offer, approvedAmount: offer.amount, requestId: "pay-once" });
      expect(again.receipt).to.deep.equal(paid.receipt);
      expect(await h.balance()).to.equal(2_000 - 99);
      const p = (await net.clients.payment.getPurchase({ transactionId: offer.transactionId })).purchase;
      expect(p?.state).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
      const log = (await h.c.listCardTransactions({})).transactions.filter((t) => t.transactionId?.value === offer.transactionId?.value);
      expect(log, "one debit on the card").to.have.length(1);

      const next = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the next offer");
      const other = await failed(h.c.payOffer({ offer: next, approvedAmount: next.amount, requestId: "pay-once" }));
      expect(other).to.include({ code: "ALREADY_EXISTS", reason: "REQUEST_ID_REUSED" });
      expect(await h.balance()).to.equal(2_000 - 99);
    } finally {
      await h.close();
    }
  });

  it("a purchase the payment server refuses ends FAILED, and its error says so: nothing paid, it will not complete", async () => {
    const h = await cardholder();
    try {
      await h.c.loadCard(h.loadReq(2_000, "fund-it"));
      const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the offer");
      // An offer whose session key the payment server never granted: refused at the draw request, before any DEBIT command.
      const key = defined(offer.encryptedSessionKey, "the offer's sealed key");
      const forged = { ...offer, encryptedSessionKey: { ...key, ciphertext: Buffer.alloc(key.ciphertext.length, 7) } };
      const f = await failed(h.c.payOffer({ offer: forged, approvedAmount: offer.amount, requestId: "" }));
      expect(f.metadata).to.deep.equal({ transaction_id: offer.transactionId?.value, state: "FAILED", may_complete: "false", debit_sent: "false" });
      expect(f.details).to.contain("nothing was paid");
      expect(f.details).to.contain("journal state FAILED");
      expect(await h.balance()).to.equal(2_000);
    } finally {
      await h.close();
    }
  });

  it("a purchase that ends FAILED after the card was asked to pay never says nothing was paid: the card may have been debited", async () => {
    const h = await cardholder();
    try {
      await h.c.loadCard(h.loadReq(2_000, "fund-the-card-2"));
      const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the offer");
      // The merchant forgets the order before its goods are asked for, as its retention sweep does with an expired one.
      await net.merchant.db.run("DELETE FROM orders WHERE transaction_id = ?", [defined(offer.transactionId, "the offer's id").value]);
      const first = await failed(h.c.payOffer({ offer, approvedAmount: offer.amount, requestId: "paid-no-goods" }));
      expect(first.metadata).to.include({ transaction_id: offer.transactionId?.value, debit_sent: "true" });
      // The card paid: every later answer must say so, never "nothing was paid".
      expect(await h.balance()).to.equal(2_000 - 99);
      const again = await failed(h.c.payOffer({ offer, approvedAmount: offer.amount, requestId: "paid-no-goods" }));
      expect(again.metadata).to.include({ transaction_id: offer.transactionId?.value, debit_sent: "true" });
      if (again.metadata.state === "FAILED") expect(again.details).to.contain("the card may have been debited");
      expect(again.details).to.not.contain("nothing was paid");
      expect(await h.balance(), "not debited twice").to.equal(2_000 - 99);
    } finally {
      await h.close();
    }
  });

  it("three calls at once under one request id: one load, one debit, each caller told of the same transaction", async () => {
    const h = await cardholder();
    try {
      const loads = await Promise.all([0, 1, 2].map(() => h.c.loadCard(h.loadReq(1_000, "all-at-once"))));
      expect(new Set(loads.map((l) => l.transactionId?.value)).size, "one load for all three").to.equal(1);
      expect(await account(net, h.accountId)).to.deep.include({ balance: 99_000 });
      const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the offer");
      const paid = await Promise.all([0, 1, 2].map(() => h.c.payOffer({ offer, approvedAmount: offer.amount, requestId: "pay-all-at-once" })));
      expect(new Set(paid.map((p) => p.receipt?.transactionId?.value))).to.deep.equal(new Set([offer.transactionId?.value]));
      expect(await h.balance()).to.equal(1_000 - 99);
      expect((await h.rows("client_loads")).length).to.equal(1);
      expect((await h.rows("client_purchases")).length).to.equal(1);
    } finally {
      await h.close();
    }
  });

  it("a bank address that is no host:port (a Unix socket path, a URL) is INVALID_ARGUMENT, and nothing is journaled", async () => {
    const h = await cardholder();
    try {
      for (const bankAddress of ["unix:/tmp/someone-elses.sock", "https://bank.example:443", "127.0.0.1:0", "127.0.0.1:99999", "bank"]) {
        const f = await failed(h.c.loadCard({ ...h.loadReq(500, ""), bankAddress }));
        expect(f, bankAddress).to.include({ code: "INVALID_ARGUMENT", reason: "INVALID_FIELD", field: "bank_address" });
      }
      expect(await h.rows("client_loads")).to.deep.equal([]);
      expect(await h.balance()).to.equal(0);
    } finally {
      await h.close();
    }
  });
});
