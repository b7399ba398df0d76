// The whole network as separate processes (the end-to-end tests): each
// service started from its own entry point, over a fresh data folder.

import { freePort } from "../../lib/socket.js";
import { join } from "node:path";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { DEMO_LOYALTY, DEMO_SHOP, DEMO_SHOPS, ensureDemoData, paths, type DemoLoyalty } from "../../services/network/layout.js";
import { DEMO_SITE } from "../../services/benefits/site.js";
import { launchNetwork, Launcher, SCRIPTS } from "../../services/network/launcher.js";
import { tempDir } from "./fixtures.js";
import { networkDatabase, testSecurity, testStoreIsPostgres, waitFor } from "./network.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";

export interface E2EOptions {
  terminals: { id: string; psams: number; start?: boolean; args?: string[] }[];
  paymentArgs?: string[];
  /**
   * The demo loyalty programme (DEMO_LOYALTY, with these changes): its benefits site on a free port, the
   * authentication and points PSAMs on the first terminal host, and the card's points purse.
   */
  loyalty?: Partial<Omit<DemoLoyalty, "siteAddress">>;
  /** Concentrators (default 1); every terminal host and payment server is given them all. */
  concentrators?: number;
  /** Payment servers (default 1): replicas of payment-1 sharing `database`. */
  paymentServers?: number;
  /**
   * The PostgreSQL database (a URL) every service with a store keeps its state in; without it, a fresh database of
   * the network's own under NETPURSE_TEST_STORE=postgres, else their SQLite files (always with `false`).
   */
  database?: string | false;
}

