// One benchmark configuration's network: a fresh data folder set up by the
// issuer and operator tools, every service its own process, and cardholders
// in this process, each with a software card of its own.

import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { MerchantServiceDefinition } from "../gen/netpurse/merchant/v1/merchant.js";
import { PaymentServiceDefinition } from "../gen/netpurse/payment/v1/payment.js";
import { TerminalConcentratorServiceDefinition } from "../gen/netpurse/terminal/v1/terminal.js";
import type { MerchantClient, PaymentClient, PurchaseContext } from "../client/purchase.js";
import { PurseReader } from "../client/card/purse-reader.js";
import { SoftwareCard } from "../client/card/software-card.js";
import { InProcessTransport } from "../lib/apdu/transport.js";
import { ChannelCache } from "../lib/grpc/client.js";
import { pkiPaths } from "../lib/pki/authority.js";
import { pkiDirOf, Security } from "../lib/pki/security.js";
import { Issuer } from "../services/issuer/issuer.js";
import { launchNetwork, Launcher } from "../services/network/launcher.js";
import { DEFAULT_DEMO, DEMO_SHOP, DEMO_SHOPS, ensureDemoData, EUR, paths } from "../services/network/layout.js";
import { stopOnInterrupt } from "./interrupt.js";
import type { ShopFile } from "../services/merchant/shop.js";

export const TERMINAL_ID = "terminal-1";

/** Service logs keep warnings and errors only: info lines per call would cost the services time and fill the disk. */
export const SERVICE_ENV = { NETPURSE_LOG_LEVEL: "warn" };

/** A shop's confirmation mode without the enum's prefix: PSAM_VERIFIES, SERVER_COMPARES, … */
export const modeOf = (shop: ShopFile) => shop.confirmationMode.replace("CONFIRMATION_MODE_", "");

/** Every confirmation mode, each with its demo shop. */
export const MODES = DEMO_SHOPS.map(({ shop }) => modeOf(shop));

/** The demo shop of a confirmation mode (as MODES names it). */
export function shopForMode(mode: string): ShopFile {
  const shop = DEMO_SHOPS.find(({ shop }) => modeOf(shop) === mode)?.shop;
  if (!shop) throw new Error(`no demo shop in mode ${mode}`);
  return shop;
}

/**
 * Each cardholder's purse: EUR 4000.00 pays for 4040 songs at EUR 0.99,
 * more than one cardholder buys in a default run.
 */
const CARDHOLDER_PURSE = { value: 400_000, maxBalance: 500_000, expiry: "2099-12-31" };

/**
 * How many of each process a network runs (the replicas suite's grid; one
 * of each otherwise): terminal hosts terminal-1…N with the same number of
 * PSAMs each, concentrators, payment server replicas, and the PostgreSQL
 * database every service with a store keeps its state in (SQLite files
 * without one).
 */
export interface NetworkLayout {
  terminals: number;
  concentrators: number;
  paymentServers: number;
  database?: string;
}

const ONE_OF_EACH: NetworkLayout = { terminals: 1, concentrators: 1, paymentServers: 1 };

/** The terminal hosts' ids: terminal-1 (TERMINAL_ID), terminal-2, … */
export const terminalIds = (n: number) => Array.from({ length: n }, (_, i) => `terminal-${i + 1}`);

/** The names launchNetwork gives the processes it starts (with the demo shop), and this one, where the cardholders run. */
export const PROCESS = {
  concentrator: "concentrator",
  terminal: TERMINAL_ID,
  payment: "payment",
  validation: "merchant-validation",
  merchant: `merchant-${DEMO_SHOP.merchantId}`,
  clientDaemon: "client-daemon",
  load: "load",
  bank: "bank",
  clearing: "clearing",
  bench: "bench",
} as const;

/**
 * One channel per service address, shared by every cardholder, as on one
 * client host; one client per service and channel, as the client daemon does. Cardholders
 * reach the payment server and the merchant as the client daemon does, with
 * server TLS (the CA bundle only, no certificate of their own); the pool
 * check reaches the concentrator as the operator, with mutual TLS.
 */
