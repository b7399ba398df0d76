// The clearing benchmark (issue #11, item 8): records cleared per second by
// the clearing service, its own process with TLS as installed, for batches of
// 1, 100 and 1,000 records sent by one terminal host at a time and by
// several at once; beside the purchases per second of the stack suite, so
// that clearing is shown never to be the bottleneck.
//
// The records are made in this process, not by cards: a card makes one
// record per purchase, and the point is to measure clearing. Each is
// genuine all the same: its card signature is made with the card's own
// purchase key (as the issuer personalised it) over a fresh session, its
// record MAC and its batch's MAC with the PSAM's batch key (as the issuer
// provisioned it), by the functions the card and the PSAM use. Clearing
// checks every one of them as it would a terminal host's.

import { streamOf } from "../lib/streams.js";
import { randomBytes, randomUUID } from "node:crypto";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type { CardFile } from "../client/card/software-card.js";
import {
  BatchStatus,
  batchStatusToJSON,
  ClearingServiceDefinition,
  type SubmitBatchRequest,
  type SubmitBatchResponse,
} from "../gen/netpurse/clearing/v1/clearing.js";
import { deriveSessionKey } from "../lib/crypto/keys.js";
import { readJson } from "../lib/files.js";
import { clientFactory, openChannel } from "../lib/grpc/client.js";
import { hexOf, psamId as toPsamId } from "../lib/ids.js";
import { money } from "../lib/money.js";
import { pkiDirOf, Security } from "../lib/pki/security.js";
import { batchMac, batchRecordMac, type PsamBatchRecord } from "../lib/protocol/psam.js";
import { cardSignature, DebitResult } from "../lib/protocol/purse.js";
import { SoftwareClearingModule, type ClearingKeysFile } from "../services/clearing/security-module.js";
import { readPsamRegistry } from "../services/concentrator/psam-registry.js";
import { Issuer } from "../services/issuer/issuer.js";
import { Launcher, SCRIPTS } from "../services/network/launcher.js";
import { DEFAULT_DEMO, DEMO_SHOP, ensureDemoData, paths } from "../services/network/layout.js";
import { psamRegistryPath } from "../services/network/pki.js";
import { stopOnInterrupt } from "./interrupt.js";
import { ErrorTally, percentile, type Phases } from "./load.js";
import { logFindings, personaliseCardholderCards, PROCESS, SERVICE_ENV, type LogFindings } from "./network.js";
import { CpuSampler, machineCpu, peakMemoryMiB } from "./proc.js";
import { measurePurchases, SONG, type PurchaseResult } from "./purchases.js";
import { batchRecordMessage } from "../services/clearing/records.js";

export interface ClearingSettings {
  /** Records per batch; each size gets a run per number of terminal hosts. */
  batchSizes: number[];
  /** Terminal hosts submitting at once, each one batch at a time on its own channel. */
  terminalHosts: number[];
  /** Warm-up, and the measuring window: each terminal host submits until it has passed. */
  phases: Phases;
  keepData: boolean;
}

export interface ClearingRun {
  recordsPerBatch: number;
  terminalHosts: number;
  /** The warm-up: batches submitted before the window, to start the process's code paths and size the window's work. */
  warmup: { batches: number; records: number; ms: number };
  /** Batches and records submitted inside the window, every one acknowledged. */
  batches: number;
  records: number;
  /** From the first submission's start to the last acknowledgement. */
  seconds: number;
  recordsPerSecond: number;
  batchesPerSecond: number;
  /** One SubmitBatch, from the call's start to its acknowledgement. */
  p50Ms: number;
  p99Ms: number;
  /** CPU during the window, % of one core: clearing and this process (the terminal hosts' side). */
  cpuPercent: Record<string, number>;
  /** The whole machine's busy CPU during the window, % of one core. */
  machineCpuPercent?: number;
  /** Clearing's CPU time (utime + stime) over the window per record cleared, ms. */
  clearingCpuMsPerRecord: number;
  /** Clearing's peak resident memory (VmHWM) since its start, this run's process, MiB. */
  clearingPeakMemoryMiB?: number;
  /** How fast this process made the window's records (before the window, not timed). */
  recordsMadePerSecond: number;
  /** What clearing's own reports say afterwards: purchases posted against the records acknowledged, and the audit. */
  settled: { purchasesPosted: number; recordsAcknowledged: number; auditOk: boolean; failedChecks: string[] };
  /** Submissions that failed or were not ACCEPTED with every record posted, and settlement or audit disagreements, warm-up included. */
  errors: number;
  errorMessages: Record<string, number>;
}

