// The cost of a real PC/SC reader path: one APDU's round trip (READ PURSE,
// after SELECT) from the pcsclite binding through pcscd and the vpcd driver
// to the emulated software card and back, with the loopback/TCP_NODELAY shim
// (the path netpurse runs) and with the stock driver (no shim), against the
// same card application called in-process (InProcessTransport), all in one
// run. Medians and 99th percentiles, per APDU.
//
// Without the shim vpcd listens on every interface for the few seconds of
// that phase; the card it serves is a throwaway test card.
//
// Alone: node --import tsx bench/pcsc.ts [--rounds N] [--stock-rounds N]. It
// needs what the PC/SC tests need (root, pcscd, vsmartcard-vpcd, cc, no
// other pcscd) and the pcsclite binding; otherwise it says why and exits 1.

import { availableParallelism, cpus } from "node:os";
import { createRequire } from "node:module";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { SoftwareCard } from "../client/card/software-card.js";
import { decodeResponse, encodeCommand, selectCommand, SW, swHex } from "../lib/apdu/apdu.js";
import { InProcessTransport } from "../lib/apdu/transport.js";
import { PURSE_AID } from "../lib/protocol/purse.js";
import { startEmulatorProcess } from "../services/emulator/emulator-process.js";
import { pcscSupport } from "../services/emulator/pcscd.js";
import { Issuer } from "../services/issuer/issuer.js";
import { markdown } from "./format.js";
import { handleInterrupts, stopOnInterrupt } from "./interrupt.js";

const SELECT = encodeCommand(selectCommand(PURSE_AID));
const READ_PURSE = Buffer.from("805C000000", "hex");
const WARMUP = 20;

export interface PcscPathResult {
  path: string;
  apdus: number;
  medianMs: number;
  p99Ms: number;
  apdusPerSecond: number;
}

export interface PcscReport {
  cores: number;
  cpu: string;
  apdu: string;
  paths: PcscPathResult[];
}

export interface PcscSettings {
  /** APDUs timed in-process and through the shimmed path (default 2000; in-process 10×). */
  rounds: number;
  /** APDUs timed through the stock driver, about 48 ms each (default 100). */
  stockRounds: number;
}

export const PCSC_DEFAULTS: PcscSettings = { rounds: 2_000, stockRounds: 100 };

/** Why the suite cannot run here, or undefined. */
export async function pcscBenchUnavailable(): Promise<string | undefined> {
  const s = await pcscSupport({ binding: true });
  return s.ok ? undefined : s.reason;
}

type Transmit = (apdu: Buffer) => Promise<Buffer>;

/** The binding reports errors as Error objects, mostly: anything else becomes one. */
function asError(e: unknown): Error {
  return e instanceof Error ? e : new Error(typeof e === "string" ? e : JSON.stringify(e));
}
type PCSCLite = ReturnType<typeof import("pcsclite")>;
/** The binding's reader type, which it does not export: the argument of its last "reader" listener overload. */
type CardReader = Parameters<Parameters<PCSCLite["on"]>[1]>[0];

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
}

async function timeApdus(path: string, transmit: Transmit, rounds: number): Promise<PcscPathResult> {
  const check = async (apdu: Buffer) => {
    const sw = decodeResponse(await transmit(apdu)).sw;
    if (sw !== SW.OK) throw new Error(`${path}: the card answered ${swHex(sw)}`);
  };
  await check(SELECT);
  for (let i = 0; i < WARMUP; i++) await check(READ_PURSE);
  const times: number[] = [];
  const start = performance.now();
  for (let i = 0; i < rounds; i++) {
    const t = performance.now();
    await check(READ_PURSE);
    times.push(performance.now() - t);
  }
  const total = performance.now() - start;
  times.sort((a, b) => a - b);
  process.stderr.write(`[pcsc] ${path}: ${rounds} APDUs in ${total.toFixed(0)} ms\n`);
  return { path, apdus: rounds, medianMs: quantile(times, 0.5), p99Ms: quantile(times, 0.99), apdusPerSecond: (rounds / total) * 1000 };
}

