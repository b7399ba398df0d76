// Several concentrators, and replicas of one payment server (issue #15,
// scope item 3): a real site in this process (test/support/concentrators.ts)
// with two concentrators, terminal hosts each given a list of them, and a
// payment server linked to both; then replicas of payment-1 (one identity,
// one certificate) each keeping its own stream. What a user checks: which
// PSAMs a purchase used, the card's balance, the PSAMs' counters, open
// debits and batches, what clearing posted, and the streams the
// concentrators list.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { ClientError, Status } from "nice-grpc";
import { PsamJobStatus, PsamSlotState } from "../../gen/netpurse/terminal/v1/terminal.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { PartyKind } from "../../gen/netpurse/clearing/v1/clearing.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { reasonOf } from "../../lib/grpc/errors.js";
import { hexOf } from "../../lib/ids.js";
import { startPaymentServer } from "../../services/payment/server.js";
import type { PurseReader } from "../../client/card/purse-reader.js";
import { issueCard } from "../support/batches.js";
import { openCard } from "../support/card-client.js";
import { commandFailure } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";
import { postgresOrSkip, type TestPostgres } from "../support/postgres.js";
import {
  deadAddress,
  drawUntilDebitCommand,
  finishPurchase,
  jobOn,
  provisionedPsams,
  rawPaymentStream,
  rawTerminalStream,
  slotOf,
  startSite,
  type Site,
} from "../support/concentrators.js";

const SONG = 99;
const ROOT = new URL("../..", import.meta.url).pathname;
const run = promisify(execFile);

/** The payment server's record of a purchase, as an operator reads it. */
const stateOf = async (ps: Site["payments"][number], p: { offer: { transactionId?: { value: string } | undefined } }) =>
  (await ps.client.getPurchase({ transactionId: p.offer.transactionId })).purchase!.state;