/** The purchases per second the records are compared with. */
export interface StackFigure {
  purchasesPerSecond: number;
  psams: number;
  cardholders: number;
  tls: boolean;
  /** "stack suite": the best of this run's stack suite; "own run": a short stack configuration this suite ran itself. */
  from: "stack suite" | "own run";
  /** The own run, in full. */
  run?: PurchaseResult;
}

export interface ClearingReport {
  batchSizes: number[];
  terminalHosts: number[];
  phases: Phases;
  /** Cards whose records are made, round robin. */
  cards: number;
  runs: ClearingRun[];
  stack: StackFigure;
  /** Clearing's log over every run, shutdown included. */
  serviceLogs: LogFindings;
  dataDir?: string;
}

export const CLEARING_PROCESS = "clearing";

/** Cards the records come from: each pays the song many times, so a card's counter and balance move as a real card's do. */
const CARDS = 128;
/** The stack configuration measured when the stack suite did not run: the middle of its default grid. */
const OWN_STACK = { psams: 4, cardholders: 8 };
/** A run's window holds at most this many records, whatever the warm-up's pace: they are made ahead, in memory. */
const MAX_RECORDS_PER_RUN = 250_000;
/** A batch of 1,000 records on a busy machine takes a second or two; a minute means something is stuck. */
const SUBMIT_DEADLINE_MS = 60_000;
const PAUSE_AFTER_ERROR_MS = 100;

const terminalIdOf = (i: number) => `terminal-${i + 1}`;

/** A card as the record maker drives it: its own purchase key, counter and balance. */
interface CardState {
  purseId: Buffer;
  keyVersion: number;
  purchaseKey: Buffer;
  counter: number;
  balance: number;
}

/** A terminal host's PSAM as the record maker drives it: its batch key, counter and next batch number. */
interface PsamState {
  psamId: Buffer;
  batchKey: Buffer;
  psamCounter: number;
  batchNumber: number;
}

/** A closed batch, as a terminal host streams it: its records, then its trailer. */
interface MadeBatch {
  batchNumber: number;
  count: number;
  messages: SubmitBatchRequest[];
  /** The first record, kept for the self-check. */
  first: PsamBatchRecord;
}

/**
 * Makes genuine batch records fast: what a card and a PSAM would compute for
 * each debit, without the APDUs, files and waiting around them.
 */
class RecordMaker {
  private next = 0;

  constructor(
    private readonly cards: CardState[],
    private readonly merchant: string,
    private readonly price: { amount: number; currency: number },
  ) {}

  /** The PSAM's next closed batch of `size` debits, each by the next card in turn. */
  batch(psam: PsamState, size: number): MadeBatch {
    const batchNumber = psam.batchNumber++;
    const first = this.record(psam, batchNumber);
    const messages: SubmitBatchRequest[] = [{ item: { $case: "record", value: batchRecordMessage(first) } }];
    for (let i = 1; i < size; i++) messages.push({ item: { $case: "record", value: batchRecordMessage(this.record(psam, batchNumber)) } });
    const { amount, currency } = this.price;
    const summary = { psamId: psam.psamId, batchNumber, count: size, total: amount * size, currency };
    messages.push({
      item: {
        $case: "trailer",
        value: {
          psamId: toPsamId(psam.psamId.toString("hex")),
          batchNumber,
          count: size,
          total: money(summary.total, currency, 0),
          batchMac: batchMac(psam.batchKey, summary),
          closedAt: new Date(),
        },
      },
    });
    return { batchNumber, count: size, messages, first };
  }

  /** One debit: the card's session and signature, then the PSAM's record MAC. */
  private record(psam: PsamState, batchNumber: number): PsamBatchRecord {
    const card = this.cards[this.next++ % this.cards.length]!;
    const { amount, currency } = this.price;
    if (card.balance < amount) throw new Error(`card ${card.purseId.toString("hex")} has paid all it held: make the runs shorter or the cards more`);
    const session = { purseId: card.purseId, cardCounter: card.counter, challenge: randomBytes(8) };
    const psamCounter = psam.psamCounter++;
    const debit = { amount, currency, psamId: psam.psamId, psamCounter, dateTime: Math.floor(Date.now() / 1000), transactionRef: randomUUID() };
    const sessionKey = deriveSessionKey(card.purchaseKey, {
      cardCounter: session.cardCounter,
      securityModuleId: psam.psamId,
      securityModuleCounter: psamCounter,
      challenge: session.challenge,
    });
    const answer = { result: DebitResult.DEBITED, counter: card.counter + 1, balance: card.balance - amount };
    card.counter = answer.counter;
    card.balance = answer.balance;
    const fields = {
      psamCounter,
      purseId: card.purseId,
      keyVersion: card.keyVersion,
      sessionCounter: session.cardCounter,
      challenge: session.challenge,
      cardCounter: answer.counter,
      balanceAfter: answer.balance,
      amount,
      currency,
      dateTime: debit.dateTime,
      transactionRef: debit.transactionRef,
      merchantId: this.merchant,
      cardSignature: cardSignature(sessionKey, session, debit, answer),
    };
    return { ...fields, recordMac: batchRecordMac(psam.batchKey, psam.psamId, batchNumber, fields) };
  }
}

