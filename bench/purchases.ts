// The purchase benchmark of one configuration: N PSAMs, C cardholders each
// buying a song in a closed loop against a freshly started network.

import { join } from "node:path";
import { performance } from "node:perf_hooks";
import type { PaymentOffer } from "../gen/netpurse/merchant/v1/merchant.js";
import { payOffer, type MerchantClient, type PurchaseContext } from "../client/purchase.js";
import { DEFAULT_DEADLINE_MS } from "../lib/grpc/client.js";
import { DEMO_SHOP } from "../services/network/layout.js";
import { closedLoop, type LoadResult, type Phases } from "./load.js";
import { ConnectionSampler, type ConnectionCounts } from "./connections.js";
import { BenchNetwork, modeOf, PROCESS, shopForMode, type LogFindings } from "./network.js";
import { CpuSampler, cpuMsPerOperationByProcess, machineCpu, peakMemoryMiB } from "./proc.js";
import { collectProfiles, monotonicUs, OwnProfile, profilingEnv, type ProfileSet } from "./profile.js";
import {
  BACKGROUND_DRAIN_MS,
  holdStats,
  paymentRecords,
  unrecordedPurchases,
  waitForBacklog,
  WallClockWindow,
  type Backlog,
  type HoldStats,
} from "./service-records.js";
import { StatsWindow, type EventLoopDelay } from "./service-stats.js";

/** The cheapest product: the purse lasts longest, and the amount plays no part in the work per purchase. */
export const SONG = DEMO_SHOP.products.find((p) => p.productId === "song-1")!;

/** The stack's confirmation mode unless told: the demo shop's. */
export const DEFAULT_MODE = modeOf(DEMO_SHOP);

export interface PurchaseConfiguration {
  psams: number;
  cardholders: number;
  /** The confirmation mode (MODES), DEFAULT_MODE when not given: the merchant is that mode's demo shop. */
  mode?: string;
}

export interface PurchaseOptions {
  keepData: boolean;
  tls: boolean;
  /** Write CPU profiles of every process into a folder of this one named after the configuration (--profile). */
  profileDir?: string;
}

/** The payment server's memory for the purchases in flight. */
export interface PaymentMemory {
  /** Resident memory with the network started, the cardholders' channels open, and no purchase yet, MiB. */
  idleRssMiB: number;
  /** Resident memory when the measuring window closed, every cardholder's purchase in flight or about to be, MiB. */
  rssAtEndMiB: number;
  /** (rssAtEnd − idleRss) ÷ cardholders, KiB: what each concurrent purchase costs the server, its share of heap growth and buffers included. */
  kibPerInFlightPurchase: number;
}

export interface PurchaseResult extends LoadResult {
  psams: number;
  cardholders: number;
  mode: string;
  /** Every link TLS (mutual inside the operator's network, server TLS for the cardholders), or plaintext (--insecure). */
  tls: boolean;
  /** Peak resident memory (VmHWM) per process, MiB; "bench" is this process. */
  peakMemoryMiB: Record<string, number>;
  /** CPU per process during the measuring window, % of one core. */
  cpuPercent: Record<string, number>;
  /** The same per purchase: utime + stime over the window ÷ purchases in it, ms, per process. */
  cpuMsPerPurchase: Record<string, number>;
  /** Their sum. */
  cpuMsPerPurchaseTotal: number;
  /** Durable syncs made during the window ÷ purchases in it, per process (the processes' own count, lib/stats.ts). */
  fsyncsPerPurchase: Record<string, number>;
  fsyncsPerPurchaseTotal: number;
  /** Event-loop delay over the window, per process, ms. */
  eventLoopDelayMs: Record<string, EventLoopDelay>;
  /** PSAM leases that ended inside the window, from the payment server's own records; undefined when they could not be read. */
  psamHold?: HoldStats;
  paymentMemory?: PaymentMemory;
  /**
   * Purchases answered but not yet recorded in their PSAM's batch when the
   * load ended (the early-release modes finish that after the answer), and
   * how long the network took to finish them before it was stopped.
   */
  unrecordedAfterLoad: Backlog;
  /** Processes that did not report their figures (their columns read n/a). */
  statsUnanswered?: string[];
  /** The whole machine's busy CPU during the window, % of one core: these processes and any other work on the machine. */
  machineCpuPercent?: number;
  /** TCP connections between the processes during the measuring window (undefined where /proc cannot tell). */
  connections?: ConnectionCounts;
  serviceLogs: LogFindings;
  /** CPU profiles, with --profile. */
  profiles?: ProfileSet;
  /** The data folder, when kept. */
  dataDir?: string;
}

/** "16 PSAMs, 64 cardholders, PSAM_VERIFIES, TLS on". */
export function configurationLabel(c: { psams: number; cardholders: number; mode: string; tls: boolean }): string {
  return `${c.psams} PSAM${c.psams === 1 ? "" : "s"}, ${c.cardholders} cardholder${c.cardholders === 1 ? "" : "s"}, ${c.mode}, TLS ${c.tls ? "on" : "off"}`;
}

const MIB = 1024 * 1024;

