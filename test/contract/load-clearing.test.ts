// The load server reports every settled load to clearing (issue #11): the
// real bank, load server and clearing service on loopback over TLS, loads
// driven step by step by a cardholder's client, and each case checked where
// the operator would check it: clearing's settlement figures (the bank's and
// the issuer's positions, to the cent), its quarantine, its audit, and the
// load server's outbox.

import { expect } from "chai";
import { HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadProof, LoadStatus, PartyKind, QuarantineReason, type Settlement } from "../../gen/netpurse/clearing/v1/clearing.js";
import type { LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import { purseId } from "../../lib/ids.js";
import { LoadResponse, LoadResult } from "../../lib/protocol/load.js";
import { DEMO_BANK } from "../../services/network/layout.js";
import { DEMO_ISSUER_ID } from "../../services/issuer/issuer.js";
import { loadRecordOf } from "../../services/load/clearing-reporter.js";
import { flipByte, freshCardholder, LOADED, loadRequest, NOT_LOADED, offerFor, zeroValue } from "../support/load.js";
import { asNetwork, startLoadClearing, startRelay, type LoadClearing } from "../support/load-clearing.js";
import { waitFor } from "../support/network.js";

const dayOf = (d: Date) => d.toISOString().slice(0, 10);
const nextDay = (day: string) => dayOf(new Date(Date.parse(`${day}T00:00:00Z`) + 86_400_000));

/** A party's figures for a day, in minor units (zero when it has no position). */
function position(s: Settlement, kind: PartyKind, id: string) {
  const p = s.positions.find((x) => x.kind === kind && x.partyId === id);
  return { receivable: Number(p?.receivable?.amountMinor ?? 0n), payable: Number(p?.payable?.amountMinor ?? 0n), transactions: p?.transactions ?? 0 };
}

/** What a load moves in clearing: the day's load count, the bank's debt and the issuer's claim. */
function loadFigures(s: Settlement) {
  const payout = s.payouts.find(
    (p) =>
      p.payerKind === PartyKind.PARTY_KIND_BANK &&
      p.payerId === DEMO_BANK.bankId &&
      p.payeeKind === PartyKind.PARTY_KIND_ISSUER &&
      p.payeeId === DEMO_ISSUER_ID,
  );
  return {
    loads: s.loads,
    bankOwes: position(s, PartyKind.PARTY_KIND_BANK, DEMO_BANK.bankId).payable,
    issuerIsOwed: position(s, PartyKind.PARTY_KIND_ISSUER, DEMO_ISSUER_ID).receivable,
    bankPaysIssuer: Number(payout?.amount?.amountMinor ?? 0n),
  };
}

/** The change in a day's load figures. */
function delta(before: Settlement, after: Settlement) {
  const [b, a] = [loadFigures(before), loadFigures(after)];
  return {
    loads: a.loads - b.loads,
    bankOwes: a.bankOwes - b.bankOwes,
    issuerIsOwed: a.issuerIsOwed - b.issuerIsOwed,
    bankPaysIssuer: a.bankPaysIssuer - b.bankPaysIssuer,
  };
}

const moved = (amount: number, loads = 1) => ({ loads, bankOwes: amount, issuerIsOwed: amount, bankPaysIssuer: amount });
const NOTHING = moved(0, 0);

describe("contract: the load server reports every settled load to netpurse.clearing.v1.ClearingService", function () {
  this.timeout(60_000);
  let fx: LoadClearing;
  const today = dayOf(new Date());

  before(async () => {
    fx = await startLoadClearing();
  });
  after(async () => fx?.close());

  const cardholder = (o: Parameters<typeof freshCardholder>[1] = {}) => freshCardholder(asNetwork(fx), o);
  type Holder = Awaited<ReturnType<typeof cardholder>>;
  const idOf = (offer: LoadOffer) => offer.transactionId!.value;

  /** Offer, load request and the card's LOAD: the load is pending at the load server, its answer in hand. */
  async function loadUntilAnswered(h: Holder, amountMinor: number) {
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, amountMinor);
    const { request } = await loadRequest(h.reader, offer);
    const issued = await fx.clients.load.processLoadRequest(request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    return { offer, issued, answer, id: idOf(offer) };
  }

  /** A whole load settled with the card's S3 and confirmed to the bank. */
  async function loadWithS3(h: Holder, amountMinor: number) {
    const l = await loadUntilAnswered(h, amountMinor);
    const done = await fx.clients.load.completeLoad({
      transactionId: l.offer.transactionId,
      loadResponse: l.answer.raw,
      zeroValueInitializeResponse: Buffer.alloc(0),
    });
    expect(done.load!.outcome).to.equal(LOADED);
    const bank = await fx.clients.bank.confirmLoad({ transactionId: l.offer.transactionId, confirmation: done.load!.confirmation });
    expect(bank.holdState).to.equal(HoldState.HOLD_STATE_POSTED);
    return l;
  }

  it("a load confirmed with the card's S3 is POSTED once: the bank owes the issuer exactly its amount, and the card audits clean", async () => {
    const h = await cardholder();
    const before = await fx.settlement(today);
    const { id } = await loadWithS3(h, 1_234);
    const report = await fx.reported(id);
    expect(report).to.deep.include({ clearing_status: "POSTED", duplicate: 0, settlement_day: today, attempts: 1, refused_at: null });
    const after = await fx.settlement(today);
    expect(delta(before, after)).to.deep.equal(moved(1_234));
    expect(position(after, PartyKind.PARTY_KIND_BANK, DEMO_BANK.bankId).transactions).to.equal(
      position(before, PartyKind.PARTY_KIND_BANK, DEMO_BANK.bankId).transactions + 1,
    );

    const card = await h.reader.readPurse();
    expect(card.balance).to.equal(1_234);
    const audit = await fx.clients.clearing.runAudit({
      cards: [
        { purseId: purseId(card.purseId.toString("hex")), balance: { amountMinor: BigInt(card.balance), currency: 978, exponent: 2 }, openingValue: undefined },
      ],
    });
    expect(audit.checks.filter((c) => !c.ok)).to.deep.equal([]);
    expect(audit.checks.some((c) => c.name.includes(card.purseId.toString("hex")) && c.ok)).to.equal(true);
  });

  it("a load whose negative result the card proved is recorded NOT_LOADED and never posted", async () => {
    const h = await cardholder({ blockMidLoad: true });
    const before = await fx.settlement(today);
    const { offer, issued, answer, id } = await loadUntilAnswered(h, 2_000);
    expect(answer.parsed).to.deep.include({ result: LoadResult.BLOCKED });
    const zero = await zeroValue(h.reader, offer, issued);
    const done = await fx.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: zero.raw });
    expect(done.load!.outcome).to.equal(NOT_LOADED);
    expect((await fx.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation })).holdState).to.equal(
      HoldState.HOLD_STATE_RELEASED,
    );
    expect(await fx.reported(id)).to.deep.include({ clearing_status: "NOT_LOADED", duplicate: 0, settlement_day: null, refused_at: null });
    expect(delta(before, await fx.settlement(today))).to.deep.equal(NOTHING);
    const quarantined = await fx.clients.clearing.listQuarantined({ pageSize: 500, pageToken: "" });
    expect(quarantined.entries.some((e) => e.entry?.$case === "load" && e.entry.value.load?.transactionId?.value === id)).to.equal(false);
  });

  it("a load whose negative result could not be proven is treated as loaded: posted with no S3 to check", async () => {
    const h = await cardholder();
    const before = await fx.settlement(today);
    const { offer, issued, answer, id } = await loadUntilAnswered(h, 3_000);
    const lie = Buffer.from(answer.raw);
    lie[0] = LoadResult.MAX_BALANCE_EXCEEDED;
    const zero = await zeroValue(h.reader, offer, issued);
    const done = await fx.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: lie, zeroValueInitializeResponse: zero.raw });
    expect(done.load!.outcome).to.equal(LOADED);
    const record = loadRecordOf((await fx.load.store.get(id))!);
    expect(record).to.deep.include({ proof: LoadProof.LOAD_PROOF_NEGATIVE_RESULT_UNPROVEN });
    expect(record.loadAnswer).to.have.length(0);
    expect(await fx.reported(id)).to.deep.include({ clearing_status: "POSTED", settlement_day: today });
    expect(delta(before, await fx.settlement(today))).to.deep.equal(moved(3_000));
  });

  it("a pending deposit confirmed from the card's history is posted once, however often the history is reported", async () => {
    const h = await cardholder();
    const before = await fx.settlement(today);
    // The card took the value, and its answer was lost: the load stays pending, and nothing goes to clearing yet.
    const { offer, answer, id } = await loadUntilAnswered(h, 4_321);
    expect(answer.parsed).to.deep.include({ result: LoadResult.LOADED, balance: 4_321 });
    await fx.load.reporter.flush();
    expect(await fx.report(id)).to.equal(undefined);
    expect(delta(before, await fx.settlement(today))).to.deep.equal(NOTHING);

    const history = await fx.clients.load.reportCardHistory({ purseId: offer.purseId, cardLog: await h.reader.readLogRaw() });
    expect(history.settled.map((s) => s.outcome)).to.deep.equal([LOADED]);
    const report = await fx.reported(id);
    expect(report).to.deep.include({ clearing_status: "POSTED", duplicate: 0, settlement_day: today });
    expect(loadRecordOf((await fx.load.store.get(id))!).proof).to.equal(LoadProof.LOAD_PROOF_CARD_HISTORY);

    const again = await fx.clients.load.reportCardHistory({ purseId: offer.purseId, cardLog: await h.reader.readLogRaw() });
    expect(again.settled.map((s) => s.outcome)).to.deep.equal([LOADED]);
    await fx.load.reporter.flush();
    expect(await fx.report(id)).to.deep.equal(report);
    expect(delta(before, await fx.settlement(today))).to.deep.equal(moved(4_321));
    expect((await fx.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: history.settled[0]!.confirmation })).holdState).to.equal(
      HoldState.HOLD_STATE_POSTED,
    );
  });

  it("clearing down when the load settles: the load goes on, waits in the outbox, and is posted once when clearing is back", async () => {
    const before = await fx.settlement(today);
    await fx.stopClearing();
    try {
      const h = await cardholder();
      // The cardholder and the bank see a whole load while clearing is away.
      const { id } = await loadWithS3(h, 2_500);
      expect((await h.reader.readPurse()).balance).to.equal(2_500);
      await waitFor(async () => ((await fx.report(id))?.attempts ?? 0) >= 2, 10_000, "two attempts to report");
      const waiting = (await fx.report(id))!;
      expect(waiting).to.deep.include({ reported_at: null, refused_at: null });
      expect(waiting.last_error).to.match(/^UNAVAILABLE/);
      await fx.startClearing();
      expect(await fx.reported(id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0, settlement_day: today });
    } finally {
      await fx.startClearing();
    }
    expect(delta(before, await fx.settlement(today))).to.deep.equal(moved(2_500));
  });

  it("the load server restarted before clearing's acknowledgement reached it: the load is sent again and counted once", async () => {
    const relay = await startRelay(fx.clearingAddress);
    try {
      await fx.restartLoad(relay.address);
      const h = await cardholder();
      const before = await fx.settlement(today);
      const first = await loadWithS3(h, 1_000);
      expect(await fx.reported(first.id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0 });

      // Clearing's answers stop on the way back: clearing records the next load, the load server never hears of it.
      relay.hold();
      const second = await loadWithS3(h, 700);
      await waitFor(async () => (await fx.settlement(today)).loads === before.loads + 2, 10_000, "clearing to record the second load");
      expect(await fx.report(second.id)).to.deep.include({ reported_at: null });

      await fx.restartLoad();
      expect(await fx.reported(second.id)).to.deep.include({ clearing_status: "POSTED", duplicate: 1, settlement_day: today });
      expect(delta(before, await fx.settlement(today))).to.deep.equal(moved(1_700, 2));
    } finally {
      await fx.restartLoad();
      await relay.close();
    }
  });

  it("a tampered S3 sent with the load server's certificate is quarantined, and does not keep the genuine load of that id out", async () => {
    const h = await cardholder();
    const before = await fx.settlement(today);
    const pending = await loadUntilAnswered(h, 900);
    // The record the load server would send, its S3 with one bit flipped, sent straight to clearing.
    const row = (await fx.load.store.get(pending.id))!;
    const genuine = loadRecordOf({
      ...row,
      state: "SETTLED",
      outcome: "LOADED",
      proof_kind: "S3",
      card_counter: pending.answer.parsed!.counter,
      card_signature: pending.answer.parsed!.s3,
      settled_at: new Date().toISOString(),
    });
    const tampered = { ...genuine, loadAnswer: flipByte(genuine.loadAnswer, LoadResponse.offset("s3")) };
    const ack = await fx.clients.clearingAsLoadServer.submitLoads({ loads: [tampered] });
    expect(ack.acknowledgements).to.have.length(1);
    expect(ack.acknowledgements[0]).to.deep.include({
      status: LoadStatus.LOAD_STATUS_QUARANTINED,
      quarantinedBecause: QuarantineReason.QUARANTINE_REASON_BAD_S3,
      duplicate: false,
    });
    const quarantined = await fx.clients.clearing.listQuarantined({ pageSize: 500, pageToken: "" });
    const entry = quarantined.entries.find((e) => e.entry?.$case === "load" && e.entry.value.load?.transactionId?.value === pending.id);
    expect(entry?.entry?.$case === "load" && entry.entry.value.reason).to.equal(QuarantineReason.QUARANTINE_REASON_BAD_S3);
    expect(delta(before, await fx.settlement(today))).to.deep.equal(NOTHING);

    // The genuine load of that id and another load wait together while clearing is down, and go in one request.
    await fx.stopClearing();
    let other;
    try {
      const done = await fx.clients.load.completeLoad({
        transactionId: pending.offer.transactionId,
        loadResponse: pending.answer.raw,
        zeroValueInitializeResponse: Buffer.alloc(0),
      });
      expect(done.load!.outcome).to.equal(LOADED);
      other = await loadWithS3(await cardholder(), 600);
    } finally {
      await fx.startClearing();
    }
    expect(await fx.reported(other.id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0 });
    // The quarantined record was never posted: the genuine one replaces it and is posted once.
    expect(await fx.reported(pending.id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0 });
    expect(delta(before, await fx.settlement(today))).to.deep.equal(moved(1_500, 2));
  });

  // Last: it closes today's settlement day for the whole file.
  it("a load confirmed after its settlement day closed is posted to the next day; the closed day's figures do not change", async () => {
    const closed = (await fx.clients.clearing.closeSettlementDay({ day: today })).settlement!;
    expect(closed).to.deep.include({ day: today, closed: true });
    const { id } = await loadWithS3(await cardholder(), 1_111);
    const tomorrow = nextDay(today);
    expect(await fx.reported(id)).to.deep.include({ clearing_status: "POSTED", settlement_day: tomorrow });
    expect(await fx.settlement(today)).to.deep.equal(closed);
    expect(loadFigures(await fx.settlement(tomorrow))).to.deep.equal(moved(1_111));
  });
});
