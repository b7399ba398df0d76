// End to end: the payment server killed at each step of a purchase (the
// test-only NETPURSE_TEST_PAYMENT_CRASH_AT makes it SIGKILL itself at a named
// step), restarted, and its recovery left to run. No purchase may stay
// RECEIVED, DEBIT_RESPONSE_RECEIVED or PROVEN; a DEBIT command without the
// card's proof is settled at the card's next contact; no PSAM keeps an open
// debit; and the money agrees: the card's debits are the paid purchases.
// NETPURSE_CRASH_SWEEP=full adds steps, a second confirmation mode and rounds.

import Database from "better-sqlite3";
import { expect } from "chai";
import { join } from "node:path";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { completeRequest, drawRequestFor, failure, openCard, openIssued, plainDrawRequest, sealDrawRequest } from "../support/card-client.js";
import { testSecurity, waitFor } from "../support/network.js";
import { defined } from "../support/offers.js";
import { launchE2E, type E2E } from "../support/processes.js";

const FULL = process.env.NETPURSE_CRASH_SWEEP === "full";

/** The card's newest log records that travel with a draw request (as the client module sends them). */
const CARD_LOG_SENT = 4;

/** Recovery's timings for the restarted payment server: short, so the test need not wait minutes. */
const RECOVERY_ARGS = ["--proof-timeout-ms", "1000", "--sweep-every-ms", "300", "--psam-wait-ms", "3000", "--abandon-received-after-ms", "5000"];

const NOT_FINAL = ["RECEIVED", "DEBIT_COMMAND_ISSUED", "DEBIT_RESPONSE_RECEIVED", "PROVEN", "IN_DOUBT"];

/** Kill points, by the step a purchase's events name: what the server has (or has not) written when it dies. */
const FAST_STEPS = [
  "after:draw_request_received", // RECEIVED, no PSAM asked
  "before:debit_command_issued", // RECEIVED, and the PSAM holds an open debit nobody received
  "after:debit_command_issued", // DEBIT_COMMAND_ISSUED, the command never reached the client
  "before:debit_response_received", // the card debited, its answer not recorded
  "after:debit_response_received", // the card's answer recorded, not ruled on
];
const FULL_STEPS = [...FAST_STEPS, "before:purchase_confirmed", "after:purchase_confirmed", "before:psam_released"];
/** SERVER_COMPARES: the card's proof is checked against the signature the PSAM predicted, then recorded in the PSAM's batch. */
const PROVEN_STEPS = ["after:debit_response_received", "before:card_signature_matched", "after:card_signature_matched", "before:recorded_in_batch"];

