// The clearing invariant, property-based (fast-check): random sequences of
// purchases in every confirmation mode, loads, clients dropping out in the
// middle of either, batch closes at random moments, restarts of clearing, of
// a terminal host and of the load server, and batches sent to clearing a
// second time, each sequence on a fresh card and bank account against the
// real network (every service on loopback gRPC, real SQLite files). After
// each sequence the card is synced, every batch closed, and every outbox
// emptied into clearing; then:
//   - the audit (RunAudit, with the card's balance read from the card and
//     its opening value from the issuer) holds, check by check;
//   - clearing's purchases of the card are exactly the purchases in the
//     card's log (ids and amounts), and its posted loads exactly the loads;
//   - nothing was quarantined, rejected or set aside: every record was genuine;
//   - a batch sent again was acknowledged as the duplicate it is, and
//     counted once.
// NETPURSE_CLEARING_RUNS sets the number of sequences (default 50, the
// nightly form 1000); NETPURSE_CLEARING_SEED and NETPURSE_CLEARING_PATH
// replay a failure fast-check reported.

import Database from "better-sqlite3";
import { expect } from "chai";
import fc from "fast-check";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { Status } from "nice-grpc";
import { BatchStatus } from "../../gen/netpurse/clearing/v1/clearing.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { BatchNotClosedReason } from "../../gen/netpurse/terminal/v1/terminal.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { hexOf, merchantId, purseId } from "../../lib/ids.js";
import { createLogger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { LogKind } from "../../lib/protocol/purse.js";
import { openSqlite } from "../../lib/store/db.js";
import { CardholderDaemon } from "../../client/daemon/daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal } from "../../client/daemon/journal.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { DEMO_SHOPS } from "../../services/network/layout.js";
import {
  CrashingPurchaseJournal,
  PURCHASE_STEPS,
  restartClearing,
  restartLoadServer,
  restartTerminal,
  startBatchRelay,
  untilAllAtClearing,
  type BatchRelay,
  type PurchaseStep,
} from "../support/clearing-invariant.js";
import { CrashingLoadJournal, EUR, freshCardholder, LOAD_STEPS, type LoadStep } from "../support/load.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";

const RUNS = Number(process.env.NETPURSE_CLEARING_RUNS ?? 50);
const TERMINALS = [
  { id: "terminal-1", psams: 2 },
  { id: "terminal-2", psams: 1 },
];
/** The demo shop of each confirmation mode: PSAM_VERIFIES, SERVER_COMPARES, CLIENT_COMPARES, MERCHANT_COMPARES. */
const SHOPS = DEMO_SHOPS.map((d) => d.shop.merchantId);
const PRODUCTS = ["song-1", "ebook-smart-cards", "ebook-grpc"] as const;
/** The card's opening value (the issuer's credit at personalisation), its maximum balance, and the bank account's deposit. */
const OPENING = 1_500;
const MAX_BALANCE = 6_000;
const DEPOSIT = 8_000;

type Action =
  | { kind: "purchase"; shop: string; product: (typeof PRODUCTS)[number] }
  | { kind: "droppedPurchase"; shop: string; product: (typeof PRODUCTS)[number]; drop: PurchaseStep }
  | { kind: "load"; amount: number; drop: LoadStep | undefined }
  | { kind: "closeBatches" }
  | { kind: "restart"; which: "clearing" | "load" | "terminal"; terminal: string }
  | { kind: "resend"; pick: number }
  | { kind: "sync" };

const shop = fc.constantFrom(...SHOPS);
const product = fc.constantFrom(...PRODUCTS);
const action: fc.Arbitrary<Action> = fc.oneof(
  { arbitrary: fc.record({ kind: fc.constant("purchase" as const), shop, product }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant("droppedPurchase" as const), shop, product, drop: fc.constantFrom(...PURCHASE_STEPS) }), weight: 2 },
  {
    arbitrary: fc.record({ kind: fc.constant("load" as const), amount: fc.integer({ min: 1, max: 4_000 }), drop: fc.constantFrom(undefined, ...LOAD_STEPS) }),
    weight: 3,
  },
  { arbitrary: fc.constant({ kind: "closeBatches" as const }), weight: 2 },
  {
    arbitrary: fc.record({
      kind: fc.constant("restart" as const),
      which: fc.constantFrom("clearing" as const, "load" as const, "terminal" as const),
      terminal: fc.constantFrom(...TERMINALS.map((t) => t.id)),
    }),
    weight: 2,
  },
  { arbitrary: fc.record({ kind: fc.constant("resend" as const), pick: fc.nat() }), weight: 1 },
  { arbitrary: fc.constant({ kind: "sync" as const }), weight: 1 },
);

