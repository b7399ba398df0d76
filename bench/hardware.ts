// The hardware suite: what real readers and a real security module cost,
// each against the software path, in one run on one machine. Three parts:
//
// - APDU round trip: measurePcsc (bench/pcsc.ts): READ PURSE through
//   pcsclite → pcscd → vpcd → emulator, with the shim and with the stock
//   driver, against the card application in-process.
// - Purchases: the same network (one terminal host, TLS on) run twice per
//   mode, once as the stack suite lays it out (the cardholder's software card
//   in this process, the PSAM files in the terminal host) and once with the
//   card and every PSAM in emulated PC/SC readers (an emulator child, a
//   pcscd of our own, the client daemon --pcsc, the terminal host
//   --psam-readers, the cardholder here through the PC/SC transport). One
//   cardholder pays N purchases in a row: payOffer latency, the card's APDUs
//   per purchase (counted at the cardholder's transport) and the PSAMs'
//   (counted at the emulated PSAMs, bench/apdu-counting-emulator.ts).
// - S2 signings: measureHsm (bench/hsm.ts), SoftHSM2 through PKCS#11
//   against the software module.
//
// A part that cannot be set up here (no pcscd, no SoftHSM2, another pcscd
// running) says why in the report; the others still run.

import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import { payOffer, type MerchantClient, type PurchaseContext } from "../client/purchase.js";
import { PurseReader } from "../client/card/purse-reader.js";
import { SoftwareCard } from "../client/card/software-card.js";
import { InProcessTransport, type CardTransport } from "../lib/apdu/transport.js";
import { loadPkcs11Binding } from "../lib/hsm/pkcs11.js";
import { findSoftHsmModule } from "../lib/hsm/softhsm.js";
import { PcscReaders } from "../lib/pcsc/readers.js";
import { PcscTransport } from "../lib/pcsc/transport.js";
import { readerSlots, type ReaderSlot } from "../services/emulator/emulator.js";
import { EmulatorControl } from "../services/emulator/emulator-process.js";
import { DEFAULT_PORT_BASE, otherPcscd, Pcscd, virtualReaders } from "../services/emulator/pcscd.js";
import type { ShopFile } from "../services/merchant/shop.js";
import { paths } from "../services/network/layout.js";
import type { ApduCount, ApduCountsReply, ApduCountsRequest } from "./apdu-counting-emulator.js";
import { measureHsm, type HsmReport } from "./hsm.js";
import { stopOnInterrupt } from "./interrupt.js";
import { ErrorTally, percentile } from "./load.js";
import { BenchNetwork, modeOf, MODES, shopForMode, TERMINAL_ID, type LogFindings } from "./network.js";
import { measurePcsc, pcscBenchUnavailable, type PcscReport, type PcscSettings } from "./pcsc.js";
import { CpuSampler, machineCpu } from "./proc.js";
import { orderSong } from "./purchases.js";

export interface HardwareSettings {
  /** Purchases timed per run, after the warm-up. */
  purchases: number;
  /** Purchases before those, not timed (channels, JIT, the card's first reset). */
  warmupPurchases: number;
  /** PSAMs on the terminal host. */
  psams: number;
  /** Confirmation modes, each a pair of runs (in-process, then PC/SC). */
  modes: string[];
  apdu: PcscSettings;
  /** S2 signings per path of the HSM part. */
  signings: number;
  keepData: boolean;
}

export const HARDWARE_DEFAULTS = { purchases: 50, warmupPurchases: 5, psams: 2, modes: MODES, signings: 2_000 };

/** How long each run's processes are watched idle, before the warm-up: what the readers cost with no purchase. */
const IDLE_MS = 2_000;

/** A part measured, or why not: it cannot be set up on this machine, or it failed on the way. */
export type Part<T> = { measured: T } | { unavailable: string } | { failed: string };

export type Layout = "in-process" | "PC/SC";

/** Command APDUs per purchase, in all and by INS (hex), and card resets per purchase. */
export interface ApdusPerPurchase {
  apdus: number;
  byIns: Record<string, number>;
  resets: number;
}

