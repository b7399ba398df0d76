// The whole netpurse network started in this process, each service on its
// own loopback port with real gRPC between them, over a fresh data folder.

import { bearer, clientFactory, openChannel } from "../../lib/grpc/client.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { MerchantValidationServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant_validation.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { startClientDaemon } from "../../client/daemon/server.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { startMerchant } from "../../services/merchant/server.js";
import { DEMO_BANK, DEMO_SHOP, DEMO_SHOPS, EUR, ensureDemoData, paths } from "../../services/network/layout.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import { startPaymentServer } from "../../services/payment/server.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import { startBankServer } from "../../services/bank/server.js";
import { startLoadServer } from "../../services/load/server.js";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { startClearing } from "../../services/clearing/server.js";
import { tempDir } from "./fixtures.js";
import { pcscUnavailable, skipLoudly } from "./pcsc.js";
import type { ReaderSlot } from "../../services/emulator/emulator.js";
import { startEmulatorProcess, type EmulatorProcess } from "../../services/emulator/emulator-process.js";
import { existsSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { join } from "node:path";
import { BenefitsServiceDefinition } from "../../gen/netpurse/benefits/v1/benefits.js";
import { confirmationModeFromJSON } from "../../gen/netpurse/card/v1/card.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { startBenefits } from "../../services/benefits/server.js";
import { DEMO_SITE, PROGRAMME_HSM_FILE, SITE_FILE, type SiteFile } from "../../services/benefits/site.js";
import { Issuer } from "../../services/issuer/issuer.js";
import type { ShopFile } from "../../services/merchant/shop.js";
import { registerMerchant } from "../../services/operator/operator.js";
import { CertificateAuthority, pkiPaths } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf, Security } from "../../lib/pki/security.js";
import type { StoreConfig } from "../../lib/store/postgres.js";
import { startPostgres, type TestPostgres } from "./postgres.js";

export interface NetworkOptions {
  terminals?: { id: string; psams: number; answerDelayMs?: number }[];
  holdTimeoutMs?: number;
  maxPsamWaitMs?: number;
  jobTimeoutMs?: number;
  keepaliveIntervalMs?: number;
  cardValue?: number;
  proofTimeoutMs?: number;
  sweepEveryMs?: number;
  /** How long a draw request may stay without its DEBIT command before the payment server ends it. */
  abandonReceivedAfterMs?: number;
  /** The bank's cap on holds waiting for their confirmation, per account (default 3). */
  maxHoldsPerAccount?: number;
  /**
   * The card and every PSAM behind real PC/SC readers: emulated readers in a
   * pcscd of the test's own (test/support/pcsc.ts), the daemon and the
   * terminal hosts reaching them through pcsclite. The suite is skipped
   * loudly (in its before hook) where PC/SC cannot be set up.
   */
  pcsc?: Mocha.Context;
  /**
   * Loyalty (docs/loyalty.md): programme 1001 "Skyways Miles", an
   * authentication PSAM and a points PSAM beside the first terminal host's
   * money PSAMs, a points purse on the card holding `cardPoints`, the four
   * demo shops enrolled at the Skyways site (`pointsPerUnit` points per
   * euro, default 10), and one benefits site per confirmation mode
   * (LOYALTY_SITES) started in-process with startBenefits, each registered
   * with the operator in its mode, the demo card its member's.
   */
  loyalty?: { cardPoints?: number; pointsPerUnit?: number };
  /**
   * A PostgreSQL database (postgres:// URL) for every service that has a
   * store of its own to keep: payment server, clearing, validation, shops,
   * benefits sites, load server and bank, each in its schema. Without it,
   * NETPURSE_TEST_STORE=postgres gives each network a fresh database of its
   * own (test/support/postgres.ts), dropped when the network closes; else
   * each service keeps its SQLite file in the data folder, as it does with
   * `false` whatever NETPURSE_TEST_STORE says (a test of SQLite itself).
   * Terminal hosts and the client daemon keep their local SQLite store
   * either way.
   */
  database?: string | false;
}