export class ServiceClients {
  private readonly cardholderChannels: ChannelCache;
  private readonly operatorChannels: ChannelCache;

  /** `security`: the cardholders' (a CA bundle) and the operator's (its identity), both Security.insecure() for --insecure. */
  constructor(security: { cardholder: Security; operator: Security }) {
    this.cardholderChannels = new ChannelCache(security.cardholder);
    this.operatorChannels = new ChannelCache(security.operator);
  }

  payment = (address: string): PaymentClient => this.cardholderChannels.client(PaymentServiceDefinition, address, { kind: "payment" });
  merchant = (address: string): MerchantClient => this.cardholderChannels.client(MerchantServiceDefinition, address, { kind: "merchant" });
  concentrator = (address: string) => this.operatorChannels.client(TerminalConcentratorServiceDefinition, address, { kind: "concentrator" });

  close(): void {
    this.cardholderChannels.close();
    this.operatorChannels.close();
  }
}

export interface LogFindings {
  /** Warning and error lines, and any line that is not a service's own log line (a crash, a Node warning). */
  count: number;
  /** The first few distinct ones, each with its log file. */
  samples: string[];
}

export class BenchNetwork {
  readonly clients: ServiceClients;
  readonly launcher: Launcher;
  addresses: Record<string, string> = {};
  private stopped = false;

  private constructor(
    readonly dir: string,
    readonly shop: ShopFile,
    readonly daemonCardPath: string,
    readonly cardholderCards: string[],
    /** Every link TLS (mutual inside the operator's network, server TLS for the cardholders), or plaintext. */
    readonly tls: boolean,
    security: { cardholder: Security; operator: Security },
    serviceEnv: NodeJS.ProcessEnv,
    readonly layout: NetworkLayout,
  ) {
    this.launcher = new Launcher(this.logDir, { env: { ...SERVICE_ENV, ...serviceEnv } });
    this.clients = new ServiceClients(security);
  }

  get logDir(): string {
    return join(this.dir, "logs");
  }

  /**
   * Sets up a fresh data folder: issuer keys, `psams` PSAMs on one terminal
   * host, one shop (the demo shop unless told), and a card per cardholder.
   * `serviceEnv` adds variables to every service's environment (a profiler).
   */
  /**
   * A fresh network for one measurement: prepared, started with its PSAMs,
   * its cardholders' cards open and the merchant's client made; `fn` runs
   * on it, and the network is stopped (and its folder removed unless kept)
   * whatever happens, Ctrl-C included.
   */
  static async session<T>(
    p: Parameters<typeof BenchNetwork.prepare>[0] & { keepData: boolean },
    fn: (net: BenchNetwork, cardholders: PurchaseContext[], merchant: MerchantClient) => Promise<T>,
  ): Promise<T> {
    const net = await BenchNetwork.prepare(p);
    const tidy = async () => {
      await net.stop();
      if (!p.keepData) await net.discard();
    };
    const forget = stopOnInterrupt(tidy);
    try {
      await net.launch(p.psams);
      const cardholders = await Promise.all(Array.from({ length: p.cardholders }, (_, i) => net.cardholder(i)));
      return await fn(net, cardholders, net.clients.merchant(net.merchantAddress));
    } finally {
      forget();
      await tidy();
    }
  }

  /** `layout`: one of each process unless told; `psams` is then each terminal host's. */
  static async prepare(p: {
    psams: number;
    cardholders: number;
    shop?: ShopFile;
    tls?: boolean;
    serviceEnv?: NodeJS.ProcessEnv;
    layout?: NetworkLayout;
  }): Promise<BenchNetwork> {
    const shop = p.shop ?? DEMO_SHOP;
    const layout = p.layout ?? ONE_OF_EACH;
    const dir = await mkdtemp(join(tmpdir(), `netpurse-bench-${shop.merchantId}-p${p.psams}-c${p.cardholders}-`));
    // The demo card is the client daemon's, which launchNetwork starts; cardholders here pay with cards of their own.
    const { cardPath } = await ensureDemoData(dir, {
      terminals: terminalIds(layout.terminals).map((id) => ({ id, psams: p.psams })),
      shops: [shop],
      card: DEFAULT_DEMO.card,
      concentrators: layout.concentrators,
      ...(layout.database !== undefined ? { database: layout.database } : {}),
    });
    const tls = p.tls ?? true;
    const security = tls
      ? {
          cardholder: await Security.forCardholder(pkiPaths(pkiDirOf(dir)).caCert),
          operator: await Security.forService(pkiDirOf(dir), { kind: "operator", id: "operator" }),
        }
      : { cardholder: Security.insecure(), operator: Security.insecure() };
    return new BenchNetwork(dir, shop, cardPath, await personaliseCardholderCards(dir, p.cardholders), tls, security, p.serviceEnv ?? {}, layout);
  }