type ClearingClient = Client<typeof ClearingServiceDefinition, DeadlineOptions>;

/** One terminal host: its identity's channel to clearing and its PSAM. */
interface TerminalHost {
  terminalId: string;
  security: Security;
  psam: { psamId: Buffer; batchKey: Buffer };
}

/** The data folder, the cards and PSAMs of the records, and the clearing process, restarted with an empty ledger for each run. */
class ClearingBench {
  readonly launcher: Launcher;
  private stopped = false;

  private constructor(
    readonly dir: string,
    readonly hosts: TerminalHost[],
    private readonly cards: CardFile[],
    readonly operator: Security,
    readonly keys: ClearingKeysFile,
  ) {
    this.launcher = new Launcher(this.logDir, { env: SERVICE_ENV });
  }

  get logDir(): string {
    return join(this.dir, "logs");
  }

  /**
   * A data folder as installed (issuer keys, clearing's keys and merchant
   * registry, the PKI), with `hosts` terminal hosts of one PSAM each, and
   * the cards.
   */
  static async prepare(hosts: number): Promise<ClearingBench> {
    const dir = await mkdtemp(join(tmpdir(), "netpurse-bench-clearing-"));
    const terminals = Array.from({ length: hosts }, (_, i) => ({ id: terminalIdOf(i), psams: 1 }));
    await ensureDemoData(dir, { terminals, shops: [DEMO_SHOP], card: DEFAULT_DEMO.card });
    const cards = await Promise.all((await personaliseCardholderCards(dir, CARDS)).map((p) => readJson<CardFile>(p)));
    const registry = await readPsamRegistry(psamRegistryPath(dir));
    const issuer = await Issuer.open(paths(dir).issuer);
    const pki = pkiDirOf(dir);
    try {
      const terminalHosts = await Promise.all(
        terminals.map(async (t): Promise<TerminalHost> => {
          const psamHex = [...registry].find(([, terminal]) => terminal === t.id)?.[0];
          if (!psamHex) throw new Error(`the PSAM registry names no PSAM of ${t.id}`);
          return {
            terminalId: t.id,
            security: await Security.forService(pki, { kind: "terminal", id: t.id }),
            psam: { psamId: Buffer.from(psamHex, "hex"), batchKey: issuer.psamBatchKey(psamHex) },
          };
        }),
      );
      const operator = await Security.forService(pki, { kind: "operator", id: "operator" });
      const keys = await readJson<ClearingKeysFile>(join(paths(dir).clearing, "keys.json"));
      return new ClearingBench(dir, terminalHosts, cards, operator, keys);
    } finally {
      await issuer.close();
    }
  }

  /**
   * A record maker, and the first `hosts` terminal hosts each with its
   * PSAM's state; cards and PSAMs start where the issuer left them: each
   * run's ledger is empty, so each run starts them afresh.
   */
  maker(hosts: number): { maker: RecordMaker; hosts: { host: TerminalHost; psam: PsamState }[] } {
    const cards = this.cards.map((c) => ({
      purseId: Buffer.from(c.purseId, "hex"),
      keyVersion: c.keyVersion,
      purchaseKey: Buffer.from(c.keys.purchase, "hex"),
      counter: c.counter,
      balance: c.balance,
    }));
    return {
      maker: new RecordMaker(cards, DEMO_SHOP.merchantId, { amount: SONG.priceMinor, currency: DEMO_SHOP.currency }),
      hosts: this.hosts.slice(0, hosts).map((host) => ({ host, psam: { ...host.psam, psamCounter: 1, batchNumber: 1 } })),
    };
  }