/** Whether NETPURSE_TEST_STORE asks every network for a PostgreSQL database of its own. */
export const testStoreIsPostgres = () => process.env.NETPURSE_TEST_STORE === "postgres";

/**
 * A database of a network's own. The throwaway server is kept for the
 * process's later networks (one caller more that never leaves; the server
 * and its folder go with the process): made again for each, it would cost
 * a second and a half a network.
 */
export async function networkDatabase(): Promise<TestPostgres> {
  if (!process.env.NETPURSE_TEST_DATABASE_URL) keepServer ??= startPostgres();
  await keepServer;
  return startPostgres();
}
let keepServer: Promise<TestPostgres> | undefined;

/** The benefits sites of a network with loyalty: one per confirmation mode, the Skyways site (DEMO_SITE) the one the demo shops are enrolled at. */
export const LOYALTY_SITES = [
  { mode: "PSAM_VERIFIES", siteId: DEMO_SITE.merchantId },
  { mode: "SERVER_COMPARES", siteId: "skyways-server" },
  { mode: "CLIENT_COMPARES", siteId: "skyways-client" },
  { mode: "MERCHANT_COMPARES", siteId: "skyways-merchant" },
] as const;

export async function startNetwork(o: NetworkOptions = {}) {
  // The emulator serves the psam-N files only: the authentication and points PSAMs have no reader.
  if (o.loyalty && o.pcsc) throw new Error("startNetwork: loyalty with pcsc is not supported");
  const { dir: data, cleanup } = await tempDir("netpurse-net-");
  const terminals = o.terminals ?? [{ id: "terminal-1", psams: 2 }];
  // Asked for by NETPURSE_TEST_STORE, PostgreSQL must be had: a network quietly on SQLite would pass for a PostgreSQL run.
  const postgres: TestPostgres | undefined = o.database === undefined && testStoreIsPostgres() ? await networkDatabase() : undefined;
  const database = o.database === false ? undefined : (o.database ?? postgres?.url);
  /**
   * The `store` of every service with one (spread into its config): the network's database, or the default SQLite file.
   * Five connections each: the thirteen stores of a network with loyalty (four shops, four sites) stay within the test server's hundred.
   */
  const storeOption: { store?: StoreConfig } = database ? { store: { location: database, poolSize: 5 } } : {};
  const { cardPath } = await ensureDemoData(data, {
    // The demo account is opened where the bank keeps its books.
    ...(database ? { database } : {}),
    terminals,
    shops: DEMO_SHOPS.map((d) => d.shop),
    card: { name: "demo", value: o.cardValue ?? 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
    ...(o.loyalty
      ? {
          loyalty: {
            // Replaced in each shop.json by the site's own address once it listens (startLoyaltySites).
            siteAddress: "127.0.0.1:1",
            enrolled: DEMO_SHOPS.map((d) => d.shop.merchantId),
            pointsPerUnit: o.loyalty.pointsPerUnit ?? 10,
            cardPoints: o.loyalty.cardPoints ?? 0,
          },
        }
      : {}),
  });
  const p = paths(data);
  if (o.loyalty) await provisionLoyaltySites(p);
  const readers = o.pcsc ? await emulatorOrSkip(o.pcsc, cardPath, await psamFilesOf(p, terminals)) : undefined;
  const security = await testSecurity(data);
  const concentrator = await startConcentrator({
    security: await security.of("concentrator", "concentrator-1"),
    psamRegistry: psamRegistryPath(data),
    listen: "127.0.0.1:0",
    keepaliveIntervalMs: o.keepaliveIntervalMs ?? 1_000,
  });
  // Clearing before those who send to it: terminal hosts their closed batches, the load server its settled loads.
  const clearingStarted = await startClearing({
    security: await security.of("clearing", CLEARING_ID),
    listen: "127.0.0.1:0",
    dir: p.clearing,
    psamRegistry: psamRegistryPath(data),
    ...storeOption,
  });
  // Tests may stop clearing themselves (an outage): closing it again at the end does nothing.
  let clearingClosed: Promise<void> | undefined;
  const clearingServer = { ...clearingStarted, close: () => (clearingClosed ??= clearingStarted.close()) };
  const hosts = new Map<string, Awaited<ReturnType<typeof startTerminalHost>>>();
  const startHost = async (t: { id: string; answerDelayMs?: number }) => {
    const h = await startTerminalHost({
      security: await security.of("terminal", t.id),
      terminalId: t.id,
      concentrator: concentrator.address,
      clearingAddress: clearingServer.address,
      dir: p.terminal(t.id),
      ...(t.answerDelayMs ? { answerDelayMs: t.answerDelayMs } : {}),
      ...(readers ? { psamReaders: psamReadersOf(readers.readers, p.terminal(t.id)) } : {}),
    });
    await h.host.whenConnected();
    hosts.set(t.id, h);
    return h;
  };
  for (const t of terminals) await startHost(t);
  const payment = await startPaymentServer({
    security: await security.of("payment", "payment-1"),
    listen: "127.0.0.1:0",
    dir: p.payment,
    ...storeOption,
    concentrator: concentrator.address,
    ...(o.holdTimeoutMs ? { holdTimeoutMs: o.holdTimeoutMs } : {}),
    ...(o.maxPsamWaitMs ? { maxPsamWaitMs: o.maxPsamWaitMs } : {}),
    ...(o.jobTimeoutMs ? { jobTimeoutMs: o.jobTimeoutMs } : {}),
    ...(o.proofTimeoutMs ? { proofTimeoutMs: o.proofTimeoutMs } : {}),
    ...(o.sweepEveryMs ? { sweepEveryMs: o.sweepEveryMs } : {}),
    ...(o.abandonReceivedAfterMs ? { abandonReceivedAfterMs: o.abandonReceivedAfterMs } : {}),
  });
  await payment.whenConnected();
  // With loyalty, the first host holds an authentication PSAM and a points PSAM besides.
  await waitFor(() => payment.pool.counts().total === terminals.reduce((n, t) => n + t.psams, 0) + (o.loyalty ? 2 : 0));
  const validation = await startMerchantValidation({
    security: await security.of("validation", "validation-1"),
    listen: "127.0.0.1:0",
    dir: p.validation,
    ...storeOption,
    paymentServer: payment.address,
    reportEveryMs: 500,
  });
  // The sites before the shops: an enrolled shop.json must name where its site listens.
  const sites = o.loyalty ? await startLoyaltySites(p, security, validation.address, payment.address, storeOption) : [];
  const shops = await Promise.all(
    DEMO_SHOPS.map(async (d) =>
      startMerchant({
        security: await security.of("merchant", d.shop.merchantId),
        listen: "127.0.0.1:0",
        dir: p.merchant(d.shop.merchantId),
        ...storeOption,
        validation: validation.address,
        paymentServer: payment.address,
      }),
    ),
  );
  const merchant = shops[0]!;
  const load = await startLoadServer({
    security: await security.of("load", "load-1"),
    listen: "127.0.0.1:0",
    dir: p.load,
    ...storeOption,
    clearing: clearingServer.address,
  });
  const bank = await startBankServer({
    security: await security.of("bank", DEMO_BANK.bankId),
    listen: "127.0.0.1:0",
    dir: p.bank,
    ...storeOption,
    loadServer: load.address,
    ...(o.maxHoldsPerAccount ? { maxHoldsPerAccount: o.maxHoldsPerAccount } : {}),
  });
  // The daemon on its Unix socket, p.client/run/daemon.sock (the temporary folder keeps the path well under the 107 bytes a socket address holds).
  const daemon = await startClientDaemon({
    security: security.cardholder,
    card: readers ? { reader: readers.readers.find((r) => r.kind === "card")!.name } : cardPath,
    dir: p.client,
    resumeEveryMs: 3_600_000,
  });

  const factory = clientFactory();
  // The tests call as the parts that may call each RPC: the operator (records, the pool), a merchant (its validation), the public (the rest).
  const operator = await security.of("operator", "operator");
  const asMerchant = await security.of("merchant", DEMO_SHOP.merchantId);
  const channels = [
    openChannel(payment.address, operator.channel({ kind: "payment" })),
    openChannel(merchant.address, security.cardholder.channel({ kind: "merchant" })),
    openChannel(validation.address, asMerchant.channel({ kind: "validation" })),
    openChannel(concentrator.address, operator.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 }),
    openChannel(daemon.address, { insecure: true }),
    openChannel(bank.address, security.cardholder.channel({ kind: "bank" })),
    openChannel(load.address, security.cardholder.channel({ kind: "load" })),
    openChannel(clearingServer.address, operator.channel({ kind: "clearing" })),
  ];
  const [pc, mc, vc, cc, dc, bc, lc, clc] = channels as [ReturnType<typeof openChannel>, ...ReturnType<typeof openChannel>[]];
  /** Clearing as the operator calls it: settlement, statements, batches, the audit. */
  const clearing = factory.create(ClearingServiceDefinition, clc!);
  const shopChannels = shops.map((s) => openChannel(s.address, security.cardholder.channel({ kind: "merchant" })));
  // The load server as the operator sees it: the whole record of any load (GetLoad), where the public sees its state only.
  const loadAsOperator = openChannel(load.address, operator.channel({ kind: "load" }));
  /** The demo shop of each confirmation mode, by merchant id. */
  const merchants = Object.fromEntries(DEMO_SHOPS.map((d, i) => [d.shop.merchantId, factory.create(MerchantServiceDefinition, shopChannels[i]!)]));
  /**
   * With loyalty, each benefits site by its id: the server, the gate
   * cardholders reach it through (its offers and grants name the gate; the
   * enrolled shops call the server directly), and its MerchantService and
   * BenefitsService as a cardholder calls them, directly.
   */
  const siteChannels: ReturnType<typeof openChannel>[] = [];
  const loyaltySites = Object.fromEntries(
    sites.map((s) => {
      const channel = openChannel(s.server.address, security.cardholder.channel({ kind: "merchant", id: s.siteId }));
      siteChannels.push(channel);
      return [s.siteId, { ...s, shop: factory.create(MerchantServiceDefinition, channel), benefits: factory.create(BenefitsServiceDefinition, channel) }];
    }),
  );
  /** The access token of each account a test logged in to, by account id; and the channel of the account holders' bank clients. */
  const bankTokens = new Map<string, string>();
  const holderChannel = openChannel(bank.address, security.cardholder.channel({ kind: "bank" }));
  channels.push(holderChannel);
  const net = {
    data,
    paths: p,
    /** The PostgreSQL database the services keep their state in, or undefined: each its SQLite file in the data folder. */
    database,
    /** Spread into the config of a service a test starts again (or starts beside the network's) to keep it where the network keeps it. */
    storeOption,
    security,
    cardPath,
    /** With pcsc: the emulator (a child process) and its pcscd; the card's reader first, then each terminal's PSAMs'. */
    readers,
    concentrator,
    hosts,
    startHost,
    payment,
    validation,
    merchant,
    shops,
    merchants,
    sites: loyaltySites,
    daemon,
    bank,
    load,
    clearingServer,
    clearing,
    clients: {
      bank: factory.create(BankServiceDefinition, bc!),
      load: factory.create(LoadServiceDefinition, lc!),
      loadAsOperator: factory.create(LoadServiceDefinition, loadAsOperator),
      payment: factory.create(PaymentServiceDefinition, pc),
      merchant: factory.create(MerchantServiceDefinition, mc!),
      validation: factory.create(MerchantValidationServiceDefinition, vc!),
      concentrator: factory.create(TerminalConcentratorServiceDefinition, cc!),
      cardholder: factory.create(CardholderServiceDefinition, dc!),
    },
    /** Logs in to the bank as the holder of `accountId`; the token is kept for `bankAs`. */
    async loginAs(accountId: string, password: string): Promise<string> {
      const { accessToken } = await net.clients.bank.login({ accountId, password });
      bankTokens.set(accountId, accessToken);
      return accessToken;
    },
    /** The bank as the holder of `accountId` (logged in with `loginAs`): every call carries the account's access token. */
    bankAs(accountId: string) {
      const token = bankTokens.get(accountId);
      if (!token) throw new Error(`no access token for account ${accountId}: log in first (loginAs)`);
      return factory.create(BankServiceDefinition, holderChannel, { "*": { metadata: bearer(token) } });
    },
    /** The access token `loginAs` got for `accountId`. */
    bankToken(accountId: string): string {
      const token = bankTokens.get(accountId);
      if (!token) throw new Error(`no access token for account ${accountId}: log in first (loginAs)`);
      return token;
    },
    async close() {
      for (const c of [...channels, ...shopChannels, ...siteChannels, loadAsOperator]) c.close();
      await daemon.close();
      // Tests may restart these two: close whichever runs now.
      await net.bank.close();
      await net.load.close();
      for (const s of shops) await s.close();
      for (const s of sites) {
        await s.gate.close();
        await s.server.close();
      }
      await validation.close();
      await payment.close();
      for (const h of hosts.values()) await h.close();
      await clearingServer.close();
      await concentrator.close();
      await readers?.close();
      await postgres?.stop();
      await cleanup();
    },
  };
  return net;
}