describe("several concentrators: terminal hosts attached to one of a list, a payment server linked to all", function () {
  this.timeout(60_000);
  let site: Site;
  let card: PurseReader;
  const bought: { terminalId: string; psam: string }[] = [];

  before(async () => {
    site = await startSite({
      concentrators: 2,
      terminals: [
        { id: "terminal-1", psams: 2, attach: [0, 1] },
        { id: "terminal-2", psams: 2, attach: [1, 0] },
        { id: "terminal-3", psams: 1, attach: [1], started: false },
        { id: "terminal-4", psams: 1, attach: [0, 1], started: false },
      ],
      holdTimeoutMs: 30_000,
    });
    card = await openCard(site.cardPath);
  });
  after(async () => site?.close());

  const ps = () => site.payments[0]!;
  const pool = () => ps().server.pool.counts();
  const balance = async () => (await card.readPurse()).balance;

  it("a payment server linked to both concentrators leases PSAMs of the terminal hosts of each, every PSAM counted once", async () => {
    expect(await site.attachedAt()).to.deep.equal([["terminal-1"], ["terminal-2"]]);
    for (const i of [0, 1]) {
      const streams = (await site.concentratorClient(i).listTerminals({})).paymentServers.map((p) => p.paymentServerId);
      expect(streams, `the payment server at concentrator ${i + 1}`).to.deep.equal(["payment-1"]);
    }
    await waitFor(() => pool().total === 4, 5_000, "4 PSAMs in the pool");
    for (let n = 0; n < 4; n++) {
      const p = await drawUntilDebitCommand(site, ps(), card);
      bought.push({ terminalId: p.issued.terminalId, psam: hexOf(p.issued.psamId?.value) });
      await finishPurchase(ps(), card, p);
      expect(await stateOf(ps(), p)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    }
    expect(new Set(bought.map((b) => b.terminalId))).to.deep.equal(new Set(["terminal-1", "terminal-2"]));
    expect(new Set(bought.map((b) => b.psam)).size, "the least recently used PSAM each time: all four").to.equal(4);
    expect(await balance()).to.equal(10_000 - 4 * SONG);
    const psams = await site.psams();
    expect(psams.map((s) => s.counter)).to.deep.equal([1, 1, 1, 1]);
    expect(psams.map((s) => s.batch)).to.deep.equal([1, 1, 1, 1]);
    expect(psams.every((s) => s.pending === 0)).to.equal(true);
    expect(pool()).to.deep.equal({ free: 4, leased: 0, total: 4 });
  });

  it("a terminal announced by two concentrators while it moves counts once; the pool takes the view of the one it attached to last, and a late 'detached' from the other leaves it in", async () => {
    const [psam] = await provisionedPsams(site.data, "terminal-4");
    const security = await site.security.of("terminal", "terminal-4");
    const before = pool();
    const at = (i: number, state?: PsamSlotState) => rawTerminalStream(site.addresses[i]!, security, "terminal-4", [slotOf(psam!, state)]);
    const listedAt = async (i: number) => (await site.attachedAt())[i]!.includes("terminal-4");

    const first = at(0);
    await first.welcomed();
    await waitFor(() => pool().total === before.total + 1 && pool().free === before.free + 1, 5_000, "terminal-4 in the pool, free");
    // It attaches at concentrator 2 before concentrator 1 saw it go (a stream cut without a word), and says its PSAM failed there.
    const second = at(1, PsamSlotState.PSAM_SLOT_STATE_FAILED);
    await second.welcomed();
    await waitFor(() => pool().free === before.free, 5_000, "the pool to take concentrator 2's view");
    expect(pool(), "counted once").to.deep.equal({ ...before, total: before.total + 1 });
    first.close(); // concentrator 1 notices now, and says it detached
    await waitFor(async () => !(await listedAt(0)), 5_000, "concentrator 1 to detach it");
    await new Promise((r) => setTimeout(r, 200));
    expect(pool(), "still in the pool, as concentrator 2 shows it").to.deep.equal({ ...before, total: before.total + 1 });

    // And back: attached at concentrator 1 again (the newer attach wins), then the stream at concentrator 2 ends.
    const third = at(0);
    await third.welcomed();
    await waitFor(() => pool().free === before.free + 1, 5_000, "the pool to take concentrator 1's view again");
    second.close();
    await waitFor(async () => !(await listedAt(1)), 5_000, "concentrator 2 to detach it");
    await new Promise((r) => setTimeout(r, 200));
    expect(pool()).to.deep.equal({ ...before, total: before.total + 1, free: before.free + 1 });
    third.close(); // gone from both: out of the pool
    await waitFor(() => pool().total === before.total, 5_000, "terminal-4 out of the pool");
    expect(pool()).to.deep.equal(before);
  });

  it("a terminal host whose first concentrator is down attaches to the next of its list, and its PSAM joins the pool", async () => {
    const dead = await deadAddress();
    const h = await site.startHost("terminal-3", `${dead},${site.addresses[1]},${site.addresses[0]}`);
    expect(h.host.concentrator()).to.equal(site.addresses[1]);
    expect(await site.attachedAt()).to.deep.equal([["terminal-1"], ["terminal-2", "terminal-3"]]);
    await waitFor(() => pool().total === 5, 5_000, "terminal-3's PSAM in the pool");
  });

  it("a concentrator closed while a purchase holds one of its PSAMs after the DEBIT command: the host re-attaches to the other, the purchase finishes and settles", async () => {
    const p = await drawUntilDebitCommand(site, ps(), card);
    const moving = p.issued.terminalId;
    const from = site.addresses.indexOf(site.hosts.get(moving)!.host.concentrator()!);
    const to = 1 - from;
    const total = pool().total; // every PSAM of the running hosts
    const purchases = (await site.psams()).reduce((n, s) => n + s.counter, 0); // DEBIT commands so far, this one's included
    expect(pool()).to.include({ leased: 1 });

    // Watch the pool while the host moves: never a PSAM counted twice.
    let most = 0;
    const watch = setInterval(() => (most = Math.max(most, pool().total)), 5);
    try {
      await site.closeConcentrator(from);
      await waitFor(() => site.hosts.get(moving)!.host.concentrator() === site.addresses[to], 10_000, `${moving} to attach to concentrator ${to + 1}`);
      await waitFor(() => pool().total === total, 10_000, "every PSAM back in the pool");
    } finally {
      clearInterval(watch);
    }
    expect(most, "no PSAM counted twice while its host moved").to.equal(total);
    expect((await site.attachedAt())[to]).to.deep.equal([...site.hosts.keys()].sort());
    // The pool forgot the lease when the PSAM left it (as when a host restarts); the purchase's own lease still reaches the PSAM where it is now.
    expect(pool(), "every PSAM counted once, at the concentrator it is attached to now").to.deep.equal({ free: total, leased: 0, total });

    await finishPurchase(ps(), card, p);
    expect(await stateOf(ps(), p)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect(await balance()).to.equal(10_000 - purchases * SONG);
    expect(pool()).to.deep.equal({ free: total, leased: 0, total });
    const signed = (await site.psams()).find((s) => s.psam === hexOf(p.issued.psamId?.value))!;
    expect(signed).to.include({ terminalId: moving, counter: p.issued.psamCounter, pending: 0 });

    // Settled: every batch closed through the concentrator the hosts are attached to now, and posted once by clearing.
    const closed = await site.concentratorClient(to).closeBatches({ terminalId: "", psamId: undefined });
    expect(closed.closed.reduce((n, b) => n + b.count, 0)).to.equal(purchases);
    expect(closed.closed.reduce((n, b) => n + Number(b.total?.amountMinor ?? 0n), 0)).to.equal(purchases * SONG);
    await waitFor(
      async () => {
        for (const h of site.hosts.values()) if ((await h.host.data.outbox()).length > 0) return false;
        return true;
      },
      15_000,
      "every closed batch acknowledged by clearing",
    );
    const { settlement } = await site.clients.clearing.getSettlement({ day: "", pageSize: 0, pageToken: "" });
    expect(settlement?.purchases).to.equal(purchases);
    const shop = settlement?.positions.find((x) => x.kind === PartyKind.PARTY_KIND_MERCHANT && x.partyId === "demo-shop");
    expect(shop?.receivable?.amountMinor).to.equal(BigInt(purchases * SONG));
    const psams = await site.psams();
    expect(
      psams.reduce((n, s) => n + s.counter, 0),
      "one PSAM counter step per DEBIT command",
    ).to.equal(purchases);
    expect(psams.every((s) => s.pending === 0 && s.batch === 0)).to.equal(true);

    // The concentrator back on its address: the payment server links to it again; the hosts stay where they are.
    await site.restartConcentrator(from);
    await waitFor(
      async () => (await site.concentratorClient(from).listTerminals({})).paymentServers.length === 1,
      15_000,
      "the payment server to link to the restarted concentrator",
    );
    expect((await site.attachedAt())[from]).to.deep.equal([]);
    const next = await drawUntilDebitCommand(site, ps(), card);
    await finishPurchase(ps(), card, next);
    expect(await stateOf(ps(), next)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
  });

  it("netpurse-operator terminals and close-batch given the list reach every concentrator (and say which one did not answer)", async () => {
    const operator = (...args: string[]) => run(join(ROOT, "bin/netpurse-operator"), [...args, "--data", site.data]);
    const list = site.addresses.join(",");
    const shown = (await operator("terminals", "--concentrator", list)).stdout;
    const rows = shown.split("\n").map((l) => l.trim().split(/\s{2,}/));
    const where = await site.attachedAt();
    for (const [i, ids] of where.entries())
      for (const id of ids)
        expect(
          rows.some((r) => r[0] === site.addresses[i] && r[1] === id),
          `${id} at concentrator ${i + 1}`,
        ).to.equal(true);
    for (const a of site.addresses) expect(shown).to.contain(`payment server payment-1 at ${a}:`);

    // The last purchase's batch is open on one PSAM: closed through whichever concentrator its host is attached to.
    const open = (await site.psams()).filter((x) => x.batch > 0);
    expect(open).to.have.length(1);
    const dead = await deadAddress();
    const closing = (await operator("close-batch", "--concentrator", `${list},${dead}`)).stdout;
    expect(closing.split("\n").map((l) => l.trim().split(/\s{2,}/))).to.deep.include([open[0]!.terminalId, open[0]!.psam, "2", "1", "EUR 99"]);
    expect(closing).to.contain(`concentrator ${dead} did not answer`);
    expect((await site.psams()).every((x) => x.batch === 0)).to.equal(true);
    // One host's batches, asked of every concentrator: found at the one it is attached to (NOT_FOUND at the others is no error).
    const one = (await operator("close-batch", "--terminal", open[0]!.terminalId, "--concentrator", list)).stdout;
    expect(one).to.contain("no batch closed");
    const nowhere = await commandFailure(operator("close-batch", "--terminal", "terminal-9", "--concentrator", list));
    expect(nowhere.stderr).to.contain("NOT_FOUND");
  });
});

describe("replicas of one payment server: one identity, one certificate, a stream each", function () {
  this.timeout(60_000);
  let site: Site;
  let cards: PurseReader[];

  before(async () => {
    site = await startSite({
      concentrators: 1,
      terminals: [
        { id: "terminal-1", psams: 2, attach: [0] },
        { id: "terminal-2", psams: 2, attach: [0] },
      ],
      // Each on its own SQLite file here: what is under test is their streams, not their shared database (next suite).
      paymentServers: [{ replica: "r1" }, { replica: "r2" }],
      holdTimeoutMs: 30_000,
    });
    cards = [await openCard(site.cardPath), await openCard(await issueCard(site.data, "second", 10_000))];
  });
  after(async () => site?.close());

  const [r1, r2] = [() => site.payments[0]!, () => site.payments[1]!];
  const streams = async () =>
    (await site.concentratorClient(0).listTerminals({})).paymentServers
      .map((p) => ({ id: p.paymentServerId, replica: p.replicaId, leased: p.psamsLeased }))
      .sort((a, b) => `${a.id}/${a.replica}`.localeCompare(`${b.id}/${b.replica}`));

  it("both replicas lease PSAMs; the share of the pool is per identity, so a stream under a made-up replica id leases nothing more", async () => {
    const other = rawPaymentStream(site.addresses[0]!, await site.security.of("payment", "payment-2"), "payment-2");
    await other.welcomed(); // two identities at the concentrator: 4 PSAMs, a share of 2 each
    const held = [await drawUntilDebitCommand(site, r1(), cards[0]!), await drawUntilDebitCommand(site, r2(), cards[1]!)];
    expect(await streams()).to.deep.equal([
      { id: "payment-1", replica: "r1", leased: 1 },
      { id: "payment-1", replica: "r2", leased: 1 },
      { id: "payment-2", replica: "", leased: 0 },
    ]);
    const taken = new Set(held.map((p) => hexOf(p.issued.psamId?.value)));
    const free = (await site.psams()).filter((s) => !taken.has(s.psam));
    expect(free).to.have.length(2);

    // payment-1's certificate, copied, with a replica id of its own making.
    const copy = rawPaymentStream(site.addresses[0]!, await site.security.of("payment", "payment-1"), "payment-1", "made-up");
    await copy.welcomed();
    const refused = await copy.run(jobOn("c1", free[0]!.terminalId, free[0]!.psam, { $case: "reverseDebit", value: { psamCounter: 999 } }));
    expect(refused.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    expect(refused.message).to.contain("payment server payment-1 holds 2 PSAMs, its share of the pool");
    // The other identity still gets its share: the job reaches the PSAM, which has no debit at that counter to reverse.
    const served = await other.run(jobOn("o1", free[0]!.terminalId, free[0]!.psam, { $case: "reverseDebit", value: { psamCounter: 999 } }));
    expect(served.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED);
    expect((await streams()).find((s) => s.id === "payment-2")?.leased).to.equal(1);
    copy.close();
    other.close();

    for (const [i, ps] of [r1(), r2()].entries()) {
      await finishPurchase(ps, cards[i]!, held[i]!);
      expect(await stateOf(ps, held[i]!)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
      expect((await cards[i]!.readPurse()).balance).to.equal(10_000 - SONG);
    }
    await waitFor(async () => (await streams()).length === 2, 5_000, "the played streams to go");
    expect(await streams()).to.deep.equal([
      { id: "payment-1", replica: "r1", leased: 0 },
      { id: "payment-1", replica: "r2", leased: 0 },
    ]);
  });

  it("a payment server given a replica name the concentrators would refuse does not start, and says why", async () => {
    for (const replicaId of ["", "has space", "x".repeat(65)]) {
      const e = await startPaymentServer({
        security: await site.security.of("payment", "payment-1"),
        listen: "127.0.0.1:0",
        dir: join(site.data, "payment"),
        concentrator: site.addresses[0]!,
        replicaId,
      }).then(
        (s) => s.close().then(() => undefined),
        (x: unknown) => x as Error,
      );
      expect(e?.message, replicaId).to.match(/^replica ".*" must be 1\.\.64 characters of \[A-Za-z0-9\._-\]/);
    }
  });

  it("a second stream with a connected replica's id is refused (ALREADY_EXISTS) while the first answers its pings", async () => {
    const before = (await site.concentratorClient(0).listTerminals({})).paymentServers.find((p) => p.replicaId === "r1")!;
    const dup = rawPaymentStream(site.addresses[0]!, await site.security.of("payment", "payment-1"), "payment-1", "r1");
    await waitFor(() => dup.ended !== null, 10_000, "the second r1 stream to be refused");
    expect((dup.ended as ClientError).code).to.equal(Status.ALREADY_EXISTS);
    expect(reasonOf(dup.ended)).to.equal(ErrorReason.ERROR_REASON_NOT_ALLOWED);
    expect((dup.ended as ClientError).details).to.contain("payment-1 (replica r1) is connected and answers its pings");
    dup.close();
    const after = (await site.concentratorClient(0).listTerminals({})).paymentServers.find((p) => p.replicaId === "r1")!;
    expect(after.connectedAt?.getTime(), "the first stream stands").to.equal(before.connectedAt?.getTime());
    const p = await drawUntilDebitCommand(site, r1(), cards[0]!);
    await finishPurchase(r1(), cards[0]!, p);
    expect(await stateOf(r1(), p)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
  });
});

describe("replicas of one payment server on one PostgreSQL database", function () {
  this.timeout(60_000);
  let db: TestPostgres | undefined;
  let site: Site | undefined;

  before(async function () {
    this.timeout(120_000);
    db = await postgresOrSkip(this);
    site = await startSite({
      concentrators: 1,
      terminals: [{ id: "terminal-1", psams: 1, attach: [0] }],
      paymentServers: [
        { replica: "r1", database: db.url },
        { replica: "r2", database: db.url },
      ],
      holdTimeoutMs: 30_000,
    });
  });
  after(async () => {
    await site?.close();
    await db?.stop();
  });

  it("a replica verifies the debit another replica of its identity issued, once that one stopped; another payment server may not touch it (NOT_ALLOWED)", async () => {
    const s = site!;
    const card = await openCard(s.cardPath);
    const [r1, r2] = [s.payments[0]!, s.payments[1]!];
    const p = await drawUntilDebitCommand(s, r1, card);
    await r1.server.close(); // r1 stops after the DEBIT command left; its PSAM goes back to the pool
    await waitFor(async () => (await s.concentratorClient(0).listTerminals({})).paymentServers.length === 1, 5_000, "r1's stream to end");

    const psam = hexOf(p.issued.psamId?.value);
    const stranger = rawPaymentStream(s.addresses[0]!, await s.security.of("payment", "payment-2"), "payment-2");
    await stranger.welcomed();
    const onIt = (id: string, task: Parameters<typeof jobOn>[3]) => stranger.run(jobOn(id, p.issued.terminalId, psam, task));
    expect((await onIt("x1", { $case: "reverseDebit", value: { psamCounter: p.issued.psamCounter } })).status).to.equal(
      PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED,
    );
    const verify = { psamCounter: p.issued.psamCounter, cardStatusWord: 0x9000, debitResponse: Buffer.alloc(0) };
    expect((await onIt("x2", { $case: "verifyDebit", value: verify })).status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED);
    stranger.close();

    await finishPurchase(r2, card, p);
    expect(await stateOf(r2, p)).to.equal(PurchaseState.PURCHASE_STATE_COMPLETED);
    expect((await card.readPurse()).balance).to.equal(10_000 - SONG);
    expect(await s.psams()).to.deep.equal([{ terminalId: "terminal-1", psam, counter: 1, pending: 0, batch: 1 }]);
  });
});