describe("end to end: the payment server killed at each step of a purchase", function () {
  this.timeout(FULL ? 900_000 : 120_000);
  let net: E2E;
  after(async () => net?.close());

  const paymentDb = () => join(net.paths.payment, "payment.db");
  const rows = () => {
    const db = new Database(paymentDb(), { readonly: true, fileMustExist: true });
    try {
      return db.prepare("SELECT transaction_id AS id, state, amount_minor AS amount FROM purchases").all() as { id: string; state: string; amount: number }[];
    } finally {
      db.close();
    }
  };
  const psams = async () => {
    const r = await net.clients.concentrator.listTerminals({});
    const slots = r.terminals.flatMap((t) => t.slots);
    return { pending: slots.reduce((n, s) => n + s.pendingDebits.length, 0), batch: slots.reduce((n, s) => n + s.batchCount, 0) };
  };

  /** Starts the payment server (after the previous one ended); with `crashAt`, it kills itself at that step. */
  async function startPayment(crashAt?: string): Promise<void> {
    try {
      await net.restartPayment(RECOVERY_ARGS, crashAt ? { NETPURSE_TEST_PAYMENT_CRASH_AT: crashAt } : {});
    } catch (e) {
      if (!crashAt) throw e; // with a kill point, recovery at start may reach it first
    }
    if (!crashAt) return net.attached(["terminal-1"]);
    await waitFor(
      async () => {
        if (!net.launcher.get("payment")) return true; // it died at its kill point while recovering
        const r = await net.clients.concentrator.listTerminals({});
        return r.terminals.some((t) => t.terminalId === "terminal-1") && r.paymentServers.length > 0;
      },
      20_000,
      "the payment server attached, or dead at its kill point",
    );
  }

  /**
   * One purchase as a client that loses everything when the server dies:
   * its draw request carries the card's newest log records (the card's
   * next contact for purchases still waiting for its proof), and it stops
   * at the first failed call.
   */
  async function purchase(card: PurseReader, shop: Shop): Promise<{ id: string; failed?: string }> {
    const { offer } = await shop.client.createOrder({ productId: "song-1" });
    const o: PaymentOffer = defined(offer, "the merchant's offer");
    const dr = await plainDrawRequest(card, o);
    dr.cardLog = await card.readLogRaw(CARD_LOG_SENT);
    const req = sealDrawRequest(o, dr);
    const id = defined(o.transactionId, "the offer's transaction id").value;
    let issued;
    for (let attempt = 1; !issued; attempt++) {
      const call = net.clients.payment.processDrawRequest(req, { deadline: 8_000 });
      const f = await failure(call).catch(() => undefined); // undefined: the call succeeded
      if (!f) issued = openIssued(o, await call);
      // Right after a restart, the PSAM may not be in the new server's pool yet, or the channel still backs off
      // from the server that died: retry while the server runs, as a client does (the same draw request).
      else if ((f.reason === "NO_PSAM_ATTACHED" || f.code === "UNAVAILABLE") && net.launcher.get("payment") && attempt < 20)
        await new Promise((r) => setTimeout(r, 250));
      else return { id, failed: `draw request: ${f.code} ${f.details}` };
    }
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    const completed = net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }), {
      deadline: 8_000,
    });
    const f = await failure(completed).catch(() => undefined);
    return f ? { id, failed: `complete: ${f.code} ${f.details}` } : { id };
  }

  interface Shop {
    name: string;
    client: E2E["clients"]["merchant"];
  }

  it(`leaves no purchase unfinished and the money agrees (${FULL ? "full" : "fast"} form)`, async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }], paymentArgs: RECOVERY_ARGS });
    const card = await openCard(net.cardPath);
    const security = await testSecurity(net.dir);
    const demoShop: Shop = { name: "demo-shop", client: net.clients.merchant };
    const shops: Shop[] = [demoShop];
    if (FULL) {
      const ch = openChannel(defined(net.addresses["merchant:server-shop"], "the server-shop's address"), security.cardholder.channel({ kind: "merchant" }));
      shops.push({ name: "server-shop", client: clientFactory().create(MerchantServiceDefinition, ch) });
    }
    const plan: { shop: Shop; step: string }[] = [];
    for (let round = 0; round < (FULL ? 3 : 1); round++) {
      for (const step of FULL ? FULL_STEPS : FAST_STEPS) plan.push({ shop: demoShop, step });
      if (FULL) for (const step of PROVEN_STEPS) plan.push({ shop: defined(shops[1], "the server-shop"), step });
    }

    const tried: string[] = [];
    for (const { shop, step } of plan) {
      await net.launcher.kill("payment");
      await startPayment(step);
      const r = await purchase(card, shop);
      tried.push(r.id);
      await waitFor(
        () => net.launcher.get("payment") === undefined,
        15_000,
        `the payment server to die at ${step} (${shop.name}; the purchase: ${r.failed ?? "paid"})`,
      );
      // (The purchase itself may have been paid: a proof is recorded in the PSAM's batch after the answer.)
      await startPayment();
    }

    // The card's last contact: one more purchase, which brings its log to the server.
    const last = await purchase(card, demoShop);
    expect(last.failed).to.equal(undefined);
    await waitFor(() => rows().every((p) => !NOT_FINAL.includes(p.state)), 20_000, "every purchase in a final state").catch((e: Error) => {
      throw new Error(`${e.message}: ${JSON.stringify(rows().filter((p) => NOT_FINAL.includes(p.state)))}`);
    });
    await waitFor(async () => (await psams()).pending === 0, 20_000, "no open debit left in the PSAM");

    const all = rows();
    // A kill point recovery reaches first (a proof recorded at start, say) kills the server before the draw request: no row.
    const cardLog = await card.readLog();
    for (const id of tried.filter((t) => !all.some((p) => p.id === t)))
      expect(
        cardLog.some((l) => l.transactionRef === id),
        `${id} never reached the server`,
      ).to.equal(false);
    expect(all.map((p) => p.id)).to.have.members([...tried.filter((t) => all.some((p) => p.id === t)), last.id]);
    const paid = all.filter((p) => p.state === "COMPLETED" || p.state === "PROVEN");
    const debits = cardLog.filter((l) => paid.some((p) => p.id === l.transactionRef));
    expect((await card.readPurse()).balance, "card balance = 10000 - paid purchases").to.equal(10_000 - paid.reduce((n, p) => n + p.amount, 0));
    expect(debits.length, "every paid purchase is a debit in the card's log").to.equal(paid.length);
    expect((await psams()).batch, "every paid purchase is in the PSAM's batch").to.equal(paid.length);
    // Draw requests that never got their DEBIT command were ended by recovery, and say why to anyone who asks again.
    const ended = all.filter((p) => p.state === "REFUSED");
    expect(ended.length).to.be.at.least(FULL ? 3 : 2);
    for (const p of ended) {
      const rec = defined((await net.clients.payment.getPurchase({ transactionId: { value: p.id } })).purchase, "the purchase's record");
      expect(rec.state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
      expect(rec.events.map((e) => e.step)).to.include("draw_request_abandoned");
    }
  });
});