/**
 * The benefits sites other than the Skyways site ensureDemoData made: each
 * registered with the operator (payment server, validation service,
 * clearing) in its confirmation mode, with its programme security module and
 * the Skyways site's rewards and members, enrolling no shop.
 */
async function provisionLoyaltySites(p: ReturnType<typeof paths>): Promise<void> {
  const skyways = await readJson<SiteFile>(join(p.site(DEMO_SITE.merchantId), SITE_FILE));
  if (skyways.confirmationMode !== "CONFIRMATION_MODE_PSAM_VERIFIES")
    throw new Error(`the Skyways site is in ${skyways.confirmationMode}, not LOYALTY_SITES' PSAM_VERIFIES`);
  const issuer = await Issuer.open(p.issuer);
  try {
    for (const { mode, siteId } of LOYALTY_SITES) {
      if (siteId === DEMO_SITE.merchantId) continue;
      const confirmationMode = `CONFIRMATION_MODE_${mode}`;
      await registerMerchant({
        paymentDir: p.payment,
        validationDir: p.validation,
        merchantId: siteId,
        name: `Skyways benefits (${mode})`,
        mode: confirmationModeFromJSON(confirmationMode),
        clearing: { dir: p.clearing, currency: EUR, exponent: 2 },
      });
      await issuer.provisionProgrammeHsm({ path: join(p.site(siteId), PROGRAMME_HSM_FILE), programme: DEMO_SITE.programme.code });
      const site: SiteFile = { ...skyways, merchantId: siteId, name: `Skyways benefits (${mode})`, confirmationMode, enrolled: [] };
      await writeJsonAtomic(join(p.site(siteId), SITE_FILE), site);
    }
  } finally {
    await issuer.close();
  }
}