  /** Starts clearing on an empty ledger (its keys and merchant registry stay). */
  async startClearing(): Promise<{ address: string; pid: number }> {
    await this.launcher.stop(CLEARING_PROCESS);
    const clearingDir = paths(this.dir).clearing;
    for (const f of await readdir(clearingDir)) if (f.startsWith("clearing.db")) await rm(join(clearingDir, f));
    const started = await this.launcher.start(CLEARING_PROCESS, SCRIPTS.clearing, ["--listen", "127.0.0.1:0", "--data", this.dir]);
    return { address: started.address, pid: started.child.pid! };
  }

  stop = async (): Promise<void> => {
    if (this.stopped) return;
    this.stopped = true;
    await this.launcher.stopAll();
  };
}

/**
 * Checks, in this process, that the made records are what clearing pays:
 * a record verifies under clearing's security module, and the same record
 * with a changed signature does not. Guards the benchmark against measuring
 * a clearing that quarantines everything, or a maker that fools itself.
 */
function selfCheck(keys: ClearingKeysFile, psamId: Buffer, batchNumber: number, r: PsamBatchRecord): void {
  const module = SoftwareClearingModule.fromKeys(keys);
  if (!module.verifyRecordMac(psamId, batchNumber, r)) throw new Error("a made record's MAC does not verify under clearing's keys");
  if (module.verifyCardSignature(psamId, r) !== "OK") throw new Error("a made record's card signature does not verify under clearing's keys");
  const forged = { ...r, cardSignature: Buffer.from(r.cardSignature.map((b) => b ^ 0xff)) };
  if (module.verifyCardSignature(psamId, forged) === "OK") throw new Error("a forged card signature verifies: the self-check proves nothing");
}

/** Submits one batch; throws unless clearing accepted it with every record posted. Resolves to its latency, ms, and the settlement day it was posted to. */
async function submit(client: ClearingClient, psamHex: string, b: MadeBatch): Promise<{ ms: number; day: string }> {
  const started = performance.now();
  const ack: SubmitBatchResponse = await client.submitBatch(streamOf(b.messages), { deadline: SUBMIT_DEADLINE_MS });
  const ms = performance.now() - started;
  const whose = `batch ${b.batchNumber} of PSAM ${psamHex}`;
  if (hexOf(ack.psamId?.value) !== psamHex || ack.batchNumber !== b.batchNumber) {
    throw new Error(`clearing acknowledged batch ${ack.batchNumber} of PSAM ${hexOf(ack.psamId?.value)} for ${whose}`);
  }
  if (ack.status !== BatchStatus.BATCH_STATUS_ACCEPTED || ack.posted !== b.count || ack.quarantined !== 0 || ack.duplicate) {
    throw new Error(
      `${whose}: ${batchStatusToJSON(ack.status)}, ${ack.posted} of ${b.count} records posted, ${ack.quarantined} quarantined${ack.duplicate ? ", counted as a duplicate" : ""}`,
    );
  }
  return { ms, day: ack.settlementDay };
}

const label = (size: number, hosts: number) => `clearing, ${size} record${size === 1 ? "" : "s"} per batch, ${hosts} terminal host${hosts === 1 ? "" : "s"}`;