  /**
   * Starts every service on free loopback ports and waits until every
   * payment server can see all `psams` PSAMs of every terminal host.
   * `offerPaymentServer` is the payment server address the merchant names in
   * its offers, when cardholders must reach it another way (through a delay
   * proxy). `psamReaders`: the
   * terminal host's PSAMs and the daemon's card are behind PC/SC instead,
   * the PSAMs in the readers matching it (an emulator must serve them).
   */
  async launch(psams: number, o: { offerPaymentServer?: string; psamReaders?: string } = {}): Promise<void> {
    // The terminal host closes a PSAM's batch at 200 records by default, below the PSAM's capacity of 256, so no run fills a PSAM.
    this.addresses = await launchNetwork(this.launcher, {
      data: this.dir,
      terminals: terminalIds(this.layout.terminals).map((id) => ({ id })),
      merchants: [{ id: this.shop.merchantId }],
      cardPath: this.daemonCardPath,
      insecure: !this.tls,
      concentrators: this.layout.concentrators,
      paymentServers: this.layout.paymentServers,
      ...(this.layout.database !== undefined ? { database: this.layout.database } : {}),
      ...(o.offerPaymentServer ? { offerPaymentServer: o.offerPaymentServer } : {}),
      ...(o.psamReaders !== undefined ? { psamReaders: o.psamReaders } : {}),
    });
    await this.poolReady(psams);
  }

  get merchantAddress(): string {
    return this.addresses[`merchant:${this.shop.merchantId}`]!;
  }

  get paymentAddress(): string {
    return this.addresses.payment!;
  }

  /** A cardholder: a software card behind the in-process APDU transport, and the clients payOffer needs. */
  async cardholder(i: number): Promise<PurchaseContext> {
    const card = await SoftwareCard.open(this.cardholderCards[i]!);
    return { reader: new PurseReader(new InProcessTransport(card)), payment: this.clients.payment, merchant: this.clients.merchant };
  }

  /** Process ids by name (PROCESS, with this network's merchant), of those running. */
  processes(): Map<string, number> {
    const out = new Map<string, number>();
    const merchant = `merchant-${this.shop.merchantId}`;
    for (const name of [...Object.values(PROCESS).filter((n) => n !== PROCESS.merchant), merchant]) {
      const pid = name === PROCESS.bench ? process.pid : this.launcher.pid(name);
      if (pid !== undefined) out.set(name, pid);
    }
    return out;
  }

  /** Process ids by name of every service running (whatever the layout), and this one's as PROCESS.bench. */
  allProcesses(): Map<string, number> {
    const out = new Map<string, number>();
    for (const name of this.launcher.names()) {
      const pid = this.launcher.pid(name);
      if (pid !== undefined) out.set(name, pid);
    }
    out.set(PROCESS.bench, process.pid);
    return out;
  }

  /** Stops every service; safe to call twice (the run's end and a Ctrl-C may race). */
  stop = async (): Promise<void> => {
    if (this.stopped) return;
    this.stopped = true;
    this.clients.close();
    await this.launcher.stopAll();
  };

  async discard(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }

  /**
   * Reads the service logs for trouble; call after stop(), so shutdown
   * problems count too. Without TLS, each server's start-up INSECURE warning
   * is expected and not counted; with TLS, it would be trouble.
   */
  logFindings(maxSamples = 5): Promise<LogFindings> {
    return logFindings(this.logDir, maxSamples, { insecureExpected: !this.tls });
  }

