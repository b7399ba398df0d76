// How long the stack suite's warm-up must be: one configuration's network,
// fresh, under a closed load from its first purchase, with the CPU per
// purchase (every process, from /proc) of each successive slice of a few
// seconds. Where it stops falling, the JIT (and the caches) have settled.
// Run once to choose --warmup (bench/README.md has the result):
//
//   node --import tsx bench/warmup-curve.ts [--psams 4] [--clients 8] [--seconds 40] [--slice 2] [--mode PSAM_VERIFIES]

import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { markdown, rate } from "./format.js";
import { handleInterrupts, stopOnInterrupt } from "./interrupt.js";
import { closedLoop } from "./load.js";
import { BenchNetwork, shopForMode } from "./network.js";
import { CpuSampler, cpuMsPerOperation } from "./proc.js";
import { buySong } from "./purchases.js";

interface Slice {
  fromS: number;
  toS: number;
  purchases: number;
  cpuMsPerPurchase: number;
  /** The network's and the cardholders' processes, % of one core. */
  ownPercent: number;
  machinePercent: number | undefined;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      psams: { type: "string", default: "4" },
      clients: { type: "string", default: "8" },
      seconds: { type: "string", default: "40" },
      slice: { type: "string", default: "2" },
      mode: { type: "string", default: "PSAM_VERIFIES" },
    },
  });
  const psams = Number(values.psams);
  const cardholders = Number(values.clients);
  const sliceMs = Number(values.slice) * 1000;
  const totalMs = Number(values.seconds) * 1000;
  handleInterrupts();
  const net = await BenchNetwork.prepare({ psams, cardholders, shop: shopForMode(values.mode), tls: true });
  const tidy = async () => {
    await net.stop();
    await net.discard();
  };
  const forget = stopOnInterrupt(tidy);
  try {
    await net.launch(psams);
    const wallets = await Promise.all(Array.from({ length: cardholders }, (_, i) => net.cardholder(i)));
    const merchant = net.clients.merchant(net.merchantAddress);
    const slices: Slice[] = [];
    let done = 0;
    let sampler = new CpuSampler(() => net.processes());
    let sliceStart = 0;
    const startedAt = performance.now();
    const cut = () => {
      sampler.closed();
      const seconds = (performance.now() - startedAt) / 1000;
      slices.push({
        fromS: sliceStart,
        toS: seconds,
        purchases: done,
        cpuMsPerPurchase: cpuMsPerOperation(sampler.percent(), done / (seconds - sliceStart)),
        ownPercent: Object.values(sampler.percent()).reduce((a, b) => a + b, 0),
        machinePercent: sampler.machinePercent(),
      });
      done = 0;
      sliceStart = seconds;
      sampler = new CpuSampler(() => net.processes());
      sampler.opened();
    };
    sampler.opened();
    const timer = setInterval(cut, sliceMs);
    await closedLoop({
      label: `warm-up curve, ${psams} × ${cardholders}`,
      workers: cardholders,
      phases: { warmupMs: 0, measureMs: totalMs },
      operation: async (w) => {
        const ms = await buySong(merchant, wallets[w]!);
        done++;
        return ms;
      },
    });
    clearInterval(timer);
    const rows = slices.map((s) => [
      `${s.fromS.toFixed(0)}–${s.toS.toFixed(0)}`,
      String(s.purchases),
      rate(s.purchases / (s.toS - s.fromS)),
      Number.isFinite(s.cpuMsPerPurchase) ? s.cpuMsPerPurchase.toFixed(1) : "n/a",
      s.ownPercent.toFixed(0),
      s.machinePercent === undefined ? "n/a" : Math.max(0, s.machinePercent - s.ownPercent).toFixed(0),
    ]);
    process.stdout.write(
      `Warm-up curve: ${psams} PSAMs × ${cardholders} cardholders, ${values.mode}, TLS on, from the first purchase of a fresh network\n\n` +
        markdown(
          ["seconds since the load began", "purchases", "purchases/s", "CPU ms per purchase (all processes)", "their CPU %", "other work on the machine %"],
          rows,
        ) +
        "\n",
    );
  } finally {
    forget();
    await tidy();
  }
}

main().catch((e) => {
  process.stderr.write(`warm-up curve failed: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exitCode = 1;
});