/** One run: a fresh clearing, a warm-up, the window's batches made ahead, then submitted; then clearing's own reports checked. */
async function measureRun(bench: ClearingBench, size: number, hosts: number, phases: Phases): Promise<ClearingRun> {
  const name = label(size, hosts);
  const errors = new ErrorTally(name);
  const clearing = await bench.startClearing();
  const made = bench.maker(hosts);
  const maker = made.maker;
  const terminals = made.hosts.map(({ host, psam }) => {
    const channel = openChannel(clearing.address, host.security.channel({ kind: "clearing" }));
    return { psam, psamHex: psam.psamId.toString("hex"), channel, client: clientFactory().create(ClearingServiceDefinition, channel) };
  });
  const operatorChannel = openChannel(clearing.address, bench.operator.channel({ kind: "clearing" }));
  try {
    const operator = clientFactory().create(ClearingServiceDefinition, operatorChannel);
    let acknowledged = 0;
    const days = new Set<string>();
    const submitted = async (t: (typeof terminals)[number], b: MadeBatch): Promise<number | undefined> => {
      try {
        const { ms, day } = await submit(t.client, t.psamHex, b);
        acknowledged += b.count;
        days.add(day);
        return ms;
      } catch (e) {
        errors.add(e);
        await sleep(PAUSE_AFTER_ERROR_MS);
        return undefined;
      }
    };
    const [firstHost] = terminals;
    if (!firstHost) throw new Error("a run needs at least one terminal host");
    const first = maker.batch(firstHost.psam, size);
    selfCheck(bench.keys, firstHost.psam.psamId, first.batchNumber, first.first);

    // Warm-up: batches made as they go, each terminal host at least one, until the warm-up has passed.
    process.stderr.write(`[${name}] warm-up, ${phases.warmupMs / 1000} s\n`);
    const warmStart = performance.now();
    const warmEnds: number[] = [];
    await Promise.all(
      terminals.map(async (t) => {
        let b = t === firstHost ? first : maker.batch(t.psam, size);
        for (;;) {
          await submitted(t, b);
          warmEnds.push(performance.now());
          if (performance.now() - warmStart >= phases.warmupMs) return;
          b = maker.batch(t.psam, size);
        }
      }),
    );
    const warmEnd = performance.now();
    const warmup = { batches: warmEnds.length, records: warmEnds.length * size, ms: warmEnd - warmStart };

    // Batches made ahead for the window: twice the warm-up's pace for its length (the pace of a shared machine
    // moves), each terminal host at least two. The pace is the warm-up's second half's, when batches ended there:
    // the first calls carry the TLS handshakes and cold code.
    const half = warmStart + (warmEnd - warmStart) / 2;
    const late = warmEnds.filter((t) => t >= half).length;
    const pace = late > 0 ? (late * size) / ((warmEnd - half) / 1000) : warmup.records / (warmup.ms / 1000);
    const wanted = Math.min(MAX_RECORDS_PER_RUN, (2 * pace * phases.measureMs) / 1000);
    const perHost = Math.max(2, Math.ceil(wanted / size / hosts));
    const madeStart = performance.now();
    const work = terminals.map((t) => ({ t, batches: Array.from({ length: perHost }, () => maker.batch(t.psam, size)) }));
    const recordsMadePerSecond = (perHost * hosts * size) / ((performance.now() - madeStart) / 1000);
    process.stderr.write(`[${name}] measuring for ${phases.measureMs / 1000} s, ${perHost * hosts} batches (${perHost * hosts * size} records) made ready\n`);

    const cpu = new CpuSampler(
      () =>
        new Map([
          [CLEARING_PROCESS, clearing.pid],
          [PROCESS.bench, process.pid],
        ]),
    );
    const latencies: number[] = [];
    let batches = 0;
    cpu.opened();
    const windowStart = performance.now();
    // Each terminal host submits until the window's time is up (or its batches run out); the batch in flight then is waited for and counted.
    await Promise.all(
      work.map(async ({ t, batches: mine }) => {
        for (const b of mine) {
          if (performance.now() - windowStart >= phases.measureMs) return;
          const ms = await submitted(t, b);
          if (ms === undefined) continue;
          latencies.push(ms);
          batches++;
        }
      }),
    );
    const seconds = (performance.now() - windowStart) / 1000;
    cpu.closed();
    const clearingPeakMemoryMiB = peakMemoryMiB(clearing.pid);
    const cpuPercent = cpu.percent();
    latencies.sort((a, b) => a - b);
    const records = batches * size;
    const recordsPerSecond = records / seconds;

    let settled: ClearingRun["settled"];
    try {
      settled = await settlementCheck(operator, acknowledged, days);
      if (settled.purchasesPosted !== acknowledged) {
        errors.add(new Error(`clearing's settlement shows ${settled.purchasesPosted} purchases posted for ${acknowledged} records acknowledged`));
      }
      if (!settled.auditOk) errors.add(new Error(`clearing's audit fails: ${settled.failedChecks.join("; ")}`));
    } catch (e) {
      // The run's figures stand; that clearing could not show what it posted is an error of the run.
      errors.add(e);
      settled = { purchasesPosted: 0, recordsAcknowledged: acknowledged, auditOk: false, failedChecks: [`not read: ${(e as Error).message}`] };
    }
    const clearingCpu = cpuPercent[CLEARING_PROCESS];
    const run: ClearingRun = {
      recordsPerBatch: size,
      terminalHosts: hosts,
      warmup,
      batches,
      records,
      seconds,
      recordsPerSecond,
      batchesPerSecond: batches / seconds,
      p50Ms: percentile(latencies, 0.5),
      p99Ms: percentile(latencies, 0.99),
      cpuPercent,
      ...machineCpu(cpu),
      // % of one core over a second is 10 ms of CPU per second.
      clearingCpuMsPerRecord: clearingCpu !== undefined && recordsPerSecond > 0 ? (clearingCpu * 10) / recordsPerSecond : NaN,
      ...(clearingPeakMemoryMiB === undefined ? {} : { clearingPeakMemoryMiB }),
      recordsMadePerSecond,
      settled,
      errors: errors.count,
      errorMessages: errors.byMessage,
    };
    process.stderr.write(`[${name}] ${recordsPerSecond.toFixed(0)} records/s, ${run.clearingCpuMsPerRecord.toFixed(3)} ms of clearing CPU per record\n`);
    return run;
  } finally {
    for (const t of terminals) t.channel.close();
    operatorChannel.close();
  }
}

