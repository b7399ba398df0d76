// The protocol skeleton (bench/skeleton/): a short run in each mode makes
// exactly the documented durable appends, calls and stream messages per
// purchase, counted by the processes themselves; its table is what a real
// purchase puts on the wire; and it refuses what is not a purchase of its.

import { expect } from "chai";
import { Status } from "nice-grpc";
import * as merchantMessages from "../../gen/netpurse/merchant/v1/merchant.js";
import * as validationMessages from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import * as paymentMessages from "../../gen/netpurse/payment/v1/payment.js";
import * as terminalMessages from "../../gen/netpurse/terminal/v1/terminal.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { payOffer } from "../../client/purchase.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { ServiceClients } from "../../bench/network.js";
import { padded } from "../../bench/skeleton/parts.js";
import { measureSkeleton, SkeletonNetwork, type SkeletonResult } from "../../bench/skeleton/skeleton.js";
import { appendsPerPurchase, callOf, PURCHASE, skeletonShop, tallyPerPurchase, type SkeletonMode, type UnaryCall } from "../../bench/skeleton/wire.js";
import { Security } from "../../lib/pki/security.js";
import { failure } from "../support/card-client.js";
import { startNetwork } from "../support/network.js";
import { defined, termsOf } from "../support/offers.js";

/** Every figure per purchase of a run against the documented one: the same processes (or counters), each equal within rounding. */
function expectPerPurchase(measured: Record<string, number>, documented: Record<string, number>, what: string): void {
  expect(Object.keys(measured).sort(), `${what}: the same names`).to.deep.equal(Object.keys(documented).sort());
  for (const [name, n] of Object.entries(documented)) expect(measured[name], `${what} of ${name}`).to.be.closeTo(n, 0.01);
}

