// The software card's and PSAM's state on disk (lib/apdu/state-log.ts): a
// snapshot and a log of changes. Real files in a temporary folder: what is
// saved is what a new open finds, through compactions, a torn last record,
// a crash between a compaction's two steps and a process killed at random;
// a damaged record is refused; DRAW AMOUNT, VERIFY DEBIT and DEBIT cost one
// sync each; files from before the log open as they are.
// NETPURSE_STATE_LOG_RUNS sets the number of random sequences of each
// property-based test (default 25), NETPURSE_STATE_LOG_KILLS the number of
// kills in the crash test (default 4).

import { expect } from "chai";
import fc from "fast-check";
import { spawn, type ChildProcess } from "node:child_process";
import { randomUUID } from "node:crypto";
import { appendFile, readFile, stat, truncate, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { SW } from "../../lib/apdu/apdu.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { logPathOf, readState, SNAPSHOT_SEQ_FIELD, StateLog, StateLogError, stateLogLimits, writeState } from "../../lib/apdu/state-log.js";
import { writeJsonAtomic } from "../../lib/files.js";
import { processStats } from "../../lib/stats.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam, type PsamFile } from "../../services/terminal/psam/software-psam.js";
import { readCardsAtHand } from "../../services/operator/clearing-report.js";
import type { Issuer } from "../../services/issuer/issuer.js";
import { EUR, makeCard, makeIssuer, makePsam, swOf, tempDir } from "../support/fixtures.js";

const RUNS = Number(process.env.NETPURSE_STATE_LOG_RUNS ?? 25);
const KILLS = Number(process.env.NETPURSE_STATE_LOG_KILLS ?? 4);

/** The state as a file would hold it: what JSON keeps of it. */
const asStored = (s: unknown): unknown => JSON.parse(JSON.stringify(s));
/** Syncs made by this process so far (lib/stats.ts). */
const fsyncs = () => processStats().fsyncs;
/** The application's state in memory (tests compare it with what a new open reads). */
const held = (app: SoftwareCard | SoftwarePsam): object => (app as unknown as { state: object }).state;
/** The state the crash test's saving process keeps (test/support/state-log-child.ts): a counter and its last KEPT values. */
interface CrashState {
  format: 1;
  counter: number;
  recent: number[];
}
const KEPT = 16;

const lines = async (path: string) => (await readFile(path, "utf8")).split("\n").filter((l) => l !== "");

/** A state with the shapes the card and PSAM have: counters, lists grown and cut at either end, an optional field, nested objects. */
interface Model {
  format: 1;
  counter: number;
  pending: { id: number; ref: string }[];
  settled: { id: number; outcome: string }[];
  log: { n: number; note: string }[];
  batch: { id: number; amount: number }[];
  blocked: string[];
  keys: Record<string, string>;
  lastClosed?: { batchNumber: number; total: number };
}

const initial = (): Model => ({ format: 1, counter: 0, pending: [], settled: [], log: [], batch: [], blocked: [], keys: { "1": "00".repeat(16) } });

/** Immutable updates, as the applications make them (and some they do not: reordering, an element inserted in the middle, a nested change). */
const update = fc.oneof(
  fc.string({ maxLength: 40 }).map((ref) => (s: Model): Model => ({ ...s, counter: s.counter + 1, pending: [...s.pending, { id: s.counter + 1, ref }] })),
  fc.nat().map((i) => (s: Model): Model => {
    const p = s.pending[i % Math.max(1, s.pending.length)];
    if (!p) return s;
    return {
      ...s,
      pending: s.pending.filter((x) => x !== p),
      settled: [...s.settled, { id: p.id, outcome: "recorded" }].slice(-8),
      batch: [...s.batch, { id: p.id, amount: p.ref.length }],
    };
  }),
  fc.string({ maxLength: 200 }).map((note) => (s: Model): Model => ({ ...s, log: [{ n: s.log.length, note }, ...s.log].slice(0, 5) })),
  fc.constant((s: Model): Model => ({ ...s, batch: [], lastClosed: { batchNumber: s.counter, total: s.batch.length } })),
  fc.constant((s: Model): Model => {
    const rest = { ...s };
    delete rest.lastClosed;
    return rest;
  }),
  fc.constant((s: Model): Model => ({ ...s, settled: [...s.settled].reverse() })),
  fc.string({ maxLength: 8 }).map((x) => (s: Model): Model => ({ ...s, blocked: [...s.blocked.slice(0, 1), x, ...s.blocked.slice(1)] })),
  fc.string({ maxLength: 8 }).map((x) => (s: Model): Model => ({ ...s, keys: { ...s.keys, [String(s.counter)]: x } })),
  fc.constant((s: Model): Model => ({ ...s })), // nothing changed
);

const step = fc.oneof(
  { weight: 8, arbitrary: update.map((u) => ({ kind: "save" as const, u })) },
  { weight: 1, arbitrary: fc.constant({ kind: "reopen" as const }) },
);

describe("software card and PSAM state: snapshot and log (lib/apdu/state-log.ts)", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;
  const limit = stateLogLimits.compactMinBytes;

  /** The crash test's saving processes: none outlives its test. */
  const children: ChildProcess[] = [];

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-state-log-"));
    issuer = await makeIssuer(dir);
  });
  afterEach(async () => {
    for (const c of children.splice(0)) if (c.exitCode === null && c.signalCode === null) c.kill("SIGKILL");
    stateLogLimits.compactMinBytes = limit;
    await issuer.close();
    await cleanup();
  });

  it(`what is saved is what a new open reads, after any sequence of changes and reopens, through compactions (${RUNS} runs)`, async () => {
    stateLogLimits.compactMinBytes = 256; // a compaction every few saves
    let compactions = 0;
    await fc.assert(
      fc.asyncProperty(fc.array(step, { minLength: 1, maxLength: 80, size: "max" }), async (steps) => {
        const path = join(dir, `${randomUUID()}.json`);
        await writeState(path, initial());
        let log = await StateLog.open<Model>(path);
        let model = initial();
        try {
          for (const s of steps) {
            if (s.kind === "reopen") {
              await log.close();
              log = await StateLog.open<Model>(path);
              expect(log.state).to.deep.equal(asStored(model));
              model = log.state; // the application goes on from what it read, as after a restart
            } else {
              const before = (await stat(logPathOf(path))).size;
              model = s.u(model);
              await log.save(model);
              if ((await stat(logPathOf(path))).size < before) compactions++;
            }
            expect(log.state).to.equal(model);
            expect(await readState(path)).to.deep.equal(asStored(model));
          }
          await log.close();
          const reopened = await StateLog.open<Model>(path);
          expect(reopened.state).to.deep.equal(asStored(model));
          await reopened.close();
        } finally {
          await log.close();
        }
      }),
      { numRuns: RUNS },
    );
    expect(compactions, "compactions reached").to.be.greaterThan(0);
  });

  it(`a software PSAM and card after random purchases, reversals, open debits, batch closes and reopens hold what a new open reads (${RUNS} runs)`, async function () {
    this.timeout(300_000);
    stateLogLimits.compactMinBytes = 4096; // the PSAM's log passes it within a few purchases
    let compacted = 0;
    {
      const op = fc.constantFrom("purchase", "purchase", "purchase", "reverse", "leave-open", "close-batch", "reopen");
      await fc.assert(
        fc.asyncProperty(fc.array(op, { minLength: 1, maxLength: 25 }), async (ops) => {
          const name = randomUUID();
          const cardPath = await makeCard(issuer, dir, { name, value: 40_000 });
          const psamPath = await makePsam(issuer, dir, { name, batchCapacity: 16 });
          let card = await SoftwareCard.open(cardPath);
          let psam = await SoftwarePsam.open(psamPath);
          try {
            let reader = new PurseReader(new InProcessTransport(card));
            let driver = new PsamDriver(new InProcessTransport(psam));
            let atr = await reader.connect();
            await driver.connect();
            const open: number[] = [];
            let paid = 0;
            for (const o of ops) {
              if (o === "reopen") {
                await Promise.all([card.close(), psam.close()]);
                [card, psam] = await Promise.all([SoftwareCard.open(cardPath), SoftwarePsam.open(psamPath)]);
                reader = new PurseReader(new InProcessTransport(card));
                driver = new PsamDriver(new InProcessTransport(psam));
                atr = await reader.connect();
                await driver.connect();
              } else if (o === "close-batch") await driver.closeBatch();
              else {
                if ((await driver.readStatus()).batchCount >= 16) await driver.closeBatch();
                const init = await reader.initializeForPurchase();
                const amount = 1 + (paid % 97);
                const draw = { amount, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" };
                const issued = await driver.issueDebitCommand({ cardAtr: atr, initializeResponse: init.raw, draw, returnExpectedSignature: false });
                if (o === "purchase") {
                  await driver.verifyDebit(issued.psamCounter, (await reader.debit(issued.debitCommand)).raw);
                  paid += amount;
                } else if (o === "reverse") await driver.reverseDebit(issued.psamCounter);
                else open.push(issued.psamCounter);
              }
            }
            expect(await readState(cardPath)).to.deep.equal(asStored(held(card)));
            expect(await readState(psamPath)).to.deep.equal(asStored(held(psam)));
            expect((await readState<CardFile>(cardPath)).balance).to.equal(40_000 - paid);
            expect((await readState<PsamFile>(psamPath)).pending.map((p) => p.psamCounter)).to.deep.equal(open);
            await Promise.all([card.close(), psam.close()]);
            const [c2, p2] = await Promise.all([SoftwareCard.open(cardPath), SoftwarePsam.open(psamPath)]);
            expect(asStored(held(c2))).to.deep.equal(asStored(held(card)));
            expect(asStored(held(p2))).to.deep.equal(asStored(held(psam)));
            await Promise.all([c2.close(), p2.close()]);
            if (SNAPSHOT_SEQ_FIELD in (JSON.parse(await readFile(psamPath, "utf8")) as object)) compacted++;
          } finally {
            await Promise.all([card.close(), psam.close()]);
          }
        }),
        { numRuns: RUNS },
      );
    }
    expect(compacted, "runs in which the PSAM's state was compacted").to.be.greaterThan(0);
  });

  it("drops a torn last record (a crash mid-write, never acknowledged) and appends after it cleanly", async () => {
    const path = join(dir, "s.json");
    await writeState(path, initial());
    const log = await StateLog.open<Model>(path);
    const one = { ...initial(), counter: 1 };
    await log.save(one);
    const two = { ...one, counter: 2, blocked: ["a"] };
    await log.save(two);
    await log.close();
    const full = (await stat(logPathOf(path))).size;
    const last = (await lines(logPathOf(path)))[1]!;
    // Each cut of the last record (its newline too) reads as the state before it.
    for (const cut of [1, 5, Math.floor(last.length / 2), last.length]) {
      await truncate(logPathOf(path), full - cut);
      expect(await readState(path), `cut ${cut}`).to.deep.equal(one);
    }
    // Garbage with a newline, as a crash may leave after the last good record, is torn too.
    await appendFile(logPathOf(path), "0000\0\0\0\n");
    expect(await readState(path)).to.deep.equal(one);
    const reopened = await StateLog.open<Model>(path);
    expect(reopened.state).to.deep.equal(one);
    expect(await lines(logPathOf(path))).to.have.length(1); // the torn bytes are gone before anything follows them
    const three = { ...one, counter: 3 };
    await reopened.save(three);
    await reopened.close();
    expect(await readState(path)).to.deep.equal(three);
  });

  it("two opens at once after a crash take turns: the second shares the first's log and cuts nothing it saved", async () => {
    const path = join(dir, "s.json");
    await writeState(path, initial());
    const first = await StateLog.open<Model>(path);
    const one = { ...initial(), counter: 1 };
    await first.save(one);
    await first.close();
    await appendFile(logPathOf(path), "0000 torn"); // a crash mid-write
    const [a, b] = await Promise.all([StateLog.open<Model>(path), StateLog.open<Model>(path)]);
    expect(a).to.equal(b);
    const two = { ...one, counter: 2 };
    await a.save(two);
    await a.close();
    await b.close();
    expect(await readState(path)).to.deep.equal(two);
  });

  it("refuses a log whose damaged record is not the last, naming the file, and a log with records missing", async () => {
    const { cardPath, psamPath } = await purchases(issuer, dir, 3);
    const logPath = logPathOf(cardPath);
    const records = await lines(logPath);
    expect(records).to.have.length(3);
    // One digit of the second record changed, as a bad sector or a stray write would.
    const damaged = records.map((l, i) => (i === 1 ? l.slice(0, 9) + l.slice(9).replace(/\d/, (d) => String((Number(d) + 1) % 10)) : l));
    expect(damaged[1]).to.not.equal(records[1]);
    await writeFile(logPath, damaged.join("\n") + "\n");
    for (const open of [() => readState(cardPath), () => SoftwareCard.open(cardPath)]) {
      const e = await open().then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e).to.be.instanceOf(StateLogError);
      expect((e as Error).message)
        .to.contain(logPath)
        .and.to.contain("line 2")
        .and.to.contain("corrupt");
    }
    // Records that do not follow on from the snapshot's: another file's log, or one missing its start.
    await writeFile(logPath, records.slice(1).join("\n") + "\n");
    const gap = await readState(cardPath).then(
      () => undefined,
      (x: unknown) => x as Error,
    );
    expect(gap?.message).to.contain(logPath).and.to.contain("start at 2");
    // The PSAM beside it still opens: only the damaged file is refused.
    const psam = await SoftwarePsam.open(psamPath);
    await psam.close();
  });

  it("a crash between a compaction's new snapshot and the emptying of the log opens to the same state", async () => {
    const { cardPath, psamPath } = await purchases(issuer, dir, 4);
    for (const path of [cardPath, psamPath]) {
      const state = await readState<object>(path);
      const records = await lines(logPathOf(path));
      // What compaction writes first: the whole state, carrying the last record's number. The log stays as it was.
      await writeJsonAtomic(path, { ...state, [SNAPSHOT_SEQ_FIELD]: records.length }, { private: true });
      expect(await readState(path)).to.deep.equal(state);
    }
    const card = await SoftwareCard.open(cardPath);
    const psam = await SoftwarePsam.open(psamPath);
    // Opening finished the compaction: the old records are gone; a new one follows on.
    expect((await stat(logPathOf(cardPath))).size).to.equal(0);
    const reader = new PurseReader(new InProcessTransport(card));
    const driver = new PsamDriver(new InProcessTransport(psam));
    const atr = await reader.connect();
    await driver.connect();
    expect((await reader.readPurse()).balance).to.equal(10_000 - 4 * 100);
    expect(await driver.readStatus()).to.include({ psamCounter: 4, batchCount: 4 });
    await purchase(reader, driver, atr, 100);
    await Promise.all([card.close(), psam.close()]);
    expect((await readState<CardFile>(cardPath)).balance).to.equal(10_000 - 5 * 100);
    expect(await readState<PsamFile>(psamPath)).to.include({ counter: 5 });
    expect((await readState<PsamFile>(psamPath)).batch).to.have.length(5);
  });

  it("compaction writes the state whole (0600), empties the log, costs 3 syncs more, and keeps the state", async () => {
    stateLogLimits.compactMinBytes = 1; // the first record is past the bound
    const path = join(dir, "s.json");
    await writeState(path, initial());
    const log = await StateLog.open<Model>(path);
    const next = { ...initial(), counter: 7, pending: [{ id: 7, ref: "x".repeat(5000) }] };
    const before = fsyncs();
    await log.save(next);
    expect(fsyncs() - before, "the record, then the snapshot (file and folder) and the log's truncation").to.equal(4);
    expect((await stat(logPathOf(path))).size).to.equal(0);
    const snapshot = JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
    expect(snapshot[SNAPSHOT_SEQ_FIELD]).to.equal(1);
    expect((await stat(path)).mode & 0o777).to.equal(0o600);
    expect((await stat(logPathOf(path))).mode & 0o777).to.equal(0o600);
    // Past the first compaction the bound is the snapshot's own size: the next small record does not compact.
    const small = { ...next, counter: 8 };
    const mid = fsyncs();
    await log.save(small);
    expect(fsyncs() - mid).to.equal(1);
    expect(await lines(logPathOf(path))).to.have.length(1);
    await log.close();
    expect(await readState(path)).to.deep.equal(small);
  });

  it("DRAW AMOUNT and VERIFY DEBIT in the PSAM, DEBIT in the card: one sync each; commands that change nothing, none", async () => {
    const card = await SoftwareCard.open(await makeCard(issuer, dir));
    const psam = await SoftwarePsam.open(await makePsam(issuer, dir));
    const reader = new PurseReader(new InProcessTransport(card));
    const driver = new PsamDriver(new InProcessTransport(psam));
    const atr = await reader.connect();
    await driver.connect();
    for (let i = 0; i < 3; i++) {
      let n = fsyncs();
      const init = await reader.initializeForPurchase();
      expect(fsyncs() - n, "INITIALIZE FOR PURCHASE").to.equal(0);
      n = fsyncs();
      const draw = { amount: 100, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" };
      const issued = await driver.issueDebitCommand({ cardAtr: atr, initializeResponse: init.raw, draw, returnExpectedSignature: false });
      expect(fsyncs() - n, "CARD RESET, INITIALIZE, DRAW AMOUNT").to.equal(1);
      n = fsyncs();
      const answer = await reader.debit(issued.debitCommand);
      expect(fsyncs() - n, "DEBIT").to.equal(1);
      n = fsyncs();
      await driver.verifyDebit(issued.psamCounter, answer.raw);
      expect(fsyncs() - n, "VERIFY DEBIT").to.equal(1);
      n = fsyncs();
      await driver.readStatus();
      await reader.readPurse();
      expect(fsyncs() - n, "READ STATUS, READ PURSE").to.equal(0);
    }
    expect((await reader.readPurse()).balance).to.equal(10_000 - 300);
    // A refused command writes nothing either.
    const n = fsyncs();
    expect(await swOf(driver.verifyDebit(99, Buffer.alloc(17)))).to.equal(SW.REFERENCED_DATA_NOT_FOUND);
    expect(fsyncs() - n).to.equal(0);
    await Promise.all([card.close(), psam.close()]);
  });

  it("opens a format-1 file from before the log as it is, and leaves it as it was while changes go to the log", async () => {
    const cardPath = await makeCard(issuer, dir, { value: 5_000 });
    // Written as the code before the log wrote it: pretty JSON, no sequence number, no log beside it.
    const old = JSON.parse(await readFile(cardPath, "utf8")) as CardFile;
    expect(old).to.not.have.property(SNAPSHOT_SEQ_FIELD);
    const text = JSON.stringify({ ...old, balance: 4_321, counter: 9 }, null, 2) + "\n";
    await writeFile(cardPath, text, { mode: 0o600 });
    const psamPath = await makePsam(issuer, dir);
    const card = await SoftwareCard.open(cardPath);
    const psam = await SoftwarePsam.open(psamPath);
    const reader = new PurseReader(new InProcessTransport(card));
    const driver = new PsamDriver(new InProcessTransport(psam));
    const atr = await reader.connect();
    await driver.connect();
    expect(await reader.readPurse()).to.include({ balance: 4_321, counter: 9 });
    await purchase(reader, driver, atr, 321);
    expect(await readFile(cardPath, "utf8")).to.equal(text);
    expect(await readState<CardFile>(cardPath)).to.include({ balance: 4_000, counter: 10 });
    await Promise.all([card.close(), psam.close()]);
  });

  it("a card written again whole (personalised anew at the same path) is not changed by the old card's log", async () => {
    const { cardPath } = await purchases(issuer, dir, 2);
    expect(await lines(logPathOf(cardPath))).to.have.length(2);
    const again = await issuer.personaliseCard({ path: cardPath, currency: EUR, exponent: 2, initialValue: 777, maxBalance: 50_000, expiry: "2099-12-31" });
    expect(await readState(cardPath)).to.deep.equal(again);
    const card = await SoftwareCard.open(cardPath);
    const reader = new PurseReader(new InProcessTransport(card));
    await reader.connect();
    expect(await reader.readPurse()).to.include({ balance: 777, counter: 0 });
    await card.close();
  });

  it("a card opened twice in one process (the daemon's and a test's) shares one log: every debit counts, whichever instance made it", async () => {
    const cardPath = await makeCard(issuer, dir);
    const psam = await SoftwarePsam.open(await makePsam(issuer, dir));
    const driver = new PsamDriver(new InProcessTransport(psam));
    await driver.connect();
    const a = await SoftwareCard.open(cardPath);
    const b = await SoftwareCard.open(cardPath);
    const [ra, rb] = [new PurseReader(new InProcessTransport(a)), new PurseReader(new InProcessTransport(b))];
    const [atrA, atrB] = [await ra.connect(), await rb.connect()];
    await purchase(ra, driver, atrA, 100);
    await purchase(rb, driver, atrB, 200);
    await purchase(ra, driver, atrA, 300);
    expect((await rb.readPurse()).balance).to.equal(10_000 - 600);
    // A file written whole while open (an issuer's change) is what both go on from.
    await SoftwareCard.write(cardPath, { ...(await readState<CardFile>(cardPath)), balance: 5_000 });
    expect((await ra.readPurse()).balance).to.equal(5_000);
    await a.close();
    await purchase(rb, driver, atrB, 50);
    await b.close();
    await psam.close();
    expect(await readState<CardFile>(cardPath)).to.include({ balance: 4_950, counter: 4 });
    expect((await readState<CardFile>(cardPath)).log.map((e) => e.amount)).to.deep.equal([50, 300, 200, 100]);
  });

  it("refuses to save over another process's record or snapshot, rather than damage the file; opening again reads what it wrote", async () => {
    const one = { ...initial(), counter: 1 };
    const refused = async (log: StateLog<Model>, path: string) => {
      const e = await log.save({ ...one, counter: 99 }).then(
        () => undefined,
        (x: unknown) => x as Error,
      );
      expect(e).to.be.instanceOf(StateLogError);
      expect(e?.message).to.contain(path).and.to.contain("another process");
    };

    // Another process appends its own record (here a copy of the first: the log is damaged, and this process adds nothing to it).
    const a = join(dir, "a.json");
    await writeState(a, initial());
    const logA = await StateLog.open<Model>(a);
    await logA.save(one);
    const [first] = await lines(logPathOf(a));
    await appendFile(logPathOf(a), `${first}\n`);
    await refused(logA, a);
    expect(await lines(logPathOf(a))).to.deep.equal([first, first]);
    await logA.close();

    // Another process writes the snapshot anew (its compaction, or an issuer's tool).
    const b = join(dir, "b.json");
    await writeState(b, initial());
    let logB = await StateLog.open<Model>(b);
    await logB.save(one);
    const theirs = { ...one, counter: 7 };
    await writeJsonAtomic(b, { ...theirs, [SNAPSHOT_SEQ_FIELD]: 2 }, { private: true });
    await truncate(logPathOf(b), 0);
    await refused(logB, b);
    // This process opening the file again gets what is on disk, not its stale open log.
    logB = await StateLog.open<Model>(b);
    expect(logB.state).to.deep.equal(theirs);
    await logB.save({ ...theirs, counter: 8 });
    await logB.close();
    expect(await readState(b)).to.deep.equal({ ...theirs, counter: 8 });
  });

  it("the operator's audit reads a card's balance through its log, and writes nothing", async () => {
    const { cardPath } = await purchases(issuer, dir, 3);
    const before = [await readFile(cardPath), await readFile(logPathOf(cardPath))];
    const [atHand] = await readCardsAtHand([cardPath], join(dir, "issuer"));
    expect(Number(atHand!.balance.amountMinor)).to.equal(10_000 - 300);
    expect([await readFile(cardPath), await readFile(logPathOf(cardPath))]).to.deep.equal(before);
  });

  it(`a process killed at random while saving (compactions included) reopens to its last acknowledged save or the one after (${KILLS} kills)`, async function () {
    this.timeout(30_000 + KILLS * 10_000);
    const path = join(dir, "crash.json");
    await writeState(path, { format: 1, counter: 0, recent: [] } satisfies CrashState);
    let acknowledged = 0;
    for (let k = 0; k < KILLS; k++) {
      const child = spawn(process.execPath, ["--import", "tsx", join(import.meta.dirname, "..", "support", "state-log-child.ts"), path, String(KEPT)], {
        stdio: ["ignore", "pipe", "inherit"],
      });
      children.push(child);
      let out = "";
      const ended = new Promise<void>((resolve) => child.on("close", () => resolve()));
      child.stdout.on("data", (d: Buffer) => {
        out += d.toString();
      });
      // Kill once it has saved a while past where it started, at a moment of its own.
      const from = acknowledged;
      while (!out.split("\n").some((l) => Number(l) > from + 50 + k * 7)) {
        if (child.exitCode !== null) throw new Error(`the saving process ended by itself: ${out.slice(-200)}`);
        await new Promise((r) => setTimeout(r, 5));
      }
      child.kill("SIGKILL");
      await ended;
      acknowledged = Math.max(
        ...out
          .split("\n")
          .filter((l) => l !== "")
          .map(Number),
      );
      const s = await readState<CrashState>(path);
      expect(s.counter, `kill ${k}`).to.be.within(acknowledged, acknowledged + 1);
      const first = Math.max(1, s.counter - KEPT + 1);
      expect(s.recent).to.deep.equal(Array.from({ length: s.counter - first + 1 }, (_, i) => first + i));
      acknowledged = s.counter;
    }
  });
});