export async function launchE2E(given: E2EOptions) {
  const { dir, cleanup } = await tempDir("netpurse-e2e-");
  // Asked for by NETPURSE_TEST_STORE, PostgreSQL must be had: a network quietly on SQLite would pass for a PostgreSQL run.
  const postgres = given.database === undefined && testStoreIsPostgres() ? await networkDatabase() : undefined;
  const o = { ...given, database: given.database === false ? undefined : (given.database ?? postgres?.url) };
  // The enrolled shops' shop.json names the site's address, so it is chosen before anything starts.
  const loyalty: DemoLoyalty | undefined = o.loyalty ? { ...DEMO_LOYALTY, ...o.loyalty, siteAddress: `127.0.0.1:${await freePort()}` } : undefined;
  const { cardPath } = await ensureDemoData(dir, {
    terminals: o.terminals.map(({ id, psams }) => ({ id, psams })),
    shops: DEMO_SHOPS.map((d) => d.shop),
    card: { name: "demo", value: 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
    ...(loyalty ? { loyalty } : {}),
    ...(o.concentrators ? { concentrators: o.concentrators } : {}),
    ...(o.database ? { database: o.database } : {}),
  });
  const launcher = new Launcher(join(dir, "logs"));
  const addresses = await launchNetwork(launcher, {
    data: dir,
    terminals: o.terminals.filter((t) => t.start !== false).map((t) => ({ id: t.id, ...(t.args ? { args: t.args } : {}) })),
    merchants: DEMO_SHOPS.map((d) => ({ id: d.shop.merchantId })),
    ...(loyalty ? { sites: [{ id: DEMO_SITE.merchantId, listen: loyalty.siteAddress }] } : {}),
    cardPath,
    ...(o.paymentArgs ? { paymentArgs: o.paymentArgs } : {}),
    ...(o.concentrators ? { concentrators: o.concentrators } : {}),
    ...(o.paymentServers ? { paymentServers: o.paymentServers } : {}),
    ...(o.database ? { database: o.database } : {}),
  });
  const factory = clientFactory();
  // The tests look at records and the pool as the operator, shop as a cardholder, and reach the daemon on loopback.
  const security = await testSecurity(dir);
  const operator = await security.of("operator", "operator");
  const channels = new Map<string, ReturnType<typeof openChannel>>();
  const ch = (a: string, s: ChannelSecurity) => channels.get(a) ?? channels.set(a, openChannel(a, s, { maxMessageBytes: 256 * 1024 })).get(a)!;
  const clients = () => ({
    payment: factory.create(PaymentServiceDefinition, ch(addresses.payment!, operator.channel({ kind: "payment" }))),
    merchant: factory.create(MerchantServiceDefinition, ch(addresses[`merchant:${DEMO_SHOP.merchantId}`]!, security.cardholder.channel({ kind: "merchant" }))),
    cardholder: factory.create(CardholderServiceDefinition, ch(addresses.clientDaemon!, { insecure: true })),
    concentrator: factory.create(TerminalConcentratorServiceDefinition, ch(addresses.concentrator!, operator.channel({ kind: "concentrator" }))),
  });
  const c = clients();
  /** Every concentrator, the first one first. */
  const concentrators = Object.entries(addresses)
    .filter(([name]) => name === "concentrator" || name.startsWith("concentrator:"))
    .map(([, a]) => factory.create(TerminalConcentratorServiceDefinition, ch(a, operator.channel({ kind: "concentrator" }))));
  const concentratorList = Object.entries(addresses)
    .filter(([name]) => name === "concentrator" || name.startsWith("concentrator:"))
    .map(([, a]) => a)
    .join(",");
  /** What every concentrator that answers lists now (a killed one is left out). */
  const listings = async () =>
    (await Promise.all(concentrators.map((x) => x.listTerminals({}, { deadline: 3_000 }).catch(() => undefined)))).filter((l) => l !== undefined);
  /** The terminal hosts attached now, at whichever concentrator. */
  const terminalsAttached = async () => (await listings()).flatMap((l) => l.terminals);
  const attached = async (ids: string[]) =>
    waitFor(
      async () => {
        const lists = await listings();
        const terminals = lists.flatMap((r) => r.terminals);
        return ids.every((id) => terminals.some((t) => t.terminalId === id)) && lists.every((r) => r.paymentServers.length >= (o.paymentServers ?? 1));
      },
      20_000,
      `terminals ${ids.join(", ")} attached`,
    );
  await attached(o.terminals.filter((t) => t.start !== false).map((t) => t.id));
  return {
    dir,
    paths: paths(dir),
    cardPath,
    launcher,
    addresses,
    /** With `loyalty`: the demo programme as set up (its siteAddress is where the site listens), else undefined. */
    loyalty,
    clients: c,
    concentrators,
    terminalsAttached,
    attached,
    /** Every concentrator's address, as terminal hosts and payment servers are given them. */
    concentratorList,
    /** Starts concentrator `n` (1 = "concentrator") again on its address. */
    restartConcentrator: (n: number) =>
      launcher.start(n === 1 ? "concentrator" : `concentrator-${n}`, SCRIPTS.concentrator, [
        "--listen",
        addresses[n === 1 ? "concentrator" : `concentrator:${n}`]!,
        "--id",
        `concentrator-${n}`,
        "--data",
        dir,
      ]),
    startTerminal: (id: string, args: string[] = []) =>
      launcher.start(id, SCRIPTS.terminal, ["--id", id, "--concentrator", concentratorList, "--clearing", addresses.clearing!, "--data", dir, ...args]),
    /**
     * Starts the payment server again (replica `replica`, 1 = "payment", when there are several),
     * on its address, with `env` for it alone (a test-only kill point, say).
     */
    async restartPayment(args: string[] = [], env: NodeJS.ProcessEnv = {}, replica = 1) {
      const several = (o.paymentServers ?? 1) > 1;
      const started = await launcher.start(
        replica === 1 ? "payment" : `payment-r${replica}`,
        SCRIPTS.payment,
        [
          "--listen",
          several ? addresses[`payment:r${replica}`]! : addresses.payment!,
          "--concentrator",
          concentratorList,
          "--data",
          dir,
          ...(several ? ["--replica", `r${replica}`] : []),
          ...(o.paymentArgs ?? []),
          ...args,
        ],
        60_000,
        { ...(o.database ? { NETPURSE_DATABASE_URL: o.database } : {}), ...env },
      );
      return started;
    },
    async close() {
      for (const x of channels.values()) x.close();
      await launcher.stopAll();
      await postgres?.stop();
      await cleanup();
    },
  };
}

export type E2E = Awaited<ReturnType<typeof launchE2E>>;
