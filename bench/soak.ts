// The payment server's memory over a long run (--soak-minutes N): one
// configuration under a closed load for N minutes on a fresh network, the
// server's resident memory (VmRSS) and its peak so far (VmHWM) read every
// minute. Flat means the peak at the end is where it was after the first
// minute: nothing grows with the number of purchases made.

import { performance } from "node:perf_hooks";
import { closedLoop, type LoadResult } from "./load.js";
import { BenchNetwork, PROCESS, shopForMode, type LogFindings } from "./network.js";
import { peakMemoryMiB, residentMemoryMiB } from "./proc.js";
import { buySong, configurationLabel, DEFAULT_MODE, type PurchaseConfiguration } from "./purchases.js";

/** The configuration the soak runs: the load configuration. */
export const SOAK_CONFIGURATION = { psams: 16, cardholders: 64, mode: DEFAULT_MODE };

const MINUTE_MS = 60_000;

export interface SoakSample {
  /** Since the load began, s. */
  atSeconds: number;
  /** Purchases completed since the load began. */
  purchases: number;
  rssMiB?: number;
  peakMiB?: number;
}

export interface SoakResult extends Required<PurchaseConfiguration>, LoadResult {
  tls: boolean;
  minutes: number;
  /** Before the load, then every minute, then at the end. */
  samples: SoakSample[];
  /** The sample one minute in (absent for a soak shorter than that). */
  atOneMinute?: SoakSample;
  atEnd: SoakSample;
  /** VmHWM at the end ÷ VmHWM at one minute. */
  peakGrowth?: number;
  serviceLogs: LogFindings;
  dataDir?: string;
}

/** Runs the soak: no warm-up (the first minute is the reference), then `minutes` of load. */
export async function measureSoak(minutes: number, o: { tls: boolean; keepData: boolean }): Promise<SoakResult> {
  const c = SOAK_CONFIGURATION;
  const label = `soak, ${configurationLabel({ ...c, tls: o.tls })}, ${minutes} min`;
  process.stderr.write(`[${label}] setting up a data folder and starting the network\n`);
  const p = { psams: c.psams, cardholders: c.cardholders, shop: shopForMode(c.mode), tls: o.tls, keepData: o.keepData };
  return BenchNetwork.session(p, async (net, cardholders, merchant) => {
    const pid = net.launcher.pid(PROCESS.payment)!;
    let purchases = 0;
    let startedAt = performance.now();
    const samples: SoakSample[] = [];
    const sample = () => {
      const rssMiB = residentMemoryMiB(pid);
      const peakMiB = peakMemoryMiB(pid);
      samples.push({
        atSeconds: (performance.now() - startedAt) / 1000,
        purchases,
        ...(rssMiB !== undefined ? { rssMiB } : {}),
        ...(peakMiB !== undefined ? { peakMiB } : {}),
      });
    };
    sample();
    let timer: NodeJS.Timeout | undefined;
    const load = await closedLoop({
      label,
      workers: c.cardholders,
      phases: { warmupMs: 0, measureMs: minutes * MINUTE_MS },
      operation: async (w) => {
        const ms = await buySong(merchant, cardholders[w]!);
        purchases++;
        return ms;
      },
      window: {
        opened: () => {
          startedAt = performance.now();
          timer = setInterval(sample, MINUTE_MS);
        },
        closed: () => {
          clearInterval(timer);
          sample();
        },
      },
    });
    await net.stop();
    // The first sample a minute in (a timer fires a little late, never early).
    const atOneMinute = samples.find((s) => s.atSeconds >= MINUTE_MS / 1000 - 0.5);
    const atEnd = samples[samples.length - 1]!;
    return {
      ...c,
      tls: o.tls,
      minutes,
      ...load,
      samples,
      ...(atOneMinute ? { atOneMinute } : {}),
      atEnd,
      ...(atOneMinute?.peakMiB && atEnd.peakMiB ? { peakGrowth: atEnd.peakMiB / atOneMinute.peakMiB } : {}),
      serviceLogs: await net.logFindings(),
      ...(o.keepData ? { dataDir: net.dir } : {}),
    };
  });
}