describe("protocol skeleton", function () {
  this.timeout(120_000);

  for (const [mode, tls] of [
    ["PSAM_VERIFIES", true],
    ["SERVER_COMPARES", false],
  ] as [SkeletonMode, boolean][]) {
    it(`${mode}, TLS ${tls ? "on" : "off"}: 2 PSAMs and 4 cardholders make purchases with the documented fsyncs, calls and stream messages each`, async () => {
      const r: SkeletonResult = await measureSkeleton({ psams: 2, cardholders: 4, seconds: 2, warmupSeconds: 1, tls, mode });
      expect(r.errors, JSON.stringify(r.errorMessages)).to.equal(0);
      expect(r.completed).to.be.greaterThan(0);
      expect(r.perSecond).to.be.greaterThan(0);
      expect(r.p50Ms).to.be.greaterThan(0);
      expect(r.purchases).to.be.at.least(r.completed);
      // PSAM_VERIFIES 8 per purchase, SERVER_COMPARES 9: 1 the card's, 2 the merchant's, 2 the PSAM's, the rest the payment server's.
      expectPerPurchase(r.fsyncsPerPurchase, appendsPerPurchase(mode), "fsyncs per purchase");
      expect(Object.values(r.fsyncsPerPurchase).reduce((a, b) => a + b, 0)).to.be.closeTo(mode === "PSAM_VERIFIES" ? 8 : 9, 0.01);
      // 6 unary calls; 9 stream messages (PSAM_VERIFIES) or 10 (SERVER_COMPARES: the PSAM is leased twice).
      expectPerPurchase(r.tallyPerPurchase, tallyPerPurchase(mode), "calls and messages per purchase");
      expect(PURCHASE[mode].calls).to.have.length(6);
      expect(PURCHASE[mode].messages).to.have.length(mode === "PSAM_VERIFIES" ? 9 : 10);
      expect(Object.keys(r.cpuMsPerPurchase).sort()).to.deep.equal(Object.keys(appendsPerPurchase(mode)).sort());
      for (const [name, ms] of Object.entries(r.cpuMsPerPurchase)) expect(ms, `CPU ms per purchase of ${name}`).to.be.greaterThan(0);
      expect(r.serviceLogs.count, r.serviceLogs.samples.join("\n")).to.equal(0);
    });
  }

  it("refuses the answer of a transaction it issued no DEBIT command for (NOT_FOUND), and a request without a transaction id (INVALID_ARGUMENT)", async () => {
    const net = await SkeletonNetwork.start({ psams: 1, cardholders: 1, tls: true, mode: "PSAM_VERIFIES" });
    try {
      const unknown = await failure(net.payment.completePurchase(padded(Buffer.alloc(16, 7), 115)));
      expect([unknown.code, unknown.reason]).to.deep.equal([Status[Status.NOT_FOUND], "NOT_FOUND"]);
      const short = await failure(net.payment.processDrawRequest(Buffer.alloc(15)));
      expect([short.code, short.reason]).to.deep.equal([Status[Status.INVALID_ARGUMENT], "INVALID_FIELD"]);
      expect(short.details).to.match(/16-byte transaction id/);
      const unordered = await failure(net.merchant.completeOrder(padded(Buffer.alloc(16, 9), 177)));
      expect([unordered.code, unordered.reason]).to.deep.equal([Status[Status.NOT_FOUND], "NOT_FOUND"]);
      // Refused before any step: nothing was made durable, and no PSAM was asked.
      const fsyncs = await net.fsyncs();
      expect([fsyncs[net.names.payment], fsyncs[net.names.merchant], fsyncs[net.names.terminal]]).to.deep.equal([0, 0, 0]);
      expect(Object.keys(await net.tally()).filter((k) => k.startsWith(`${net.names.concentrator} `))).to.deep.equal([]);
    } finally {
      await net.stop();
      await net.discard();
    }
  });

  describe("its table is what a real purchase puts on the wire", () => {
    /** The wire messages of a purchase, as the real services encode them: type and, on the streams, the kind of message. */
    const sent: { type: string; kind: string; bytes: number }[] = [];
    let recording = false;
    const restore: (() => void)[] = [];
    let net: Awaited<ReturnType<typeof startNetwork>>;

    before(async function () {
      this.timeout(60_000);
      // Every request and response type of the purchase's RPCs, and the four directions of the two streams, counted as encoded (once per message sent).
      const types: Record<string, { encode: (m: unknown, w?: unknown) => { finish(): Uint8Array } }> = {};
      for (const [name, t] of Object.entries({ ...merchantMessages, ...validationMessages, ...paymentMessages })) {
        if (/(Request|Response)$/.test(name) && typeof (t as { encode?: unknown }).encode === "function") types[name] = t as (typeof types)[string];
      }
      for (const name of ["ConnectPaymentServerRequest", "ConnectPaymentServerResponse", "AttachTerminalRequest", "AttachTerminalResponse"] as const) {
        types[name] = terminalMessages[name] as unknown as (typeof types)[string];
      }
      for (const [name, t] of Object.entries(types)) {
        const original = t.encode;
        t.encode = (m: unknown, w?: unknown) => {
          const writer = original.call(t, m, w);
          if (w !== undefined) return writer; // nested in another message: counted with it
          const finish = writer.finish.bind(writer);
          writer.finish = () => {
            const bytes = finish();
            if (recording) sent.push({ type: name, kind: (m as { message?: { $case?: string } }).message?.$case ?? "", bytes: bytes.length });
            return bytes;
          };
          return writer;
        };
        restore.push(() => (t.encode = original));
      }
      net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], cardValue: 40_000, keepaliveIntervalMs: 3_600_000 });
    });

    after(async () => {
      for (const r of restore) r();
      await net?.close();
    });

    /** Where each wire type goes, as the table names it: a call's request or response, or a stream's direction. */
    const UNARY = new Map<string, { method: UnaryCall["method"]; side: "request" | "response" }>(
      (["CreateOrder", "IssueTransactionKeys", "ProcessDrawRequest", "CompletePurchase", "CompleteOrder", "ValidateConfirmation"] as const).flatMap(
        (method) => [
          [`${method}Request`, { method, side: "request" }],
          [`${method}Response`, { method, side: "response" }],
        ],
      ),
    );
    const STREAM = new Map<string, { from: string; to: string }>([
      ["ConnectPaymentServerRequest", { from: "payment", to: "concentrator" }],
      ["ConnectPaymentServerResponse", { from: "concentrator", to: "payment" }],
      ["AttachTerminalRequest", { from: "terminal", to: "concentrator" }],
      ["AttachTerminalResponse", { from: "concentrator", to: "terminal" }],
    ]);

    for (const mode of ["PSAM_VERIFIES", "SERVER_COMPARES"] as SkeletonMode[]) {
      it(`${mode}: the same calls and stream messages, each within a few bytes of the table`, async () => {
        const shop = defined(net.merchants[skeletonShop(mode)], "the mode's demo shop");
        const clients = new ServiceClients({ cardholder: net.security.cardholder, operator: Security.insecure() });
        const card = await SoftwareCard.open(net.cardPath);
        const ctx = { reader: new PurseReader(new InProcessTransport(card)), payment: clients.payment, merchant: clients.merchant };
        /** A song bought, and the work it leaves after the answer done (SERVER_COMPARES: the card's proof reaches the PSAM). */
        const buy = async () => {
          const offer = defined((await shop.createOrder({ productId: "song-1" })).offer, "an offer");
          await payOffer(offer, ctx);
          const id = termsOf(offer).id;
          for (let i = 0; i < 100 && (await net.payment.store.get(id))?.state !== "COMPLETED"; i++) await new Promise((r) => setTimeout(r, 20));
          expect((await net.payment.store.get(id))?.state).to.equal("COMPLETED");
        };
        try {
          // The card's log full (4 records), as in a benchmark's steady state: they travel with every draw request.
          for (let i = 0; i < 4; i++) await buy();
          sent.length = 0;
          recording = true;
          await buy();
        } finally {
          recording = false;
          clients.close();
        }
        const table = PURCHASE[mode];
        // A message's size moves by a few bytes from purchase to purchase: a Timestamp's nanos take 0 to 6 bytes
        // (a whole millisecond of 0 is not sent at all) and counters grow a varint byte; 8 bytes covers both.
        const near = (got: number, want: number) => Math.abs(got - want) <= Math.max(8, want * 0.02);
        const calls = sent.flatMap((s) => {
          const u = UNARY.get(s.type);
          return u ? [{ ...u, type: s.type, bytes: s.bytes }] : [];
        });
        expect(calls.map((c) => c.type).sort()).to.deep.equal(table.calls.flatMap((c) => [`${c.method}Request`, `${c.method}Response`]).sort());
        for (const c of calls) {
          const want = callOf(mode, c.method)[c.side === "request" ? "requestBytes" : "responseBytes"];
          expect(near(c.bytes, want), `${c.type}: ${c.bytes} bytes on the wire, ${want} in the table`).to.equal(true);
        }
        // Stream messages of the purchase: jobs, results and releases (not the keepalives).
        const messages = sent.flatMap((s) => {
          const d = STREAM.get(s.type);
          return d && ["job", "result", "release"].includes(s.kind) ? [{ ...d, kind: s.kind, bytes: s.bytes }] : [];
        });
        const key = (m: { from: string; to: string; kind: string }) => `${m.from}>${m.to} ${m.kind}`;
        expect(messages.map(key).sort()).to.deep.equal(table.messages.map(key).sort());
        // In the order they were sent, each direction's messages match the table's of that direction.
        for (const direction of new Set(messages.map((m) => `${m.from}>${m.to}`))) {
          const want = table.messages.filter((m) => `${m.from}>${m.to}` === direction).map((m) => m.bytes);
          messages
            .filter((m) => `${m.from}>${m.to}` === direction)
            .forEach((m, i) => expect(near(m.bytes, want[i] ?? NaN), `${key(m)} #${i}: ${m.bytes} bytes on the wire, ${want[i]} in the table`).to.equal(true));
        }
      });
    }
  });
});