/** Starts every benefits site behind its gate, then points the enrolled shops' shop.json at the Skyways site's server. */
async function startLoyaltySites(
  p: ReturnType<typeof paths>,
  security: TestSecurity,
  validation: string,
  paymentServer: string,
  storeOption: { store?: StoreConfig },
) {
  const sites: { siteId: string; mode: (typeof LOYALTY_SITES)[number]["mode"]; server: Awaited<ReturnType<typeof startBenefits>>; gate: Gate }[] = [];
  for (const { mode, siteId } of LOYALTY_SITES) {
    const gate = await startGate();
    const server = await startBenefits({
      security: await security.of("merchant", siteId),
      listen: "127.0.0.1:0",
      dir: p.site(siteId),
      ...storeOption,
      validation,
      paymentServer,
      advertise: gate.address,
    });
    gate.relayTo(server.address);
    sites.push({ siteId, mode, server, gate });
  }
  const skyways = sites.find((s) => s.siteId === DEMO_SITE.merchantId);
  if (!skyways) throw new Error("no Skyways site in LOYALTY_SITES");
  for (const d of DEMO_SHOPS) {
    const file = join(p.merchant(d.shop.merchantId), "shop.json");
    const shop = await readJson<ShopFile>(file);
    if (shop.loyalty) await writeJsonAtomic(file, { ...shop, loyalty: { ...shop.loyalty, siteAddress: skyways.server.address } });
  }
  return sites;
}

