// PSAM verdicts the payment server checks (docs/protocol.md, "PSAM
// verdicts"), through the real payment server, concentrator, merchants and
// validation service on loopback:
//   - a rogue terminal host attached to the concentrator (a compromised one:
//     its certificate and its PSAMs are the issuer's), which answers every job
//     "DEBIT command issued" and "RECORDED" with made-up MACs without asking
//     its PSAMs, together with a lying client whose card never debits, gets no
//     goods in PSAM_VERIFIES nor in SERVER_COMPARES: its PSAMs leave the pool,
//     a genuine PSAM signs instead and rejects the made-up card answer, and an
//     honest purchase afterwards is paid on a genuine PSAM;
//   - a genuine PSAM answer with one bit of its MAC flipped on the way is
//     refused the same way: a DEBIT command issued (another PSAM signs), a
//     verdict (the purchase is in doubt until the PSAM's own verdict comes
//     through), a reversal (not a reversal: in doubt).

import { expect } from "chai";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import type { Channel, Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { OrderState, type MerchantServiceDefinition, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PurchaseState, type Purchase } from "../../gen/netpurse/payment/v1/payment.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { SW } from "../../lib/apdu/apdu.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf } from "../../lib/ids.js";
import { DebitResponse, DebitResult } from "../../lib/protocol/purse.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { psamRegistryPath } from "../../services/network/pki.js";
import { psamKey } from "../../services/payment/psam-pool.js";
import { completeRequest, drawRequestFor, failure, openCard, openIssued } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { rogueTerminal, tamperingTerminal, type Flips, type TestTerminal } from "../support/test-terminal.js";

type Merchant = Client<typeof MerchantServiceDefinition, DeadlineOptions>;

/** The card signature the rogue says its PSAM expects, and the lying client's card "gives". */
const ROGUE_SIGNATURE = Buffer.from("5a5a5a5a5a5a5a5a", "hex");
const REFUSED = "psam_verdict_refused";
const PAID = [PurchaseState.PURCHASE_STATE_COMPLETED, PurchaseState.PURCHASE_STATE_PROVEN];

