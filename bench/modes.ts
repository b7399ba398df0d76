// The modes benchmark (issue #3, item 5): purchases in each confirmation mode
// with the cardholders far from the payment server (a delay proxy on that
// path only), beside the chatty remote-reader approach at the same distance.
// Per mode and delay it counts the cardholder's round trips and messages to
// the payment server, times payOffer, and reads from the payment server's
// database how long each purchase held its PSAM.

import { performance } from "node:perf_hooks";
import { payOffer, type MerchantClient, type PurchaseContext } from "../client/purchase.js";
import type { ShopFile } from "../services/merchant/shop.js";
import { DEMO_SHOPS } from "../services/network/layout.js";
import { CallCounter, PurchaseCalls, type CallSummary } from "./call-count.js";
import { measureChatty } from "./chatty.js";
import { DelayProxy, type ProxyStats } from "./delay-proxy.js";
import { stopOnInterrupt } from "./interrupt.js";
import { closedLoop, type LoadResult, type Phases } from "./load.js";
import { BenchNetwork, modeOf, type LogFindings } from "./network.js";
import { peakMemoryMiB } from "./proc.js";
import { orderSong } from "./purchases.js";
import {
  BACKGROUND_DRAIN_MS,
  holdStats,
  paymentRecords,
  proofOutbox,
  unrecordedPurchases,
  waitForBacklog,
  WallClockWindow,
  type Backlog,
  type HoldStats,
  type PaymentRecords,
  type ProofOutbox,
} from "./service-records.js";

export interface ModesSettings {
  psams: number;
  cardholders: number;
  /** One-way delays on the cardholder ↔ payment server path, ms; each gets a run per mode. */
  delaysMs: number[];
  phases: Phases;
  keepData: boolean;
}

export interface ModeResult extends LoadResult {
  /** A confirmation mode, or CHATTY (the baseline). */
  approach: string;
  delayMs: number;
  psams: number;
  cardholders: number;
  /** Successful purchases whose calls and bytes were counted: all of the run's, warm-up and drain included. */
  purchasesCounted: number;
  /** Cardholder ↔ server round trips per purchase over the delayed path (RPCs; for CHATTY, card APDUs). */
  roundTrips: {
    onPath: number;
    /** Started by the purchase but not waited for (CLIENT_COMPARES's proof report). */
    after: number;
    /** Merchant validation → payment server reports per purchase (MERCHANT_COMPARES), off the cardholder's path. */
    merchantToPayment?: number;
  };
  /** Messages per purchase over the delayed path, both directions, on the path and after. */
  messages: number;
  /** Cardholder → merchant RPCs per purchase inside payOffer (not delayed). */
  merchantCalls?: number;
  /** Bytes through the delay proxy per purchase, both directions (HTTP/2 framing included). */
  bytesPerPurchase: number;
  proxy: ProxyStats;
  /** PSAM leases that ended inside the measuring window. */
  psamHold: HoldStats;
  /** Peak resident memory (VmHWM) of the server holding the PSAM pool: the payment server, or the remote reader. */
  serverPeakMemoryMiB?: number;
  /** Calls after the purchase that failed or never ended, and card proofs the merchant validation could not deliver. */
  backgroundFailures: number;
  calls?: CallSummary;
  payment?: Omit<PaymentRecords, "holds">;
  proofOutbox?: ProofOutbox;
  backlog?: {
    /** Card proofs in the merchant validation's outbox, not yet reported (MERCHANT_COMPARES). */
    merchantProofs: Backlog;
    /** Purchases whose card answer or proof the payment server had not yet ruled on or recorded in the PSAM's batch. */
    unrecordedProofs: Backlog;
  };
  /** The remote reader's failed purchases, by message. */
  remoteReaderFailures?: Record<string, number>;
  serviceLogs: LogFindings;
  dataDir?: string;
}

export interface ModesReport {
  psams: number;
  cardholders: number;
  delaysMs: number[];
  phases: Phases;
  results: ModeResult[];
}

/** The chatty baseline, then each demo shop's mode, at each delay. */
export async function measureModes(s: ModesSettings): Promise<ModesReport> {
  const runs = s.delaysMs.flatMap((delayMs) => [{ delayMs, shop: undefined }, ...DEMO_SHOPS.map(({ shop }) => ({ delayMs, shop }))]);
  process.stderr.write(
    `netpurse bench, modes: ${runs.length} runs (${DEMO_SHOPS.length} modes and the chatty baseline at ${s.delaysMs.join(", ")} ms each way), ${s.psams} PSAMs, ${s.cardholders} cardholders, ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of load each, plus start-up\n`,
  );
  const results: ModeResult[] = [];
  for (const [i, run] of runs.entries()) {
    process.stderr.write(`modes run ${i + 1}/${runs.length}\n`);
    results.push(run.shop ? await measureMode(run.shop, run.delayMs, s) : await measureChatty(run.delayMs, s));
  }
  return { psams: s.psams, cardholders: s.cardholders, delaysMs: s.delaysMs, phases: s.phases, results };
}