  /**
   * Every terminal host attached to a concentrator with all its PSAMs, and
   * every payment server (each replica) at every concentrator: purchases
   * can be routed to any PSAM.
   */
  private async poolReady(psams: number, timeoutMs = 30_000): Promise<void> {
    const concentrators = Object.entries(this.addresses)
      .filter(([name]) => name === "concentrator" || name.startsWith("concentrator:"))
      .map(([, address]) => this.clients.concentrator(address));
    const terminals = terminalIds(this.layout.terminals);
    const until = Date.now() + timeoutMs;
    for (;;) {
      const lists = await Promise.all(concentrators.map((c) => c.listTerminals({})));
      const attached = lists.flatMap((r) => r.terminals);
      const ready =
        terminals.every((id) => attached.find((t) => t.terminalId === id)?.slots.length === psams) &&
        lists.every((r) => r.paymentServers.length >= this.layout.paymentServers);
      if (ready) return;
      if (Date.now() > until) {
        const seen = attached.map((t) => `${t.terminalId} with ${t.slots.length}`).join(", ") || "no terminal host";
        const servers = lists.map((r) => r.paymentServers.length).join(", ");
        throw new Error(
          `the pool did not come up within ${timeoutMs} ms: wanted ${terminals.length} terminal host(s) with ${psams} PSAMs each and ${this.layout.paymentServers} payment server(s) at each of ${concentrators.length} concentrator(s); saw ${seen}, and ${servers} payment server(s)`,
        );
      }
      await sleep(100);
    }
  }
}

/** The warn and error lines (and stray output) in every log file of `logDir`; with `insecureExpected`, not the INSECURE start-up warning. */
export async function logFindings(logDir: string, maxSamples = 5, o: { insecureExpected?: boolean } = {}): Promise<LogFindings> {
  const findings: LogFindings = { count: 0, samples: [] };
  const seen = new Set<string>();
  for (const file of (await readdir(logDir)).sort()) {
    for (const line of (await readFile(join(logDir, file), "utf8")).split("\n")) {
      if (!isTrouble(line) || (o.insecureExpected && INSECURE_WARNING.test(line))) continue;
      findings.count++;
      // Transaction ids and the refs of INTERNAL answers differ from line to line of one cause.
      const gist = line
        .replace(/^\S+Z /, "")
        .replace(/[0-9a-f]{8}-[0-9a-f-]{27}/gi, "<transaction>")
        .replace(/ ref=[0-9a-f]{8} /g, " ref=<ref> ");
      if (!seen.has(gist) && seen.size < maxSamples) {
        seen.add(gist);
        findings.samples.push(`${file}: ${gist}`);
      }
    }
  }
  return findings;
}

/** A software card per cardholder, personalised by the data folder's issuer, in DATA/cards. */
export async function personaliseCardholderCards(dir: string, count: number): Promise<string[]> {
  const issuer = await Issuer.open(paths(dir).issuer);
  try {
    const cards: string[] = [];
    for (let i = 0; i < count; i++) {
      const path = join(paths(dir).cards, `cardholder-${i}.card.json`);
      await issuer.personaliseCard({
        path,
        currency: EUR,
        exponent: 2,
        initialValue: CARDHOLDER_PURSE.value,
        maxBalance: CARDHOLDER_PURSE.maxBalance,
        expiry: CARDHOLDER_PURSE.expiry,
      });
      cards.push(path);
    }
    return cards;
  } finally {
    await issuer.close();
  }
}

/** The warning every server started with --insecure logs once (lib/grpc/server.ts), exactly; a logger's name may hold a space ("merchant demo-shop"). */
const INSECURE_WARNING =
  /^\S+Z \S.* warn INSECURE: plaintext, no peer is authenticated and every RPC is open to anyone who reaches this port; for local debugging only address=\S+$/;

/** Service log lines are "time service level message"; with warn as the level, what remains is worth reading, except the start and stop lines. */
function isTrouble(line: string): boolean {
  if (!line.trim()) return false;
  if (/ listening on /.test(line) || /: SIG(TERM|INT), shutting down$/.test(line)) return false;
  return !/^\S+Z \S+ (debug|info) /.test(line);
}
