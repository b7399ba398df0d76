// The protocol skeleton baseline: the processes of a purchase (concentrator,
// terminal host with its PSAM slots, payment server, merchant validation,
// merchant; the cardholders and their cards in this process), each on the
// project's gRPC bootstrap, making a purchase's calls and stream messages of
// the real sizes (wire.ts) and the durable appends recovery depends on, and
// nothing else: no cryptography, no database, no protocol logic. What a
// purchase costs beyond it is netpurse's own work; what it costs itself is
// what this architecture costs on this machine.

import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";
import type { Channel, Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { clientFactory, DEFAULT_DEADLINE_MS, openChannel } from "../../lib/grpc/client.js";
import { CertificateAuthority, pkiPaths } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { Security } from "../../lib/pki/security.js";
import { processStats } from "../../lib/stats.js";
import { Launcher } from "../../services/network/launcher.js";
import { stopOnInterrupt } from "../interrupt.js";
import { closedLoop, type LoadResult } from "../load.js";
import { logFindings, SERVICE_ENV, type LogFindings } from "../network.js";
import { CpuSampler, machineCpu, peakMemoryMiB } from "../proc.js";
import { DurableLog, padded, readTally, SKELETON_IDENTITIES, SkeletonMerchantDefinition, SkeletonPaymentDefinition } from "./parts.js";
import { appendBytes, callOf, skeletonProcesses, skeletonShop, tallyKey, tallyPerPurchase, type SkeletonMode, type SkeletonRole } from "./wire.js";

export interface SkeletonConfiguration {
  psams: number;
  cardholders: number;
  /** The measuring window. */
  seconds: number;
  warmupSeconds: number;
  /** TLS as the network runs it (mutual inside the operator's network, server TLS for the cardholders), or plaintext on loopback. */
  tls: boolean;
  mode: SkeletonMode;
}

export interface SkeletonResult extends SkeletonConfiguration, LoadResult {
  /** Purchases completed in the whole run (warm-up, window and the ones in flight when it closed): what the per-purchase counts divide by. */
  purchases: number;
  /** CPU per process during the measuring window, % of one core; "bench" is this process, with the cardholders. */
  cpuPercent: Record<string, number>;
  /** CPU per purchase per process during the window, ms (NaN when no purchase completed in it). */
  cpuMsPerPurchase: Record<string, number>;
  /** Durable syncs per purchase per process over the whole run (lib/stats.ts, asked over the launcher's channel). */
  fsyncsPerPurchase: Record<string, number>;
  /** What the servers counted per purchase over the whole run, by "process what" (wire.ts tallyPerPurchase names the expected). */
  tallyPerPurchase: Record<string, number>;
  /** The whole machine's busy CPU during the window, % of one core. */
  machineCpuPercent?: number;
  /** Peak resident memory (VmHWM) per process, MiB. */
  peakMemoryMiB: Record<string, number>;
  serviceLogs: LogFindings;
}

const SCRIPTS: Record<Exclude<SkeletonRole, "bench">, string> = {
  concentrator: "bench/skeleton/concentrator.ts",
  terminal: "bench/skeleton/terminal.ts",
  payment: "bench/skeleton/payment.ts",
  validation: "bench/skeleton/validation.ts",
  merchant: "bench/skeleton/merchant.ts",
};

/** The servers that count what they receive (the terminal host serves nothing: the concentrator counts its messages). */
const SERVERS = ["concentrator", "payment", "validation", "merchant"] as const;
const KINDS: Record<(typeof SERVERS)[number], Kind> = { concentrator: "concentrator", payment: "payment", validation: "validation", merchant: "merchant" };

/** How long a run waits for the work a purchase leaves running after its answer (SERVER_COMPARES: the card's proof to the PSAM). */
const QUIET_WITHIN_MS = 10_000;

/** The skeleton's processes, running, with the clients the cardholders and the operator use. */
export class SkeletonNetwork {
  private readonly channels: Channel[] = [];
  /** Each cardholder's card: its one durable append per DEBIT. */
  readonly cards: DurableLog[] = [];
  readonly names: ReturnType<typeof skeletonProcesses>;
  readonly launcher: Launcher;
  private stopped = false;
  merchant!: Client<typeof SkeletonMerchantDefinition, DeadlineOptions>;
  payment!: Client<typeof SkeletonPaymentDefinition, DeadlineOptions>;
  private tallies!: Record<(typeof SERVERS)[number], Channel>;

  private constructor(
    readonly dir: string,
    readonly mode: SkeletonMode,
  ) {
    this.names = skeletonProcesses(mode);
    this.launcher = new Launcher(join(dir, "logs"), { env: SERVICE_ENV });
  }

  /** Starts every process on free loopback ports, over a fresh folder, with TLS from a throwaway CA or plaintext. */
  static async start(c: { psams: number; cardholders: number; tls: boolean; mode: SkeletonMode }): Promise<SkeletonNetwork> {
    const net = new SkeletonNetwork(await mkdtemp(join(tmpdir(), "netpurse-bench-skeleton-")), c.mode);
    try {
      await net.launch(c);
      return net;
    } catch (e) {
      await net.stop();
      throw e;
    }
  }

  private async launch(c: { psams: number; cardholders: number; tls: boolean; mode: SkeletonMode }): Promise<void> {
    const { dir, names } = this;
    const pki = join(dir, "pki");
    if (c.tls) {
      const ca = await CertificateAuthority.init(pki);
      const id = SKELETON_IDENTITIES;
      for (const identity of [id.concentrator, id.terminal, id.payment, id.validation, id.operator, id.merchant(skeletonShop(c.mode))])
        await ca.issue(identity);
    }
    const common = ["--mode", c.mode, ...(c.tls ? ["--pki", pki] : [])];
    const data = (role: string) => ["--dir", join(dir, role)];
    for (const role of Object.keys(SCRIPTS)) await mkdir(join(dir, role));
    const start = (role: Exclude<SkeletonRole, "bench">, args: string[]) => this.launcher.start(names[role], SCRIPTS[role], [...args, ...common]);
    const concentrator = (await start("concentrator", ["--listen", "127.0.0.1:0"])).address;
    await start("terminal", ["--concentrator", concentrator, "--psams", String(c.psams), ...data("terminal")]);
    const payment = (await start("payment", ["--listen", "127.0.0.1:0", "--concentrator", concentrator, "--psams", String(c.psams), ...data("payment")]))
      .address;
    const validation = (await start("validation", ["--listen", "127.0.0.1:0"])).address;
    const merchant = (await start("merchant", ["--listen", "127.0.0.1:0", "--validation", validation, ...data("merchant")])).address;
    const addresses: Record<(typeof SERVERS)[number], string> = { concentrator, payment, validation, merchant };

    // Cardholders hold the CA bundle only, as the client daemon does; the operator reads the servers' counts.
    const cardholder = c.tls ? await Security.forCardholder(pkiPaths(pki).caCert) : Security.insecure();
    const operator = c.tls ? await Security.forService(pki, SKELETON_IDENTITIES.operator) : Security.insecure();
    const channel = (address: string, security: Security, kind: Kind) => {
      const ch = openChannel(address, security.channel({ kind }));
      this.channels.push(ch);
      return ch;
    };
    // One channel per server, shared by every cardholder, as on one client host.
    this.merchant = clientFactory().create(SkeletonMerchantDefinition, channel(merchant, cardholder, "merchant"));
    this.payment = clientFactory().create(SkeletonPaymentDefinition, channel(payment, cardholder, "payment"));
    this.tallies = Object.fromEntries(SERVERS.map((s) => [s, channel(addresses[s], operator, KINDS[s])])) as Record<(typeof SERVERS)[number], Channel>;
    await mkdir(join(dir, "cards"));
    for (let i = 0; i < c.cardholders; i++) this.cards.push(await DurableLog.open(join(dir, "cards", `cardholder-${i}.log`)));
  }

  /** Process ids by name, this process ("bench") included. */
  pids(): Map<string, number> {
    const out = new Map<string, number>([[this.names.bench, process.pid]]);
    for (const role of Object.keys(SCRIPTS) as (keyof typeof SCRIPTS)[]) {
      const pid = this.launcher.pid(this.names[role]);
      if (pid !== undefined) out.set(this.names[role], pid);
    }
    return out;
  }

  /** What the servers have counted so far, by "process what". */
  async tally(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for (const s of SERVERS) for (const [k, n] of Object.entries(await readTally(this.tallies[s]))) out[`${this.names[s]} ${k}`] = n;
    return out;
  }

  /** Durable syncs each process has made since it started: the services', asked over the launcher's channel, and this process's own. */
  async fsyncs(): Promise<Record<string, number>> {
    const out: Record<string, number> = { [this.names.bench]: processStats().fsyncs };
    for (const name of this.launcher.names()) out[name] = (await this.launcher.stats(name)).fsyncs;
    return out;
  }

  /** Stops every process and removes the folder; safe to call twice (the run's end and a Ctrl-C may race). */
  async stop(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    for (const ch of this.channels.splice(0)) ch.close();
    await this.launcher.stopAll();
    for (const card of this.cards.splice(0)) await card.close();
  }

  /** The service logs' warnings, errors and stray lines; after stop(), so shutdown troubles count too. */
  logFindings(): Promise<LogFindings> {
    return logFindings(join(this.dir, "logs"));
  }

  async discard(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }
}

/** Starts the skeleton's processes, runs cardholders in a closed loop against them, and stops them whatever happens. */
export async function measureSkeleton(c: SkeletonConfiguration): Promise<SkeletonResult> {
  const label = `skeleton ${c.mode}, ${c.psams} PSAM${c.psams === 1 ? "" : "s"}, ${c.cardholders} cardholder${c.cardholders === 1 ? "" : "s"}, TLS ${c.tls ? "on" : "off"}`;
  process.stderr.write(`[${label}] starting the skeleton\n`);
  const net = await SkeletonNetwork.start(c);
  const tidy = async () => {
    await net.stop();
    await net.discard();
  };
  const forget = stopOnInterrupt(tidy);
  try {
    const sizes = {
      order: callOf(c.mode, "CreateOrder").requestBytes,
      draw: callOf(c.mode, "ProcessDrawRequest").requestBytes,
      answer: callOf(c.mode, "CompletePurchase").requestBytes,
      result: callOf(c.mode, "CompleteOrder").requestBytes,
      debit: appendBytes(c.mode, "bench")[0] ?? 0,
    };
    const deadline = { deadline: DEFAULT_DEADLINE_MS };
    let purchases = 0;
    /** One cardholder's purchase: the offer (not timed), then the draw request, the card's DEBIT, the card's answer and the goods. */
    const purchase = async (w: number): Promise<number> => {
      const offer = await net.merchant.createOrder(padded(new Uint8Array(), sizes.order), deadline);
      const id = offer.subarray(0, 16);
      const started = performance.now();
      await net.payment.processDrawRequest(padded(id, sizes.draw), deadline);
      await net.cards[w]?.append(sizes.debit);
      await net.payment.completePurchase(padded(id, sizes.answer), deadline);
      await net.merchant.completeOrder(padded(id, sizes.result), deadline);
      const ms = performance.now() - started;
      purchases++;
      return ms;
    };

    // The services have made no append before the first purchase, so their counts at the end are the run's: they are not asked before
    // the load, which would start their event-loop monitors (lib/stats.ts; a 10 ms timer, about 0.3 % of a core each).
    const ownBefore = processStats().fsyncs;
    const cpu = new CpuSampler(() => net.pids());
    const load = await closedLoop({
      label,
      workers: c.cardholders,
      phases: { warmupMs: c.warmupSeconds * 1000, measureMs: c.seconds * 1000 },
      operation: purchase,
      window: cpu,
    });
    // SERVER_COMPARES leaves the card's proof on its way to the PSAM after each answer: counted once it has landed.
    if (c.mode === "SERVER_COMPARES") {
      const proofs = `${net.names.payment} ${tallyKey.proofRecorded}`;
      const until = Date.now() + QUIET_WITHIN_MS;
      while ((await net.tally())[proofs] !== purchases && Date.now() < until) await sleep(50);
    }
    const fsyncsAfter = await net.fsyncs();
    const counted = await net.tally();
    const peaks: Record<string, number> = {};
    for (const [name, pid] of net.pids()) {
      const mib = peakMemoryMiB(pid);
      if (mib !== undefined) peaks[name] = mib;
    }
    const perPurchase = (n: number) => (purchases > 0 ? n / purchases : NaN);
    const cpuPercent = cpu.percent();
    await net.stop();
    return {
      ...c,
      ...load,
      purchases,
      cpuPercent,
      cpuMsPerPurchase: Object.fromEntries(Object.entries(cpuPercent).map(([name, pct]) => [name, load.perSecond > 0 ? (pct * 10) / load.perSecond : NaN])),
      fsyncsPerPurchase: Object.fromEntries(Object.entries(fsyncsAfter).map(([name, n]) => [name, perPurchase(name === net.names.bench ? n - ownBefore : n)])),
      tallyPerPurchase: Object.fromEntries(
        [...new Set([...Object.keys(counted), ...Object.keys(tallyPerPurchase(c.mode))])].map((k) => [k, perPurchase(counted[k] ?? 0)]),
      ),
      ...machineCpu(cpu),
      peakMemoryMiB: peaks,
      serviceLogs: await net.logFindings(),
    };
  } finally {
    forget();
    await tidy();
  }
}