describe("end to end: a purchase left RECEIVED with an open debit in its PSAM", function () {
  this.timeout(120_000);
  let net: E2E;
  after(async () => net?.close());

  it("is ended when the payment server restarts; its orphan debit is reversed and nothing is debited", async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }] });
    const card = await openCard(net.cardPath);
    const before = (await card.readPurse()).balance;
    await net.launcher.kill("payment");
    await net.restartPayment([], { NETPURSE_TEST_PAYMENT_CRASH_AT: "before:debit_command_issued" });
    await net.attached(["terminal-1"]);

    const offer = defined((await net.clients.merchant.createOrder({ productId: "song-1" })).offer, "the merchant's offer");
    const req = await drawRequestFor(card, offer);
    // The PSAM signs; the server dies before it records the DEBIT command, so the command never leaves.
    expect((await failure(net.clients.payment.processDrawRequest(req, { deadline: 8_000 }))).code).to.be.oneOf(["UNAVAILABLE", "CANCELLED", "INTERNAL"]);
    await waitFor(() => net.launcher.get("payment") === undefined, 15_000, "the payment server to die");
    const open = await net.clients.concentrator.listTerminals({});
    expect(
      open.terminals.flatMap((t) => t.slots).reduce((n, s) => n + s.pendingDebits.length, 0),
      "the PSAM holds the orphan debit",
    ).to.equal(1);

    await net.restartPayment();
    await net.attached(["terminal-1"]);
    const rec = async () => defined((await net.clients.payment.getPurchase({ transactionId: offer.transactionId })).purchase, "the purchase's record");
    await waitFor(async () => (await rec()).events.some((e) => e.step === "orphan_debit_reversed"), 20_000, "the orphan debit to be reversed");
    const r = await rec();
    expect(r.state).to.equal(PurchaseState.PURCHASE_STATE_REFUSED);
    // Which PSAM was asked is recorded with the attempt's outcome, which never came: the reversal names the PSAM instead.
    expect(r.events.map((e) => e.step)).to.deep.equal(["draw_request_received", "draw_request_abandoned", "orphan_debit_reversed"]);
    const slots = (await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots);
    expect(
      slots.reduce((n, s) => n + s.pendingDebits.length, 0),
      "no open debit in the PSAM",
    ).to.equal(0);
    expect(
      slots.reduce((n, s) => n + s.batchCount, 0),
      "no debit in the PSAM's batch",
    ).to.equal(0);

    // The same draw request again: the ending, never a DEBIT command signed now.
    const again = await failure(net.clients.payment.processDrawRequest(req, { deadline: 8_000 }));
    expect(again).to.include({ code: "FAILED_PRECONDITION", reason: "DRAW_REQUEST_ABANDONED" });
    expect(again.details).to.contain("the payment server stopped before its DEBIT command left").and.contain("nothing was debited");
    expect((await net.clients.concentrator.listTerminals({})).terminals.flatMap((t) => t.slots.flatMap((sl) => sl.pendingDebits))).to.have.length(0);
    expect((await card.readPurse()).balance).to.equal(before);
    expect(
      (await card.readLog()).some((l) => l.transactionRef === offer.transactionId?.value),
      "no debit in the card's log",
    ).to.equal(false);
  });
});