describe("contract: PSAM verdicts the payment server checks", function () {
  this.timeout(120_000);
  let net: Network;
  let card: PurseReader;
  const terminals: TestTerminal[] = [];
  const channels: Channel[] = [];
  /** The payment server's error lines on stderr, from this network. */
  const errors: string[] = [];
  const stderrWrite = process.stderr.write.bind(process.stderr);

  before(async () => {
    process.stderr.write = (chunk: string | Uint8Array, ...rest: never[]) => {
      const line = String(chunk);
      if (/ payment error /.test(line)) errors.push(line);
      return stderrWrite(chunk, ...rest);
    };
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], sweepEveryMs: 300 });
    card = await openCard(net.cardPath);
    // Both genuine PSAMs used once: a PSAM announced later and never used is the pool's first pick.
    await honest("demo-shop");
    await honest("demo-shop");
  });
  after(async () => {
    for (const t of terminals) t.detach();
    for (const c of channels) c.close();
    await net?.close();
    process.stderr.write = stderrWrite;
  });

  function shop(id: string): Merchant {
    const m = net.merchants[id];
    if (!m) throw new Error(`no demo shop ${id}`);
    return m;
  }
  async function offerAt(id: string): Promise<PaymentOffer> {
    const o = (await shop(id).createOrder({ productId: "song-1" })).offer;
    if (!o) throw new Error("no offer");
    return o;
  }
  async function purchase(o: PaymentOffer): Promise<Purchase> {
    const p = (await net.clients.payment.getPurchase({ transactionId: o.transactionId })).purchase;
    if (!p) throw new Error("no purchase record");
    return p;
  }
  const orderState = async (id: string, o: PaymentOffer) => (await shop(id).getOrder({ transactionId: o.transactionId })).order?.state;
  const refusals = (p: Purchase) => p.events.filter((e) => e.step === REFUSED).map((e) => e.detail);
  const genuinePsams = async () => {
    const r = await net.clients.concentrator.listTerminals({});
    return (r.terminals.find((t) => t.terminalId === "terminal-1")?.slots ?? []).map((s) => hexOf(s.psamId?.value));
  };

  /** A cardholder paying honestly: the card debits itself, its answer goes to the payment server, the merchant gets the confirmation. */
  async function honest(shopId: string) {
    const o = await offerAt(shopId);
    const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
    const debit = await card.debit(Buffer.from(issued.debitCommand));
    const done = await net.clients.payment.completePurchase(completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken }));
    const receipt = (await shop(shopId).completeOrder({ transactionId: o.transactionId, debitResultM: done.debitResultM })).receipt;
    return { o, receipt };
  }

  /**
   * A lying client: it sends a real draw request, never gives the card the
   * DEBIT command, and answers with a card answer it made up (the signature
   * the rogue said its PSAM expects). Whatever confirmation it gets goes to
   * the merchant for the goods.
   */
  async function lie(shopId: string) {
    const o = await offerAt(shopId);
    const purse = await card.readPurse();
    const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
    const fake = DebitResponse.encode({ result: DebitResult.DEBITED, counter: purse.counter + 1, balance: purse.balance - 99, cardSignature: ROGUE_SIGNATURE });
    const answered = await net.clients.payment.completePurchase(completeRequest(o, { sw: SW.OK, raw: fake, token: issued.completionToken })).then(
      (r) => r,
      (e: unknown) => (e instanceof Error ? e : new Error(String(e))),
    );
    if (!(answered instanceof Error)) {
      await shop(shopId)
        .completeOrder({ transactionId: o.transactionId, debitResultM: answered.debitResultM })
        .catch(() => undefined);
    }
    return { o, purse, answered };
  }

  /** A concentrator client with a terminal host's own certificate: a compromised terminal host has a genuine one. */
  async function asTerminal(terminalId: string) {
    const security = await net.security.of("terminal", terminalId);
    const channel = openChannel(net.concentrator.address, security.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
    channels.push(channel);
    return clientFactory().create(TerminalConcentratorServiceDefinition, channel);
  }

  /**
   * The issuer provisions `n` new PSAMs for a terminal host, into its folder,
   * and exports the registry by which the concentrator admits a terminal's
   * PSAMs: the hosts below are compromised, not strangers.
   */
  async function provision(terminalId: string, n: number): Promise<{ files: string[]; ids: string[] }> {
    const issuer = await Issuer.open(net.paths.issuer);
    const files: string[] = [];
    const ids: string[] = [];
    try {
      for (let i = 0; i < n; i++) {
        const file = join(net.paths.terminal(terminalId), "psams", `psam-${i}.psam.json`);
        ids.push((await issuer.provisionPsam({ path: file, currency: 978, terminalId })).psamId);
        files.push(file);
      }
      await issuer.exportPsamRegistry(psamRegistryPath(net.data));
    } finally {
      await issuer.close();
    }
    return { files, ids };
  }

  /** Attaches a test terminal, again until the concentrator has read the new registry (it follows the file within seconds), and waits for its PSAMs in the pool. */
  async function attach(t: TestTerminal, psamIds: string[]): Promise<void> {
    const end = Date.now() + 15_000;
    for (;;) {
      try {
        await t.attach();
        break;
      } catch (e) {
        if (Date.now() > end) throw e;
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    await waitFor(() => psamIds.every((id) => net.payment.pool.has(psamKey(t.terminalId, id))), 5_000, `the PSAMs of ${t.terminalId} in the pool`);
  }

  async function attachRogue(terminalId: string) {
    const { ids } = await provision(terminalId, 2);
    const rogue = rogueTerminal(await asTerminal(terminalId), { terminalId, psamIds: ids, expectedSignature: ROGUE_SIGNATURE });
    terminals.push(rogue.terminal);
    await attach(rogue.terminal, ids);
    return rogue;
  }

  async function attachTamperer(terminalId: string, flips: Flips) {
    const { files } = await provision(terminalId, 1);
    const t = await tamperingTerminal(await asTerminal(terminalId), { terminalId, psamFiles: files, flips });
    terminals.push(t.terminal);
    await attach(t.terminal, t.psamIds);
    return { ...t, psamId: t.psamIds[0] ?? "" };
  }

  describe("a rogue terminal host and a lying client", () => {
    for (const [mode, shopId] of [
      ["PSAM_VERIFIES", "demo-shop"],
      ["SERVER_COMPARES", "server-shop"],
    ] as const) {
      it(`${mode}: no goods, nothing paid; the rogue's DEBIT commands are refused, a genuine PSAM signs and rejects the made-up card answer`, async () => {
        const rogue = await attachRogue(`rogue-${mode.toLowerCase().replace("_", "-")}`);
        const { o, purse, answered } = await lie(shopId);
        expect(rogue.terminal.jobsOf("issueDebitCommand").length, "the rogue was asked to sign").to.be.greaterThan(0);
        expect(await orderState(shopId, o), "the merchant's order").to.equal(OrderState.ORDER_STATE_OFFERED);
        const p = await purchase(o);
        expect(p.state, "the purchase").to.not.be.oneOf(PAID);
        expect(rogue.psamIds).to.not.include(hexOf(p.psamId?.value));
        expect(await genuinePsams()).to.include(hexOf(p.psamId?.value));
        // Each of the rogue's PSAMs tried once, refused, out of the pool; the third attempt found a genuine one.
        expect(refusals(p)).to.have.length(2);
        for (const [i, id] of rogue.psamIds.entries())
          expect(refusals(p)[i]).to.match(new RegExp(`^PSAM verdict does not verify: DEBIT command of PSAM ${id} `));
        expect(errors.filter((l) => l.includes("PSAM verdict does not verify") && l.includes(o.transactionId?.value ?? "-"))).to.have.length(2);
        // The genuine PSAM rejects the card answer the client made up: reversed, the client told why.
        expect(p.state).to.equal(PurchaseState.PURCHASE_STATE_REVERSED);
        if (!(answered instanceof Error)) throw new Error("the payment server accepted the made-up card answer");
        expect(await failure(Promise.reject(answered))).to.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
        expect((await card.readPurse()).balance).to.equal(purse.balance);
        for (const id of rogue.psamIds) expect(net.payment.pool.has(psamKey(rogue.terminal.terminalId, id))).to.equal(true); // known, but not taken again
      });
    }

    it("an honest purchase afterwards is paid on a genuine PSAM, in both modes: the rogues' PSAMs are out of the pool", async () => {
      const asked = terminals.reduce((n, t) => n + t.jobs.length, 0);
      const genuine = await genuinePsams();
      for (const shopId of ["demo-shop", "server-shop"]) {
        const { o, receipt } = await honest(shopId);
        expect(receipt?.goods).to.match(/^licence key/);
        const p = await purchase(o);
        expect(p.state).to.be.oneOf(PAID);
        expect(genuine).to.include(hexOf(p.psamId?.value));
        expect(refusals(p)).to.deep.equal([]);
      }
      expect(
        terminals.reduce((n, t) => n + t.jobs.length, 0),
        "jobs sent to a rogue",
      ).to.equal(asked);
    });
  });

  describe("a genuine PSAM answer with one bit of its MAC flipped on the way", () => {
    it("DEBIT command issued: refused, its PSAM out of the pool, another PSAM signs; the orphan debit is reversed once the PSAM is announced again", async () => {
      const t = await attachTamperer("tamper-issued", { issued: 1, verdict: 0, reversal: 0 });
      const { o, receipt } = await honest("server-shop");
      expect(receipt?.goods).to.match(/^licence key/);
      expect(t.terminal.jobsOf("issueDebitCommand")).to.have.length(1);
      const p = await purchase(o);
      expect(hexOf(p.psamId?.value)).to.not.equal(t.psamId);
      expect(refusals(p)).to.have.length(1);
      expect(refusals(p)[0]).to.match(new RegExp(`^PSAM verdict does not verify: DEBIT command of PSAM ${t.psamId} counter 1`));
      // The PSAM did sign, but its command never left the server: announced again, its open debit is reversed, on a MAC that verifies.
      await attach(t.terminal, [t.psamId]);
      await waitFor(async () => (await purchase(o)).events.some((e) => e.step === "orphan_debit_reversed"), 10_000, "the orphan debit to be reversed");
      expect(t.terminal.jobsOf("reverseDebit")).to.have.length(1);
      t.terminal.detach();
    });

    it("the verdict RECORDED: neither COMPLETED nor goods on it; in doubt until the PSAM's own verdict comes through, then paid", async () => {
      const flips: Flips = { issued: 0, verdict: Infinity, reversal: 0 };
      const t = await attachTamperer("tamper-verdict", flips);
      const o = await offerAt("demo-shop");
      const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
      expect(hexOf((await purchase(o)).psamId?.value)).to.equal(t.psamId);
      const debit = await card.debit(Buffer.from(issued.debitCommand));
      const request = completeRequest(o, { sw: debit.sw, raw: debit.raw, token: issued.completionToken });
      expect(await failure(net.clients.payment.completePurchase(request))).to.include({ code: "UNAVAILABLE", reason: "IN_DOUBT" });
      const p = await purchase(o);
      expect(p.state).to.equal(PurchaseState.PURCHASE_STATE_IN_DOUBT);
      expect(refusals(p)[0]).to.match(new RegExp(`^PSAM verdict does not verify: verdict DEBIT_VERDICT_RECORDED of PSAM ${t.psamId} counter 1`));
      expect(p.events.find((e) => e.step === "in_doubt")?.detail).to.match(/^PSAM verdict does not verify/);
      expect(await orderState("demo-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
      // The tampering stops: the sweep asks the PSAM again, which gives the same verdict, and its MAC verifies.
      flips.verdict = 0;
      await waitFor(async () => (await purchase(o)).state === PurchaseState.PURCHASE_STATE_COMPLETED, 10_000, "the purchase to complete");
      const done = await net.clients.payment.completePurchase(request);
      const receipt = (await shop("demo-shop").completeOrder({ transactionId: o.transactionId, debitResultM: done.debitResultM })).receipt;
      expect(receipt?.goods).to.match(/^licence key/);
      t.terminal.detach();
    });

    it("a reversal: not a reversal; the purchase is in doubt, not REVERSED", async () => {
      const t = await attachTamperer("tamper-reversal", { issued: 0, verdict: 0, reversal: Infinity });
      const o = await offerAt("demo-shop");
      const purse = await card.readPurse();
      const issued = openIssued(o, await net.clients.payment.processDrawRequest(await drawRequestFor(card, o)));
      expect(hexOf((await purchase(o)).psamId?.value)).to.equal(t.psamId);
      // A card answer whose signature the PSAM rejects: the payment server has the debit reversed.
      const fake = DebitResponse.encode({
        result: DebitResult.DEBITED,
        counter: purse.counter + 1,
        balance: purse.balance - 99,
        cardSignature: randomBytes(8),
      });
      const f = await failure(net.clients.payment.completePurchase(completeRequest(o, { sw: SW.OK, raw: fake, token: issued.completionToken })));
      expect(f).to.include({ code: "UNAVAILABLE", reason: "IN_DOUBT" });
      expect(t.terminal.jobsOf("reverseDebit").length).to.be.greaterThan(0);
      const p = await purchase(o);
      expect(p.state).to.equal(PurchaseState.PURCHASE_STATE_IN_DOUBT);
      expect(refusals(p)[0]).to.match(new RegExp(`^PSAM verdict does not verify: reversal of PSAM ${t.psamId} counter 1`));
      expect(await orderState("demo-shop", o)).to.equal(OrderState.ORDER_STATE_OFFERED);
      t.terminal.detach();
    });
  });
});