export interface HardwarePurchaseRun {
  psams: number;
  tls: boolean;
  warmupPurchases: number;
  /** Timed purchases that succeeded. */
  purchases: number;
  p50Ms: number;
  p99Ms: number;
  meanMs: number;
  /** Failed purchases, warm-up included. */
  errors: number;
  errorMessages: Record<string, number>;
  /** The cardholder's card, counted at its transport in this process. */
  card: ApdusPerPurchase;
  /** The PSAMs together, counted where they run (PC/SC: the emulator); undefined in-process, where the terminal host's PSAMs cannot be reached. */
  psam?: ApdusPerPurchase;
  /** The cardholder's card counted at the emulator, to check the transport's count (PC/SC only). */
  cardAtEmulator?: ApdusPerPurchase;
  /** CPU per process over the timed purchases, % of one core; "emulator" and "pcscd" in the PC/SC layout. */
  cpuPercent: Record<string, number>;
  /** The timed purchases' wall time, s: with cpuPercent, the CPU per purchase. */
  seconds: number;
  /** CPU per process over 2 s (IDLE_MS) with no purchase, once the network is up, before the warm-up, % of one core. */
  idleCpuPercent: Record<string, number>;
  machineCpuPercent?: number;
  serviceLogs: LogFindings;
  dataDir?: string;
}

export interface HardwarePurchaseOutcome {
  mode: string;
  layout: Layout;
  run?: HardwarePurchaseRun;
  unavailable?: string;
  failed?: string;
}

export interface HardwareReport {
  settings: Omit<HardwareSettings, "keepData">;
  apdu: Part<PcscReport>;
  purchases: HardwarePurchaseOutcome[];
  hsm: Part<HsmReport>;
}

/** How long a PC/SC part waits for another session's pcscd to go before it reports PC/SC unavailable. */
const OTHER_PCSCD_WAIT_MS = 120_000;

const say = (line: string) => process.stderr.write(`${line}\n`);

export async function measureHardware(s: HardwareSettings): Promise<HardwareReport> {
  say(
    `netpurse bench, hardware: APDU round trip (${s.apdu.rounds} APDUs with the shim, ${s.apdu.stockRounds} with the stock driver), ` +
      `${s.modes.length * 2} purchase runs (${s.modes.join(", ")}; in-process and PC/SC; ${s.warmupPurchases} + ${s.purchases} purchases each, ${s.psams} PSAMs, TLS on), ` +
      `S2 signings (${s.signings} per path)`,
  );
  // Interrupts end the process once every registered stop has run: no part starts after one.
  const forget = stopOnInterrupt(async () => {
    interrupted = true;
  });
  try {
    return await measureParts(s);
  } finally {
    forget();
  }
}

/** Set by Ctrl-C or SIGTERM: the services are being stopped and the process is about to exit. */
let interrupted = false;

/** Waits for the exit an interrupt makes, instead of starting more work. */
async function unlessInterrupted(): Promise<void> {
  if (interrupted) await new Promise<never>(() => {});
}

async function measureParts(s: HardwareSettings): Promise<HardwareReport> {
  const apdu = await pcscPart("[hardware] APDU round trip", () => measurePcsc(s.apdu));
  const purchases: HardwarePurchaseOutcome[] = [];
  for (const mode of s.modes) {
    const shop = shopForMode(mode);
    await unlessInterrupted();
    purchases.push(await purchaseRun(shop, "in-process", s));
    await unlessInterrupted();
    purchases.push(await purchaseRun(shop, "PC/SC", s));
  }
  await unlessInterrupted();
  const hsm = await hsmPart(s.signings);
  const settings = { purchases: s.purchases, warmupPurchases: s.warmupPurchases, psams: s.psams, modes: s.modes, apdu: s.apdu, signings: s.signings };
  return { settings, apdu, purchases, hsm };
}

/** Set once a wait for another pcscd ran out: the suite's later PC/SC parts do not wait again. */
let waitedInVain = false;

/** Why PC/SC cannot be used now, after waiting a while for another session's pcscd to go; undefined when it can. */
async function pcscUnavailableNow(label: string): Promise<string | undefined> {
  const until = Date.now() + OTHER_PCSCD_WAIT_MS;
  for (let told = false; ; told = true) {
    const why = await pcscBenchUnavailable();
    // Another session's PC/SC tests may hold the machine's one pcscd for a while: theirs, never ours to stop.
    if (!why || waitedInVain || !(await otherPcscd())) return why;
    if (Date.now() > until) {
      waitedInVain = true;
      return why;
    }
    if (!told) say(`${label}: another pcscd is running; waiting up to ${OTHER_PCSCD_WAIT_MS / 1000} s for it to stop`);
    await sleep(2_000);
  }
}