/**
 * A TCP relay on loopback to a server, the way one party reaches it: down()
 * cuts that party off (connections refused, open ones dropped) while the
 * server runs for everyone else; up() lets it through again on the same
 * port.
 */
export interface Gate {
  address: string;
  relayTo(target: string): void;
  down(): Promise<void>;
  up(): Promise<void>;
  close(): Promise<void>;
}

async function startGate(): Promise<Gate> {
  let target: { host: string; port: number } | undefined;
  const open = new Set<Socket>();
  const server = createServer((inbound) => {
    if (!target) return inbound.destroy();
    const outbound = connect(target.port, target.host);
    for (const s of [inbound, outbound]) {
      open.add(s);
      s.on("error", () => s.destroy()).on("close", () => {
        open.delete(s);
        inbound.destroy();
        outbound.destroy();
      });
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  const listen = (port: number) => new Promise<void>((resolve, reject) => server.once("error", reject).listen(port, "127.0.0.1", () => resolve()));
  await listen(0);
  const port = (server.address() as { port: number }).port;
  const down = async () => {
    if (!server.listening) return;
    const closed = new Promise<void>((resolve) => server.close(() => resolve()));
    for (const s of open) s.destroy();
    await closed;
  };
  return {
    address: `127.0.0.1:${port}`,
    relayTo(address: string) {
      const i = address.lastIndexOf(":");
      target = { host: address.slice(0, i), port: Number(address.slice(i + 1)) };
    },
    down,
    up: async () => {
      if (!server.listening) await listen(port);
    },
    close: down,
  };
}

/** Every PSAM file of every terminal, in order. */
async function psamFilesOf(p: ReturnType<typeof paths>, terminals: { id: string; psams: number }[]): Promise<string[]> {
  return terminals.flatMap((t) => Array.from({ length: t.psams }, (_, i) => join(p.terminal(t.id), "psams", `psam-${i}.psam.json`)));
}

/** A terminal host's --psam-readers: exactly the readers serving the PSAM files of its folder. */
function psamReadersOf(readers: ReaderSlot[], terminalDir: string): string {
  const names = readers.filter((r) => r.kind === "PSAM" && r.file.startsWith(`${terminalDir}/`)).map((r) => r.name.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"));
  return `^(${names.join("|")})$`;
}

/**
 * The card and the PSAMs in emulated readers, served by netpurse-emulator in
 * a child process (a process using pcsclite must not serve cards itself) to a
 * pcscd this process runs; or the suite skipped loudly.
 */
async function emulatorOrSkip(ctx: Mocha.Context, cardPath: string, psams: string[]): Promise<EmulatorProcess> {
  ctx.timeout(60_000);
  const reason = await pcscUnavailable({ binding: true, opensc: false });
  if (reason) skipLoudly(ctx, reason);
  const { dir, cleanup } = await tempDir("netpurse-pcscd-");
  try {
    const e = await startEmulatorProcess({ dir, cards: [cardPath], psams, pcscd: true });
    return { ...e, close: () => e.close().finally(cleanup) };
  } catch (e) {
    await cleanup();
    throw e;
  }
}

export type Network = Awaited<ReturnType<typeof startNetwork>>;

export async function waitFor(cond: () => boolean | Promise<boolean>, timeoutMs = 10_000, what = "condition"): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/**
 * The test network's certificates: what ensureDemoData made, and a key and
 * certificate for any other identity a test plays (issued on first use).
 */
export async function testSecurity(data: string) {
  const dir = pkiDirOf(data);
  const ca = await CertificateAuthority.open(dir);
  return {
    dir,
    /** A cardholder's view: the CA bundle only. */
    cardholder: await Security.forCardholder(join(dir, "ca.crt"), ca.trustDomain),
    /** The security of a service with this identity. */
    async of(kind: Kind, id: string): Promise<Security> {
      if (!existsSync(pkiPaths(dir).cert({ kind, id }))) await ca.issue({ kind, id });
      return Security.forService(dir, { kind, id });
    },
    authority: ca,
  };
}

export type TestSecurity = Awaited<ReturnType<typeof testSecurity>>;
