// The purchase benchmark of one configuration: N PSAMs, C cardholders each
// buying a song in a closed loop against a freshly started network.

import { performance } from "node:perf_hooks";
import type { PaymentOffer } from "../gen/netpurse/merchant/v1/merchant.js";
import { payOffer, type MerchantClient, type PurchaseContext } from "../client/purchase.js";
import { DEFAULT_DEADLINE_MS } from "../lib/grpc/client.js";
import { DEMO_SHOP } from "../services/network/layout.js";
import { stopOnInterrupt } from "./interrupt.js";
import { closedLoop, type LoadResult, type Phases } from "./load.js";
import { ConnectionSampler, type ConnectionCounts } from "./connections.js";
import { BenchNetwork, type LogFindings } from "./network.js";
import { CpuSampler, machineCpu, peakMemoryMiB } from "./proc.js";

/** The cheapest product: the purse lasts longest, and the amount plays no part in the work per purchase. */
export const SONG = DEMO_SHOP.products.find((p) => p.productId === "song-1")!;

export interface PurchaseConfiguration {
  psams: number;
  cardholders: number;
}

export interface PurchaseResult extends PurchaseConfiguration, LoadResult {
  /** Every link TLS (mutual inside the operator's network, server TLS for the cardholders), or plaintext (--insecure). */
  tls: boolean;
  /** Peak resident memory (VmHWM) per process, MiB; "bench" is this process. */
  peakMemoryMiB: Record<string, number>;
  /** CPU per process during the measuring window, % of one core. */
  cpuPercent: Record<string, number>;
  /** The whole machine's busy CPU during the window, % of one core: these processes and any other work on the machine. */
  machineCpuPercent?: number;
  /** TCP connections between the processes during the measuring window (undefined where /proc cannot tell). */
  connections?: ConnectionCounts;
  serviceLogs: LogFindings;
  /** The data folder, when kept. */
  dataDir?: string;
}

/** Starts a fresh network for the configuration, runs the load, and stops the network whatever happens. */
export async function measurePurchases(c: PurchaseConfiguration, phases: Phases, o: { keepData: boolean; tls: boolean }): Promise<PurchaseResult> {
  const label = `${c.psams} PSAM${c.psams === 1 ? "" : "s"}, ${c.cardholders} cardholder${c.cardholders === 1 ? "" : "s"}, TLS ${o.tls ? "on" : "off"}`;
  process.stderr.write(`[${label}] setting up a data folder and starting the network\n`);
  const net = await BenchNetwork.prepare({ psams: c.psams, cardholders: c.cardholders, tls: o.tls });
  const tidy = async () => {
    await net.stop();
    if (!o.keepData) await net.discard();
  };
  const forget = stopOnInterrupt(tidy);
  try {
    await net.launch(c.psams);
    const cardholders = await Promise.all(Array.from({ length: c.cardholders }, (_, i) => net.cardholder(i)));
    const merchant = net.clients.merchant(net.merchantAddress);
    const cpu = new CpuSampler(() => net.processes());
    const connections = new ConnectionSampler(() => net.processes());
    // Reading /proc for the connections costs this process CPU: outside the CPU sampler's span.
    const window = {
      opened: () => {
        connections.opened();
        cpu.opened();
      },
      closed: () => {
        cpu.closed();
        connections.closed();
      },
    };
    const load = await closedLoop({ label, workers: c.cardholders, phases, operation: (w) => buySong(merchant, cardholders[w]!), window });
    const connectionCounts = connections.counts();
    const peaks = peakMemories(net.processes()); // before stopping: /proc forgets a process once it exits
    await net.stop();
    return {
      ...c,
      tls: o.tls,
      ...load,
      peakMemoryMiB: peaks,
      cpuPercent: cpu.percent(),
      ...machineCpu(cpu),
      ...(connectionCounts ? { connections: connectionCounts } : {}),
      serviceLogs: await net.logFindings(),
      ...(o.keepData ? { dataDir: net.dir } : {}),
    };
  } finally {
    forget();
    await tidy();
  }
}

/** The merchant's offer for the song. */
export async function orderSong(merchant: MerchantClient): Promise<PaymentOffer> {
  const { offer } = await merchant.createOrder({ productId: SONG.productId }, { deadline: DEFAULT_DEADLINE_MS });
  if (!offer) throw new Error("the merchant answered CreateOrder without an offer");
  return offer;
}

/** One cardholder's purchase: the merchant's offer, then the client module's purchase, which alone is timed. */
async function buySong(merchant: MerchantClient, cardholder: PurchaseContext): Promise<number> {
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