/** One purchase of `amount` from a card through a PSAM, as a terminal host and a client make it. */
async function purchase(reader: PurseReader, driver: PsamDriver, atr: Buffer, amount: number): Promise<void> {
  const init = await reader.initializeForPurchase();
  const draw = { amount, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" };
  const issued = await driver.issueDebitCommand({ cardAtr: atr, initializeResponse: init.raw, draw, returnExpectedSignature: false });
  await driver.verifyDebit(issued.psamCounter, (await reader.debit(issued.debitCommand)).raw);
}

/** A card (EUR 100.00) and a PSAM after `n` purchases of EUR 1.00, both closed again. */
async function purchases(issuer: Issuer, dir: string, n: number): Promise<{ cardPath: string; psamPath: string }> {
  const cardPath = await makeCard(issuer, dir, { name: `c-${randomUUID()}` });
  const psamPath = await makePsam(issuer, dir, { name: `p-${randomUUID()}` });
  const card = await SoftwareCard.open(cardPath);
  const psam = await SoftwarePsam.open(psamPath);
  const reader = new PurseReader(new InProcessTransport(card));
  const driver = new PsamDriver(new InProcessTransport(psam));
  const atr = await reader.connect();
  await driver.connect();
  for (let i = 0; i < n; i++) await purchase(reader, driver, atr, 100);
  await Promise.all([card.close(), psam.close()]);
  return { cardPath, psamPath };
}
