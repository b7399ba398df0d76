// What the software PSAM's persistence costs per DRAW AMOUNT and VERIFY
// DEBIT: the state file rewritten whole (writeJsonAtomic: pretty JSON, temp
// file, fsync, rename, fsync of the folder; how it was before issue #13)
// against the state log (lib/apdu/state-log.ts: one record appended, one
// fdatasync, a compaction now and then). The PSAM holds 1,024 settled
// debits and a batch that fills to its 256 records and is closed, as one in
// service does; each save makes the change the PSAM's own code makes.
// Usage: node --import tsx bench/state-log.ts [--purchases N] [--dir DIR]

import { randomBytes, randomUUID } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { StateLog, writeState } from "../lib/apdu/state-log.js";
import { writeJsonAtomic } from "../lib/files.js";
import { processStats } from "../lib/stats.js";
import type { BatchRecordState, PendingDebitState, PsamFile, SettledDebit } from "../services/terminal/psam/software-psam.js";

const { values } = parseArgs({ options: { purchases: { type: "string", default: "1000" }, dir: { type: "string" } } });
const PURCHASES = Number(values.purchases);
const hex = (bytes: number) => randomBytes(bytes).toString("hex");

/** A PSAM in service: 1,024 settled debits, an empty batch. */
function psamInService(): PsamFile {
  const settled: SettledDebit[] = Array.from({ length: 1024 }, (_, i) => ({
    psamCounter: i + 1,
    outcome: "recorded",
    batchNumber: 1 + Math.floor(i / 256),
    cardSignature: hex(8),
    recordMac: hex(8),
    transactionRef: randomUUID(),
    amount: 1_000 + i,
    currency: 978,
    cardResult: 0,
  }));
  return {
    format: 1,
    psamId: hex(4),
    currency: 978,
    purchaseKeys: { "1": hex(16), "2": hex(16) },
    batchKey: hex(16),
    verdictKey: hex(16),
    batchCapacity: 256,
    counter: 1024,
    batchNumber: 5,
    batch: [],
    pending: [],
    blockedPurses: [],
    settled,
  };
}

/** DRAW AMOUNT's change, then VERIFY DEBIT's (and CLOSE BATCH's when the batch is full), as software-psam.ts makes them. */
function* purchases(): Generator<{ what: "draw" | "verify" | "close"; next: (s: PsamFile) => PsamFile }> {
  for (let i = 0; i < PURCHASES; i++) {
    yield {
      what: "draw",
      next: (s) => {
        const p: PendingDebitState = {
          psamCounter: s.counter + 1,
          purseId: hex(8),
          keyVersion: 1,
          cardCounter: i,
          challenge: hex(8),
          balanceBefore: 50_000,
          amount: 1_250,
          currency: 978,
          dateTime: 1_700_000_000 + i,
          transactionRef: randomUUID(),
          merchantId: "demo-shop",
        };
        return { ...s, counter: p.psamCounter, pending: [...s.pending, p] };
      },
    };
    yield {
      what: "verify",
      next: (s) => {
        const p = s.pending[0]!;
        const stored: BatchRecordState = {
          ...p,
          sessionCounter: p.cardCounter,
          cardCounter: p.cardCounter + 1,
          balanceAfter: p.balanceBefore - p.amount,
          cardSignature: hex(8),
          recordMac: hex(8),
        };
        const d: SettledDebit = {
          psamCounter: p.psamCounter,
          outcome: "recorded",
          batchNumber: s.batchNumber,
          cardSignature: stored.cardSignature,
          recordMac: stored.recordMac,
          transactionRef: p.transactionRef,
          amount: p.amount,
          currency: p.currency,
          cardResult: 0,
        };
        return { ...s, pending: s.pending.filter((x) => x !== p), batch: [...s.batch, stored], settled: [...s.settled, d].slice(-1024) };
      },
    };
    yield {
      what: "close",
      next: (s) =>
        s.batch.length < s.batchCapacity
          ? s
          : { ...s, batchNumber: s.batchNumber + 1, batch: [], lastClosed: { batchNumber: s.batchNumber, count: s.batch.length, total: 0, batchMac: hex(8) } },
    };
  }
}

interface Figures {
  saves: number;
  msPerSave: number;
  p50: number;
  p99: number;
  max: number;
  cpuMsPerSave: number;
  fsyncsPerSave: number;
}

async function measure(name: string, save: (s: PsamFile) => Promise<void>, start: PsamFile): Promise<Figures> {
  let s = start;
  const times: number[] = [];
  const fsyncs0 = processStats().fsyncs;
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  for (const step of purchases()) {
    const next = step.next(s);
    if (next === s) continue;
    const t = performance.now();
    await save(next);
    times.push(performance.now() - t);
    s = next;
  }
  const wall = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  times.sort((a, b) => a - b);
  const at = (q: number) => times[Math.min(times.length - 1, Math.floor(q * times.length))]!;
  const f: Figures = {
    saves: times.length,
    msPerSave: times.reduce((a, b) => a + b, 0) / times.length,
    p50: at(0.5),
    p99: at(0.99),
    max: times.at(-1)!,
    cpuMsPerSave: (cpu.user + cpu.system) / 1000 / times.length,
    fsyncsPerSave: (processStats().fsyncs - fsyncs0) / times.length,
  };
  console.log(
    `${name.padEnd(28)} ${String(f.saves).padStart(5)} saves  ${f.msPerSave.toFixed(3)} ms/save (p50 ${f.p50.toFixed(3)}, p99 ${f.p99.toFixed(3)}, max ${f.max.toFixed(1)})  ` +
      `CPU ${f.cpuMsPerSave.toFixed(3)} ms/save  ${f.fsyncsPerSave.toFixed(3)} syncs/save  (${(wall / 1000).toFixed(1)} s)`,
  );
  return f;
}

const dir = values.dir ?? (await mkdtemp(join(tmpdir(), "netpurse-bench-state-log-")));
try {
  const start = psamInService();
  const size = Buffer.byteLength(JSON.stringify(start, null, 2));
  console.log(
    `PSAM state file: ${(size / 1024).toFixed(0)} KB (1,024 settled debits, empty batch); ${PURCHASES} purchases (DRAW + VERIFY, CLOSE BATCH every 256)`,
  );

  // The changes themselves (random ids, new arrays), saved nowhere: what both rows below include besides persistence.
  await measure("baseline: no save", async () => undefined, start);

  const oldPath = join(dir, "old.psam.json");
  await writeJsonAtomic(oldPath, start, { private: true });
  const old = await measure("old: rewrite whole", (s) => writeJsonAtomic(oldPath, s, { private: true }), start);

  const newPath = join(dir, "new.psam.json");
  await writeState(newPath, start);
  const log = await StateLog.open<PsamFile>(newPath);
  const now = await measure("new: state log", (s) => log.save(s), start);
  await log.close();

  console.log(
    `per save: ${(old.msPerSave / now.msPerSave).toFixed(1)}x less time, ${(old.cpuMsPerSave / now.cpuMsPerSave).toFixed(1)}x less CPU, ` +
      `${old.fsyncsPerSave.toFixed(2)} -> ${now.fsyncsPerSave.toFixed(2)} syncs`,
  );
} finally {
  if (!values.dir) await rm(dir, { recursive: true, force: true });
}