/** One mode at one delay: a fresh network whose merchant names the delay proxy as its payment server. */
async function measureMode(shop: ShopFile, delayMs: number, s: ModesSettings): Promise<ModeResult> {
  const label = `${modeOf(shop)}, ${delayMs} ms each way`;
  process.stderr.write(`[${label}] setting up a data folder and starting the network\n`);
  const proxy = await DelayProxy.fork(delayMs);
  const net = await BenchNetwork.prepare({ psams: s.psams, cardholders: s.cardholders, shop });
  const tidy = async () => {
    await net.stop();
    await proxy.close();
    if (!s.keepData) await net.discard();
  };
  const forget = stopOnInterrupt(tidy);
  try {
    await net.launch(s.psams, { offerPaymentServer: proxy.address });
    proxy.forwardTo(net.paymentAddress);
    const cardholders = await Promise.all(Array.from({ length: s.cardholders }, (_, i) => net.cardholder(i)));
    const merchant = net.clients.merchant(net.merchantAddress);
    const counter = new CallCounter();
    const window = new WallClockWindow();
    const load = await closedLoop({
      label,
      workers: s.cardholders,
      phases: s.phases,
      operation: (w) => buyCounted(merchant, cardholders[w]!, counter),
      window,
      settle: true,
    });
    const leftovers = await waitForLeftovers(net.dir, counter);
    const outbox = proofOutbox(net.dir);
    const peak = peakMemoryMiB(net.launcher.pid("payment")!); // before stopping: /proc forgets a process once it exits
    await net.stop();
    const { holds, ...payment } = paymentRecords(net.dir);
    const calls = counter.summary();
    const traffic = await proxy.stats();
    return {
      approach: modeOf(shop),
      delayMs,
      psams: s.psams,
      cardholders: s.cardholders,
      ...load,
      purchasesCounted: calls.purchases,
      roundTrips: { onPath: calls.paymentOnPath, after: calls.paymentAfter, merchantToPayment: outbox.attempts / calls.purchases },
      messages: 2 * (calls.paymentOnPath + calls.paymentAfter), // each unary call: one request, one response
      merchantCalls: calls.merchantOnPath,
      bytesPerPurchase: (traffic.bytesUp + traffic.bytesDown) / calls.purchases,
      proxy: traffic,
      psamHold: holdStats(holds, window.openedAt, window.closedAt),
      ...(peak !== undefined ? { serverPeakMemoryMiB: peak } : {}),
      backgroundFailures: calls.failedAfter + leftovers.unfinishedCalls + leftovers.merchantProofs.left + leftovers.unrecordedProofs.left,
      calls,
      payment,
      proofOutbox: outbox,
      backlog: { merchantProofs: leftovers.merchantProofs, unrecordedProofs: leftovers.unrecordedProofs },
      serviceLogs: await net.logFindings(),
      ...(s.keepData ? { dataDir: net.dir } : {}),
    };
  } finally {
    forget();
    await tidy();
  }
}

/**
 * The one-round-trip modes leave work behind each purchase: lets it finish,
 * so that the counts are whole and the network's stop cuts nothing short. In
 * turn, as each feeds the next: the cardholders' proof reports, then the
 * merchant validation's, then the payment server recording proven purchases.
 */
async function waitForLeftovers(
  dataDir: string,
  counter: CallCounter,
): Promise<{ unfinishedCalls: number; merchantProofs: Backlog; unrecordedProofs: Backlog }> {
  const queuedProofs = () => proofOutbox(dataDir).states.QUEUED ?? 0;
  const unrecordedProofs = () => unrecordedPurchases(dataDir);
  const atEnd = { queued: queuedProofs(), unrecorded: unrecordedProofs() };
  const unfinishedCalls = await counter.drain(BACKGROUND_DRAIN_MS);
  return {
    unfinishedCalls,
    merchantProofs: await waitForBacklog(queuedProofs, atEnd.queued, BACKGROUND_DRAIN_MS),
    unrecordedProofs: await waitForBacklog(unrecordedProofs, atEnd.unrecorded, BACKGROUND_DRAIN_MS),
  };
}

/** One purchase with its calls counted: the merchant's offer (not timed, not counted), then payOffer (timed). */
async function buyCounted(merchant: MerchantClient, cardholder: PurchaseContext, counter: CallCounter): Promise<number> {
  const offer = await orderSong(merchant);
  const calls = new PurchaseCalls();
  const started = performance.now();
  try {
    await payOffer(offer, calls.wrap(cardholder));
  } finally {
    calls.purchaseEnded();
  }
  const ms = performance.now() - started;
  counter.add(calls);
  return ms;
}