async function pcscPart<T>(label: string, measure: () => Promise<T>): Promise<Part<T>> {
  const why = await pcscUnavailableNow(label);
  if (why) {
    say(`${label}: skipped, PC/SC cannot be set up here: ${why}`);
    return { unavailable: why };
  }
  try {
    return { measured: await measure() };
  } catch (e) {
    say(`${label}: failed: ${(e as Error).message}`);
    return { failed: (e as Error).message };
  }
}

/** Why SoftHSM2 through PKCS#11 cannot be used here, or undefined. */
async function hsmUnavailable(): Promise<string | undefined> {
  if (!findSoftHsmModule()) return "SoftHSM2 is not installed (Debian: apt-get install softhsm2)";
  try {
    await loadPkcs11Binding();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

async function hsmPart(signings: number): Promise<Part<HsmReport>> {
  const why = await hsmUnavailable();
  if (why) {
    say(`[hardware] S2 signings: skipped, SoftHSM2 cannot be used here: ${why}`);
    return { unavailable: why };
  }
  say(`[hardware] S2 signings: ${signings} per path`);
  try {
    return { measured: await measureHsm({ signings }) };
  } catch (e) {
    say(`[hardware] S2 signings: failed: ${(e as Error).message}`);
    return { failed: (e as Error).message };
  }
}

/** A card transport that counts what goes through it. */
class CountingTransport implements CardTransport {
  apdus = 0;
  resets = 0;
  byIns: Record<string, number> = {};

  constructor(private readonly inner: CardTransport) {}

  isPresent(): Promise<boolean> {
    return this.inner.isPresent();
  }

  reset(): Promise<Buffer> {
    this.resets++;
    return this.inner.reset();
  }

  transmit(command: Buffer): Promise<Buffer> {
    this.apdus++;
    const ins = insHex(command[1] ?? 0);
    this.byIns[ins] = (this.byIns[ins] ?? 0) + 1;
    return this.inner.transmit(command);
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  snapshot(): Counts {
    return { apdus: this.apdus, resets: this.resets, byIns: { ...this.byIns } };
  }
}

const insHex = (ins: number) => ins.toString(16).padStart(2, "0").toUpperCase();

type Counts = Omit<ApduCount, "reader" | "kind">;

/** What happened between two counts, per purchase. */
function perPurchase(before: Counts, after: Counts, purchases: number): ApdusPerPurchase {
  const n = Math.max(1, purchases);
  const byIns: Record<string, number> = {};
  for (const [ins, count] of Object.entries(after.byIns)) {
    const d = count - (before.byIns[ins] ?? 0);
    if (d > 0) byIns[ins] = d / n;
  }
  return { apdus: (after.apdus - before.apdus) / n, resets: (after.resets - before.resets) / n, byIns };
}

/** The sum of several readers' counts. */
function summed(counts: Counts[]): Counts {
  const byIns: Record<string, number> = {};
  for (const c of counts) for (const [ins, n] of Object.entries(c.byIns)) byIns[ins] = (byIns[ins] ?? 0) + n;
  return { apdus: counts.reduce((a, c) => a + c.apdus, 0), resets: counts.reduce((a, c) => a + c.resets, 0), byIns };
}

let lastRequest = 0;

/** The emulator child's counts, over its IPC channel. */
function emulatorCounts(net: BenchNetwork, timeoutMs = 10_000): Promise<ApduCount[]> {
  const child = net.launcher.get(EMULATOR)?.child;
  if (!child) return Promise.reject(new Error("the emulator is not running"));
  const id = ++lastRequest;
  return new Promise((resolve, reject) => {
    const done = (e: Error | undefined, counts?: ApduCount[]) => {
      clearTimeout(timer);
      child.off("message", onMessage);
      if (e) reject(e);
      else resolve(counts!);
    };
    const onMessage = (m: unknown) => {
      const reply = m as Partial<ApduCountsReply>;
      if (reply?.id === id && Array.isArray(reply.apduCounts)) done(undefined, reply.apduCounts);
    };
    const timer = setTimeout(() => done(new Error(`the emulator did not report its APDU counts within ${timeoutMs} ms`)), timeoutMs);
    child.on("message", onMessage);
    child.send({ id, op: "apduCounts" } satisfies ApduCountsRequest);
  });
}

const EMULATOR = "emulator";
const EMULATOR_SCRIPT = "bench/apdu-counting-emulator.ts";

/** The terminal host's PSAM files, in name order. */
async function psamFiles(dir: string): Promise<string[]> {
  const psams = join(paths(dir).terminal(TERMINAL_ID), "psams");
  return (await readdir(psams))
    .filter((n) => n.endsWith(".psam.json"))
    .sort()
    .map((n) => join(psams, n));
}

/** A terminal host's --psam-readers: exactly these readers. */
const readerPattern = (readers: ReaderSlot[]) => `^(${readers.map((r) => r.name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|")})$`;

/** The PC/SC side of a run: pcscd, the emulator child, and this process's PC/SC context, each stopped by close(). */
interface Readers {
  pcscd: Pcscd;
  /** The cardholder's card (not the client daemon's). */
  cardholderReader: ReaderSlot;
  psamReaders: ReaderSlot[];
  pcsc?: PcscReaders;
}

/**
 * pcscd (ours, with the shim) and the emulator child serving, in this order:
 * the client daemon's card, the cardholder's, then every PSAM. The daemon
 * --pcsc takes the first reader holding a netpurse card, in name order: its
 * own, "netpurse card 1"; the cardholder here uses "netpurse card 2" by name.
 */
async function startReaders(net: BenchNetwork, psams: string[]): Promise<Readers> {
  const slots = readerSlots({ cards: [net.daemonCardPath, net.cardholderCards[0]!], psams }, DEFAULT_PORT_BASE);
  const pcscd = await Pcscd.start({
    dir: join(net.dir, "pcscd"),
    readers: virtualReaders(
      slots.map((r) => r.friendlyName),
      DEFAULT_PORT_BASE,
    ),
  });
  try {
    // In the network's launcher, started first: it stops after every service that uses its readers.
    const args = [...slots.flatMap((r) => [r.kind === "card" ? "--card" : "--psam", r.file]), "--port-base", String(DEFAULT_PORT_BASE)];
    const started = await net.launcher.start(EMULATOR, EMULATOR_SCRIPT, args);
    await new EmulatorControl(started.child).whenReady();
  } catch (e) {
    await pcscd.close();
    throw e;
  }
  return { pcscd, cardholderReader: slots[1]!, psamReaders: slots.filter((r) => r.kind === "PSAM") };
}

/** The network as BenchNetwork.launch starts it, with the terminal host's PSAMs and the daemon's card behind PC/SC. */
const launchWithReaders = (net: BenchNetwork, psams: number, readers: Readers) => net.launch(psams, { psamReaders: readerPattern(readers.psamReaders) });

/** The cardholder's card through this process's PC/SC context, as the client daemon reaches a card in a reader. */
async function pcscCardholder(readers: Readers): Promise<CardTransport> {
  readers.pcsc = await PcscReaders.open();
  const name = readers.cardholderReader.name;
  if (!(await readers.pcsc.waitFor(() => readers.pcsc!.view(name)?.present || undefined, 10_000))) {
    throw new Error(`this process does not see the card in "${name}"`);
  }
  // The client daemon's settings: wait up to 3 s for the card, let the reader go after 5 s idle.
  return new PcscTransport(readers.pcsc, { name }, { waitForCardMs: 3_000 });
}

/** One mode in one layout: a fresh data folder and network, one cardholder paying in a row. */
async function purchaseRun(shop: ShopFile, layout: Layout, s: HardwareSettings): Promise<HardwarePurchaseOutcome> {
  const mode = modeOf(shop);
  const label = `[hardware] ${mode}, ${layout}`;
  if (layout === "PC/SC") {
    const why = await pcscUnavailableNow(label);
    if (why) {
      say(`${label}: skipped, PC/SC cannot be set up here: ${why}`);
      return { mode, layout, unavailable: why };
    }
  }
  say(`${label}: setting up a data folder and starting the network`);
  const net = await BenchNetwork.prepare({ psams: s.psams, cardholders: 1, shop, tls: true });
  let readers: Readers | undefined;
  let transport: CardTransport | undefined;
  // The cardholder lets go of its reader and PC/SC context before the emulator and pcscd stop.
  const closeCardholder = async () => {
    await transport?.close().catch(() => undefined);
    transport = undefined;
    await readers?.pcsc?.close();
    if (readers) delete readers.pcsc;
  };
  const tidy = async () => {
    await closeCardholder();
    await net.stop();
    await readers?.pcscd.close();
    if (!s.keepData) await net.discard();
  };
  const forget = stopOnInterrupt(tidy);
  try {
    if (layout === "PC/SC") {
      readers = await startReaders(net, await psamFiles(net.dir));
      await launchWithReaders(net, s.psams, readers);
      transport = await pcscCardholder(readers);
    } else {
      await net.launch(s.psams);
      transport = new InProcessTransport(await SoftwareCard.open(net.cardholderCards[0]!));
    }
    const card = new CountingTransport(transport);
    const cardholder: PurchaseContext = { reader: new PurseReader(card), payment: net.clients.payment, merchant: net.clients.merchant };
    const pids = () => {
      const out = net.processes();
      const emulator = net.launcher.pid(EMULATOR);
      if (emulator !== undefined) out.set(EMULATOR, emulator);
      if (readers?.pcscd.pid !== undefined) out.set("pcscd", readers.pcscd.pid);
      return out;
    };
    const idle = new CpuSampler(pids);
    idle.opened();
    await sleep(IDLE_MS);
    idle.closed();
    const cpu = new CpuSampler(pids);
    // Both set again as the timed purchases start and end.
    const snapshot = async (): Promise<{ card: Counts; emulator?: ApduCount[] }> => ({
      card: card.snapshot(),
      ...(readers ? { emulator: await emulatorCounts(net) } : {}),
    });
    let before = await snapshot();
    let after = before;
    const window = {
      opened: async () => {
        before = await snapshot();
        cpu.opened();
      },
      closed: async () => {
        cpu.closed();
        after = await snapshot();
      },
    };
    const paid = await payInARow(label, net.clients.merchant(net.merchantAddress), cardholder, s, window);
    await closeCardholder();
    await net.stop();
    const counted = (pick: (c: ApduCount) => boolean) =>
      before.emulator && after.emulator ? perPurchase(summed(before.emulator.filter(pick)), summed(after.emulator.filter(pick)), paid.purchases) : undefined;
    const psam = counted((c) => c.kind === "PSAM");
    const cardAtEmulator = counted((c) => c.reader === readers?.cardholderReader.name);
    return {
      mode,
      layout,
      run: {
        psams: s.psams,
        tls: net.tls,
        warmupPurchases: s.warmupPurchases,
        purchases: paid.purchases,
        p50Ms: percentile(paid.latencies, 0.5),
        p99Ms: percentile(paid.latencies, 0.99),
        meanMs: paid.latencies.length ? paid.latencies.reduce((a, b) => a + b, 0) / paid.latencies.length : NaN,
        errors: paid.errors.count,
        errorMessages: paid.errors.byMessage,
        card: perPurchase(before.card, after.card, paid.purchases),
        ...(psam ? { psam } : {}),
        ...(cardAtEmulator ? { cardAtEmulator } : {}),
        cpuPercent: cpu.percent(),
        seconds: paid.seconds,
        idleCpuPercent: idle.percent(),
        ...machineCpu(cpu),
        serviceLogs: await net.logFindings(),
        ...(s.keepData ? { dataDir: net.dir } : {}),
      },
    };
  } catch (e) {
    say(`${label}: failed: ${(e as Error).message}`);
    return { mode, layout, failed: (e as Error).message };
  } finally {
    forget();
    await tidy();
  }
}

/**
 * The warm-up purchases, then the timed ones, one after the other: the
 * merchant's offer (not timed), then payOffer (timed). `window` brackets the
 * timed ones, to count APDUs and CPU over them alone.
 */
async function payInARow(
  label: string,
  merchant: MerchantClient,
  cardholder: PurchaseContext,
  s: HardwareSettings,
  window: { opened(): Promise<void>; closed(): Promise<void> },
): Promise<{ latencies: number[]; purchases: number; errors: ErrorTally; seconds: number }> {
  const errors = new ErrorTally(label);
  const latencies: number[] = [];
  const pay = async (): Promise<number | undefined> => {
    await unlessInterrupted();
    try {
      const offer = await orderSong(merchant);
      const started = performance.now();
      await payOffer(offer, cardholder);
      return performance.now() - started;
    } catch (e) {
      errors.add(e);
      return undefined;
    }
  };
  for (let i = 0; i < s.warmupPurchases; i++) await pay();
  await window.opened();
  const started = performance.now();
  for (let i = 0; i < s.purchases; i++) {
    const ms = await pay();
    if (ms !== undefined) latencies.push(ms);
    if ((i + 1) % 10 === 0 || i + 1 === s.purchases) say(`${label}: ${i + 1}/${s.purchases} purchases timed`);
  }
  const seconds = (performance.now() - started) / 1000;
  await window.closed();
  latencies.sort((a, b) => a - b);
  return { latencies, purchases: latencies.length, errors, seconds };
}