/** Clearing's settlement of the day (the days, if the run crossed midnight UTC) and its audit, as an operator reads them. */
async function settlementCheck(operator: ClearingClient, acknowledged: number, days: Set<string>): Promise<ClearingRun["settled"]> {
  if (days.size === 0) days.add("");
  let purchasesPosted = 0;
  for (const day of days) purchasesPosted += (await operator.getSettlement({ day }, { deadline: SUBMIT_DEADLINE_MS })).settlement?.purchases ?? 0;
  const audit = await operator.runAudit({ cards: [] }, { deadline: SUBMIT_DEADLINE_MS });
  return {
    purchasesPosted,
    recordsAcknowledged: acknowledged,
    auditOk: audit.ok,
    failedChecks: audit.checks.filter((c) => !c.ok).map((c) => `${c.name}: ${c.detail}`),
  };
}

/** The best purchases/s of the stack suite's runs (TLS on, as clearing runs, when there are such), else a short stack run of its own. */
async function stackFigure(stack: PurchaseResult[], phases: Phases, keepData: boolean): Promise<StackFigure> {
  const candidates = stack.some((p) => p.tls) ? stack.filter((p) => p.tls) : stack;
  const best = candidates.reduce<PurchaseResult | undefined>((b, p) => (!b || p.perSecond > b.perSecond ? p : b), undefined);
  if (best) return { purchasesPerSecond: best.perSecond, psams: best.psams, cardholders: best.cardholders, tls: best.tls, from: "stack suite" };
  process.stderr.write(`[clearing] the stack suite did not run: measuring ${OWN_STACK.psams} PSAMs × ${OWN_STACK.cardholders} cardholders for comparison\n`);
  const run = await measurePurchases(OWN_STACK, phases, { keepData, tls: true });
  return { purchasesPerSecond: run.perSecond, psams: run.psams, cardholders: run.cardholders, tls: true, from: "own run", run };
}

/** The clearing suite: each batch size with each number of terminal hosts, then the stack's purchases/s to compare with. */
export async function measureClearing(s: ClearingSettings, stack: PurchaseResult[]): Promise<ClearingReport> {
  const mostHosts = Math.max(...s.terminalHosts);
  process.stderr.write(
    `netpurse bench, clearing: batches of ${s.batchSizes.join(", ")} records, from ${s.terminalHosts.join(" and ")} terminal hosts at once (${s.batchSizes.length * s.terminalHosts.length} runs, each on a fresh ledger), about ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of submissions each\n`,
  );
  process.stderr.write("[clearing] setting up a data folder: issuer, PSAMs, cards, certificates\n");
  const bench = await ClearingBench.prepare(mostHosts);
  const tidy = async () => {
    await bench.stop();
    if (!s.keepData) await rm(bench.dir, { recursive: true, force: true });
  };
  const forget = stopOnInterrupt(tidy);
  try {
    const runs: ClearingRun[] = [];
    for (const size of s.batchSizes) {
      for (const hosts of s.terminalHosts) runs.push(await measureRun(bench, size, hosts, s.phases));
    }
    await bench.stop();
    const serviceLogs = await logFindings(bench.logDir);
    return {
      batchSizes: s.batchSizes,
      terminalHosts: s.terminalHosts,
      phases: s.phases,
      cards: CARDS,
      runs,
      stack: await stackFigure(stack, s.phases, s.keepData),
      serviceLogs,
      ...(s.keepData ? { dataDir: bench.dir } : {}),
    };
  } finally {
    forget();
    await tidy();
  }
}

/** Failures of the suite: submissions, settlement and audit disagreements, and the stack run of its own. */
export function clearingErrors(r: ClearingReport): number {
  return r.runs.reduce((n, run) => n + run.errors, 0) + (r.stack.run?.errors ?? 0);
}