/** A pcsclite connection to one reader, once its card is present. */
async function pcscliteReader(name: string, timeoutMs = 10_000): Promise<{ transmit: Transmit; close(): Promise<void> }> {
  const pcsc = (createRequire(import.meta.url)("pcsclite") as typeof import("pcsclite"))();
  let reader: CardReader | undefined;
  // Every reader pcscd lists (vpcd's empty second slot too) is an object that reports errors, pcscd
  // stopping included, and keeps the process alive until closed.
  const all: CardReader[] = [];
  const close = async () => {
    if (reader?.connected) await new Promise<void>((resolve) => reader!.disconnect(reader!.SCARD_LEAVE_CARD, () => resolve()));
    for (const r of all) r.close();
    pcsc.close();
  };
  try {
    const protocol = await new Promise<number>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no card in PC/SC reader "${name}" within ${timeoutMs} ms`)), timeoutMs);
      pcsc.on("error", (e) => reject(asError(e)));
      pcsc.on("reader", (r) => {
        all.push(r);
        r.on("error", (e) => {
          if (r === reader) reject(asError(e));
        });
        if (r.name !== name) return;
        reader = r;
        r.on("status", (s) => {
          if ((s.state & r.SCARD_STATE_PRESENT) === 0 || r.connected) return;
          r.connect({ share_mode: r.SCARD_SHARE_SHARED }, (err, p) => {
            clearTimeout(timer);
            if (err) reject(asError(err));
            else resolve(p);
          });
        });
      });
    });
    const transmit: Transmit = (apdu) =>
      new Promise((resolve, reject) =>
        reader!.transmit(apdu, 258, protocol, (err: unknown, response: Buffer) => (err ? reject(asError(err)) : resolve(response))),
      );
    return { transmit, close };
  } catch (e) {
    await close();
    throw e;
  }
}

/**
 * One path through pcscd: pcscd run by this process (with or without the shim), the card served by
 * netpurse-emulator in a child (pcsclite here must not share a thread with the card: emulator-process.ts),
 * a pcsclite connection, timed.
 */
async function throughPcscd(dir: string, cardPath: string, shim: boolean, rounds: number): Promise<PcscPathResult> {
  const emulator = await startEmulatorProcess({ dir, cards: [cardPath], pcscd: true, shim });
  const forget = stopOnInterrupt(() => emulator.close());
  try {
    const reader = await pcscliteReader(emulator.readers[0]!.name);
    try {
      const label = shim ? "pcsclite → pcscd → vpcd → emulator (loopback, TCP_NODELAY shim)" : "pcsclite → pcscd → vpcd → emulator (stock driver)";
      return await timeApdus(label, reader.transmit, rounds);
    } finally {
      await reader.close();
    }
  } finally {
    await emulator.close();
    forget();
  }
}

export async function measurePcsc(settings: PcscSettings = PCSC_DEFAULTS): Promise<PcscReport> {
  const why = await pcscBenchUnavailable();
  if (why) throw new Error(`PC/SC cannot be set up here: ${why}`);
  const dir = await mkdtemp(join(tmpdir(), "netpurse-bench-pcsc-"));
  try {
    await Issuer.createKeys(join(dir, "issuer"), 1);
    const issuer = await Issuer.open(join(dir, "issuer"));
    const path = join(dir, "bench.card.json");
    try {
      await issuer.personaliseCard({ path, currency: 978, exponent: 2, initialValue: 10_000, maxBalance: 50_000, expiry: "2099-12-31" });
    } finally {
      await issuer.close();
    }
    const inProcess = new InProcessTransport(await SoftwareCard.open(path));
    await inProcess.reset();
    const paths = [await timeApdus("in-process (InProcessTransport)", (a) => inProcess.transmit(a), settings.rounds * 10)];
    paths.push(await throughPcscd(join(dir, "shim"), path, true, settings.rounds));
    paths.push(await throughPcscd(join(dir, "stock"), path, false, settings.stockRounds));
    return { cores: availableParallelism(), cpu: cpus()[0]?.model ?? "unknown", apdu: "READ PURSE (80 5C 00 00 00 → 34 bytes + 9000)", paths };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export function renderPcsc(r: PcscReport): string {
  const us = (ms: number) => (Number.isFinite(ms) ? (ms * 1000).toFixed(0) : "n/a");
  const base = r.paths[0]?.medianMs ?? NaN;
  return [
    `### APDU round trip through PC/SC (${r.apdu}; ${r.cores} cores, ${r.cpu})`,
    "",
    markdown(
      ["path", "APDUs", "median µs", "p99 µs", "APDUs/s", "median vs in-process"],
      r.paths.map((p) => [p.path, String(p.apdus), us(p.medianMs), us(p.p99Ms), p.apdusPerSecond.toFixed(0), `${(p.medianMs / base).toFixed(0)}×`]),
    ),
    "",
  ].join("\n");
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({
    options: { rounds: { type: "string" }, "stock-rounds": { type: "string" }, help: { type: "boolean", short: "h" } },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(
      "Usage: node --import tsx bench/pcsc.ts [--rounds N (default 2000)] [--stock-rounds N (default 100)]\n\n" +
        "APDU round trip in-process, through pcsclite → pcscd → vpcd → netpurse-emulator with the shim,\nand with the stock driver. Markdown on stdout.\n",
    );
  } else {
    handleInterrupts();
    const n = (v: string | undefined, d: number) => (v === undefined ? d : Number(v));
    try {
      const report = await measurePcsc({ rounds: n(values.rounds, PCSC_DEFAULTS.rounds), stockRounds: n(values["stock-rounds"], PCSC_DEFAULTS.stockRounds) });
      process.stdout.write(renderPcsc(report));
    } catch (e) {
      process.stderr.write(`bench/pcsc: ${(e as Error).message}\n`);
      process.exitCode = 1;
    }
  }
}