/** Refusals a cardholder meets (no funds, no room on the card) and the drops themselves: they must leave nothing behind, which the invariant checks. */
const expected = (e: unknown) =>
  (e as { code?: number }).code === Status.FAILED_PRECONDITION ||
  /crashed after/.test((e as Error).message) ||
  /must prove it was not loaded/.test((e as Error).message);

/** A read-only look at clearing's database, as an auditor would take it. */
function clearingDb<T>(net: Network, read: (db: Database.Database) => T): T {
  const db = new Database(join(net.paths.clearing, "clearing.db"), { readonly: true });
  try {
    return read(db);
  } finally {
    db.close();
  }
}

const byId = (a: { id: string }, b: { id: string }) => a.id.localeCompare(b.id);

describe("invariant: clearing counts exactly what the cards paid and took, after random purchases, loads, drops, batch closes, resends and restarts", function () {
  this.timeout(0);
  let net: Network;
  let relay: BatchRelay;
  let n = 0;
  /** Actions run, by kind (a restart by what it restarted), and how they ended. */
  const tally = new Map<string, number>();
  const count = (what: string, by = 1) => tally.set(what, (tally.get(what) ?? 0) + by);
  /** Every purchase the cards' logs hold, over all sequences: what the merchants' statements must add up to. */
  let cardPurchasesMinor = 0;
  let cardPurchases = 0;

  // A thousand sequences log hundreds of thousands of routine lines; only errors are worth showing here.
  const logLevel = process.env.NETPURSE_LOG_LEVEL;
  before(async () => {
    process.env.NETPURSE_LOG_LEVEL = "error";
    net = await startNetwork({ terminals: TERMINALS });
    // The terminal hosts send their batches through the relay, which keeps a copy of each for the resends; the load server reports fast.
    relay = await startBatchRelay(net);
    for (const t of TERMINALS) await restartTerminal(net, t.id, relay);
    await restartLoadServer(net);
  });
  after(async () => {
    // Clearing restarted by the test is the test's to close; the fixture's own close does nothing the second time.
    await relay?.close();
    await net?.clearingServer.close();
    await net?.close();
    if (logLevel === undefined) delete process.env.NETPURSE_LOG_LEVEL;
    else process.env.NETPURSE_LOG_LEVEL = logLevel;
  });

  /** Sends a batch clearing has acknowledged again, as its host would after dying before it stored the acknowledgement: a duplicate, counted once. */
  async function resend(pick: number): Promise<void> {
    if (relay.captured.length === 0) {
      count("resend (no batch sent yet)");
      return;
    }
    const first = defined(relay.captured[pick % relay.captured.length], "a captured submission");
    const trailer = first.messages.at(-1)?.item;
    if (trailer?.$case !== "trailer") throw new Error("a captured submission without its trailer");
    const which = { psamId: trailer.value.psamId, batchNumber: trailer.value.batchNumber, pageSize: 0, pageToken: "" };
    const before = defined((await net.clearing.getBatch(which)).batch, "the batch at clearing");
    const ack = await relay.resend(first);
    expect(ack, "a batch sent again is acknowledged as a duplicate of the first").to.deep.include({
      batchNumber: first.ack.batchNumber,
      status: BatchStatus.BATCH_STATUS_ACCEPTED,
      posted: first.ack.posted,
      quarantined: first.ack.quarantined,
      duplicate: true,
      settlementDay: first.ack.settlementDay,
    });
    expect(hexOf(ack.psamId?.value)).to.equal(hexOf(trailer.value.psamId?.value));
    const after = defined((await net.clearing.getBatch(which)).batch, "the batch at clearing");
    expect(after.resubmissions, "clearing counts the resubmission").to.equal(before.resubmissions + 1);
    expect([after.posted, after.quarantined], "and posts nothing again").to.deep.equal([before.posted, before.quarantined]);
    count("resend");
  }

  async function runSequence(actions: Action[]): Promise<void> {
    const h = await freshCardholder(net, { value: OPENING, maxBalance: MAX_BALANCE, deposit: DEPOSIT });
    const db = openSqlite(join(net.data, "clearing-invariant", `client-${++n}.db`), CLIENT_MIGRATIONS);
    const journal = new CrashingPurchaseJournal(db);
    const loads = new CrashingLoadJournal(db);
    const daemon = new CardholderDaemon({
      transport: new InProcessTransport(h.card),
      journal,
      loads,
      log: createLogger("clearing-invariant-client"),
      security: net.security.cardholder,
    });
    try {
      for (const a of actions) {
        const what = a.kind === "restart" ? `restart ${a.which}` : a.kind;
        try {
          if (a.kind === "purchase" || a.kind === "droppedPurchase") {
            if (a.kind === "droppedPurchase") journal.crashAfter = a.drop;
            const { offer } = await defined(net.merchants[a.shop], a.shop).createOrder({ productId: a.product });
            try {
              await daemon.service.payOffer({ offer, approvedAmount: defined(offer, "the shop's offer").amount, requestId: "" }, {} as never);
            } finally {
              // The client dropped out; started again, the daemon finishes what its journal holds open.
              if (a.kind === "droppedPurchase") await daemon.resume();
            }
          } else if (a.kind === "load") {
            loads.crashAfter = a.drop;
            await daemon.service.loadCard(
              {
                bankAddress: net.bank.address,
                accountId: h.accountId,
                amount: money(a.amount, EUR, 2),
                approvedAmount: money(a.amount, EUR, 2),
                requestId: "",
                bankAccessToken: h.token,
              },
              {} as never,
            );
          } else if (a.kind === "closeBatches") {
            const r = await net.clients.concentrator.closeBatches({});
            count("batch closed", r.closed.length);
          } else if (a.kind === "restart") {
            if (a.which === "clearing") await restartClearing(net);
            else if (a.which === "load") await restartLoadServer(net);
            else await restartTerminal(net, a.terminal, relay);
          } else if (a.kind === "resend") {
            await resend(a.pick);
            continue;
          } else {
            await daemon.service.syncCard({}, {} as never);
          }
          count(what);
        } catch (e) {
          if (!expected(e)) throw e;
          count(`${what} (${/crashed after/.test((e as Error).message) ? "dropped" : "refused"})`);
        } finally {
          journal.crashAfter = undefined;
          loads.crashAfter = undefined;
        }
      }
      // What the sequence left open is resolved at the card's next contact: the daemon's resumption, then a sync.
      await daemon.resume();
      const { loads: synced } = await daemon.service.syncCard({}, {} as never);
      expect(await loads.openLoads(), JSON.stringify(synced)).to.have.length(0);
      expect(
        (await journal.unfinished()).map((r) => `${r.transaction_id} ${r.state}`),
        "no purchase left open",
      ).to.deep.equal([]);
      await check(h, journal);
    } finally {
      await daemon.close();
      await db.close();
    }
  }

  async function check(h: Awaited<ReturnType<typeof freshCardholder>>, journal: SqliteJournal): Promise<void> {
    const purse = await h.reader.readPurse();
    const purseHex = purse.purseId.toString("hex");
    const log = await h.reader.readLog();
    expect(log.length, "the card's log must reach back to its first transaction").to.equal(purse.counter);
    const cardPurchasesOf = log.filter((r) => r.kind === LogKind.PURCHASE).map((r) => ({ id: r.transactionRef, amount: r.amount }));
    const cardLoads = log.filter((r) => r.kind === LogKind.LOAD).map((r) => ({ id: r.transactionRef, amount: r.amount }));
    const spent = cardPurchasesOf.reduce((s, r) => s + r.amount, 0);
    const loaded = cardLoads.reduce((s, r) => s + r.amount, 0);
    expect(purse.balance, "card balance = opening value + loads - purchases").to.equal(OPENING + loaded - spent);

    // Every debit the card made must reach a PSAM's batch (its proof comes late in the client's and the merchant's modes).
    const unrecorded = async () => {
      const left: string[] = [];
      for (const p of cardPurchasesOf) {
        const { purchase } = await net.clients.payment.getPurchase({ transactionId: { value: p.id } });
        if (purchase?.state !== PurchaseState.PURCHASE_STATE_COMPLETED) left.push(`${p.id} ${PurchaseState[purchase?.state ?? 0]}`);
      }
      return left;
    };
    await waitFor(async () => (await unrecorded()).length === 0, 30_000, "the card's debits in the PSAMs' batches").catch(async () => {
      const rows = await Promise.all(cardPurchasesOf.map((p) => journal.get(p.id)));
      throw new Error(
        `the card paid these, and their proof never reached a PSAM's batch: ${(await unrecorded()).join(", ")} (client journal: ${rows.map((r) => `${r?.transaction_id} ${r?.state}`).join(", ")})`,
      );
    });

    // Every batch closed and every outbox emptied into clearing.
    const closed = await net.clients.concentrator.closeBatches({});
    count("batch closed", closed.closed.length);
    expect(
      closed.notClosed.filter((x) => x.reason !== BatchNotClosedReason.BATCH_NOT_CLOSED_REASON_EMPTY),
      "every PSAM's batch closes",
    ).to.deep.equal([]);
    await untilAllAtClearing(net);

    for (const [id, host] of net.hosts) {
      const setAside = (await host.host.data.batches()).filter((b) => b.state !== "accepted" && b.state !== "pending");
      expect(
        setAside.map((b) => `${id} ${b.psam_id}/${b.batch_number} ${b.state}: ${b.last_error}`),
        "no batch rejected or set aside",
      ).to.deep.equal([]);
    }
    const refused = (await net.load.store.clearingReports()).filter((r) => r.refused_at);
    expect(
      refused.map((r) => `${r.transaction_id}: ${r.last_error}`),
      "no load refused by clearing",
    ).to.deep.equal([]);

    // Clearing holds exactly the card's purchases and loads.
    const atClearing = clearingDb(net, (db) => ({
      purchases: db.prepare("SELECT transaction_id AS id, amount_minor AS amount FROM purchases WHERE purse_id = ?").all(purseHex) as {
        id: string;
        amount: number;
      }[],
      loads: db.prepare("SELECT transaction_id AS id, amount_minor AS amount, status FROM loads WHERE purse_id = ?").all(purseHex) as {
        id: string;
        amount: number;
        status: string;
      }[],
    }));
    expect(atClearing.purchases.sort(byId), "clearing's purchases of the card = the card log's purchases").to.deep.equal(cardPurchasesOf.sort(byId));
    expect(
      atClearing.loads
        .filter((l) => l.status === "POSTED")
        .map(({ id, amount }) => ({ id, amount }))
        .sort(byId),
      "clearing's posted loads of the card = the card log's loads",
    ).to.deep.equal(cardLoads.sort(byId));
    expect(
      atClearing.loads.filter((l) => l.status !== "POSTED" && l.status !== "NOT_LOADED"),
      "no load of the card quarantined",
    ).to.deep.equal([]);

    // The audit, with the card read from the card and its opening value from the issuer.
    const issuer = await Issuer.open(net.paths.issuer);
    const opening = await issuer.openingValue(purseHex).finally(() => issuer.close());
    expect(opening?.amountMinor, "the issuer's opening value").to.equal(OPENING);
    const audit = await net.clearing.runAudit({
      cards: [{ purseId: purseId(purseHex), balance: money(purse.balance, EUR, 2), openingValue: money(OPENING, EUR, 2) }],
    });
    expect(
      audit.checks.filter((c) => !c.ok).map((c) => `${c.name}: ${c.detail}`),
      "every audit check holds",
    ).to.deep.equal([]);
    expect(audit.ok).to.equal(true);
    expect(audit.checks.some((c) => c.name.includes(purseHex))).to.equal(true);
    if (audit.quarantined > 0) {
      const { entries } = await net.clearing.listQuarantined({ pageSize: 20, pageToken: "" });
      expect.fail(`clearing quarantined genuine records or loads: ${JSON.stringify(entries.map((e) => e.entry))}`);
    }
    cardPurchases += cardPurchasesOf.length;
    cardPurchasesMinor += spent;
  }

  it(`holds over ${RUNS} random sequences`, async () => {
    const started = performance.now();
    await fc.assert(
      fc.asyncProperty(fc.array(action, { minLength: 1, maxLength: 8 }), (actions) => runSequence(actions)),
      {
        numRuns: RUNS,
        endOnFailure: true,
        ...(process.env.NETPURSE_CLEARING_SEED ? { seed: Number(process.env.NETPURSE_CLEARING_SEED), path: process.env.NETPURSE_CLEARING_PATH } : {}),
      },
    );
    const seconds = (performance.now() - started) / 1000;

    // Over the whole run: what the merchants' statements add up to is what the cards paid, and every batch counted once.
    let statements = 0;
    let statementsMinor = 0;
    for (const m of SHOPS) {
      const s = await net.clearing.getMerchantStatement({ merchantId: merchantId(m), day: "", pageSize: 1, pageToken: "" });
      statements += s.purchases;
      statementsMinor += s.total.reduce((t, x) => t + Number(x.amountMinor), 0);
    }
    expect([statements, statementsMinor], "the merchants' statements = the cards' purchases").to.deep.equal([cardPurchases, cardPurchasesMinor]);
    const figures = clearingDb(net, (db) => ({
      ...(db
        .prepare("SELECT COUNT(*) AS batches, COALESCE(SUM(record_count), 0) AS records, COALESCE(SUM(resubmissions), 0) AS resubmissions FROM batches")
        .get() as { batches: number; records: number; resubmissions: number }),
      ...(db.prepare("SELECT COUNT(*) AS loads FROM loads WHERE status = 'POSTED'").get() as { loads: number }),
      ...(db.prepare("SELECT COUNT(*) AS notLoaded FROM loads WHERE status = 'NOT_LOADED'").get() as { notLoaded: number }),
    }));
    expect(figures.records, "every record of every batch posted once").to.equal(cardPurchases);
    const actions = [...tally.entries()]
      .sort(([a], [b]) => a.localeCompare(b))
      .map(([k, v]) => `${k} ${v}`)
      .join(", ");
    process.stderr.write(
      `clearing invariant: ${RUNS} sequences in ${seconds.toFixed(1)} s\n` +
        `  actions: ${actions}\n` +
        `  clearing: ${figures.batches} batches, ${figures.records} records, ${figures.resubmissions} resubmissions, ${figures.loads} loads posted, ${figures.notLoaded} not loaded\n`,
    );
  });
});