/** Starts a fresh network for the configuration, runs the load, and stops the network whatever happens. */
export async function measurePurchases(c: PurchaseConfiguration, phases: Phases, o: PurchaseOptions): Promise<PurchaseResult> {
  const mode = c.mode ?? DEFAULT_MODE;
  const label = configurationLabel({ ...c, mode, tls: o.tls });
  const profileDir = o.profileDir ? join(o.profileDir, `${c.psams}x${c.cardholders}-${mode}-tls-${o.tls ? "on" : "off"}`) : undefined;
  process.stderr.write(`[${label}] setting up a data folder and starting the network\n`);
  const p = {
    psams: c.psams,
    cardholders: c.cardholders,
    shop: shopForMode(mode),
    tls: o.tls,
    keepData: o.keepData,
    ...(profileDir ? { serviceEnv: profilingEnv(profileDir) } : {}),
  };
  return BenchNetwork.session(p, async (net, cardholders, merchant) => {
    const cpu = new CpuSampler(() => net.processes());
    const connections = new ConnectionSampler(() => net.processes());
    const stats = new StatsWindow(net.launcher, PROCESS.bench);
    const wallClock = new WallClockWindow();
    const monotonic = { fromUs: NaN, toUs: NaN };
    const idleRss = await stats.idle();
    const own = profileDir ? await OwnProfile.start() : undefined;
    // Reading /proc for the connections, and the processes answering for their figures, cost CPU: outside the CPU sampler's span.
    const window = {
      opened: () => {
        connections.opened();
        stats.opened();
        wallClock.opened();
        monotonic.fromUs = monotonicUs();
        cpu.opened();
      },
      closed: () => {
        cpu.closed();
        monotonic.toUs = monotonicUs();
        wallClock.closed();
        stats.closed();
        connections.closed();
      },
    };
    const load = await closedLoop({ label, workers: c.cardholders, phases, operation: (w) => buySong(merchant, cardholders[w]!), window });
    const figures = await stats.figures();
    const connectionCounts = connections.counts();
    // Stopping the network with purchases still being recorded would cut them short (and log it).
    const unrecordedAfterLoad = await waitForBacklog(() => unrecordedPurchases(net.dir), unrecordedPurchases(net.dir), BACKGROUND_DRAIN_MS);
    const pids = net.processes();
    const peaks = peakMemories(pids); // before stopping: /proc forgets a process once it exits
    const ownProfile = await own?.stop();
    await net.stop();
    const cpuPercent = cpu.percent();
    const cpuMsPerPurchase = cpuMsPerOperationByProcess(cpuPercent, load.perSecond);
    const fsyncsPerPurchase = Object.fromEntries(Object.entries(figures.fsyncs).map(([name, n]) => [name, load.completed > 0 ? n / load.completed : NaN]));
    const payment = { idle: idleRss[PROCESS.payment], end: figures.rssBytesAtClose[PROCESS.payment] };
    return {
      psams: c.psams,
      cardholders: c.cardholders,
      mode,
      tls: o.tls,
      ...load,
      peakMemoryMiB: peaks,
      cpuPercent,
      cpuMsPerPurchase,
      cpuMsPerPurchaseTotal: sum(Object.values(cpuMsPerPurchase)),
      fsyncsPerPurchase,
      fsyncsPerPurchaseTotal: sum(Object.values(fsyncsPerPurchase)),
      eventLoopDelayMs: figures.eventLoopDelayMs,
      ...psamHold(net.dir, wallClock, label),
      ...(payment.idle !== undefined && payment.end !== undefined
        ? {
            paymentMemory: {
              idleRssMiB: payment.idle / MIB,
              rssAtEndMiB: payment.end / MIB,
              kibPerInFlightPurchase: (payment.end - payment.idle) / 1024 / c.cardholders,
            },
          }
        : {}),
      unrecordedAfterLoad,
      ...(figures.unanswered.length ? { statsUnanswered: figures.unanswered } : {}),
      ...machineCpu(cpu),
      ...(connectionCounts ? { connections: connectionCounts } : {}),
      serviceLogs: await net.logFindings(),
      ...(profileDir && ownProfile ? { profiles: await collectProfiles(profileDir, pids, { name: PROCESS.bench, profile: ownProfile }, monotonic) } : {}),
      ...(o.keepData ? { dataDir: net.dir } : {}),
    };
  });
}

const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);

/** PSAM hold times of the leases that ended in the window, as the payment server recorded them (read once it has stopped). */
function psamHold(dataDir: string, window: WallClockWindow, label: string): { psamHold?: HoldStats } {
  try {
    return { psamHold: holdStats(paymentRecords(dataDir).holds, window.openedAt, window.closedAt) };
  } catch (e) {
    process.stderr.write(`[${label}] cannot read the PSAM holds from the payment server's database: ${(e as Error).message}\n`);
    return {};
  }
}

/** The merchant's offer for the song. */
export async function orderSong(merchant: MerchantClient): Promise<PaymentOffer> {
  const { offer } = await merchant.createOrder({ productId: SONG.productId }, { deadline: DEFAULT_DEADLINE_MS });
  if (!offer) throw new Error("the merchant answered CreateOrder without an offer");
  return offer;
}

/** One cardholder's purchase: the merchant's offer, then the client module's purchase, which alone is timed. */
export async function buySong(merchant: MerchantClient, cardholder: PurchaseContext): Promise<number> {
  const offer = await orderSong(merchant);
  const started = performance.now();
  await payOffer(offer, cardholder);
  return performance.now() - started;
}

export function peakMemories(processes: Map<string, number>): Record<string, number> {
  const out: Record<string, number> = {};
  for (const [name, pid] of processes) {
    const mib = peakMemoryMiB(pid);
    if (mib !== undefined) out[name] = mib;
  }
  return out;
}
