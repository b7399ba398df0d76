// The whole network as separate processes (the end-to-end tests): each
// service started from its own entry point, over a fresh data folder.

import { createServer } from "node:net";
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
import { testSecurity, waitFor } from "./network.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";

export interface E2EOptions {
  terminals: { id: string; psams: number; start?: boolean; args?: string[] }[];
  paymentArgs?: string[];
  /**
   * The demo loyalty programme (DEMO_LOYALTY, with these changes): its benefits site on a free port, the
   * authentication and points PSAMs on the first terminal host, and the card's points purse.
   */
  loyalty?: Partial<Omit<DemoLoyalty, "siteAddress">>;
}

/** A loopback port nothing listens on now (the OS's pick), for a service whose address others must know before it starts. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

export async function launchE2E(o: E2EOptions) {
  const { dir, cleanup } = await tempDir("netpurse-e2e-");
  // The enrolled shops' shop.json names the site's address, so it is chosen before anything starts.
  const loyalty: DemoLoyalty | undefined = o.loyalty ? { ...DEMO_LOYALTY, ...o.loyalty, siteAddress: `127.0.0.1:${await freePort()}` } : undefined;
  const { cardPath } = await ensureDemoData(dir, {
    terminals: o.terminals.map(({ id, psams }) => ({ id, psams })),
    shops: DEMO_SHOPS.map((d) => d.shop),
    card: { name: "demo", value: 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
    ...(loyalty ? { loyalty } : {}),
  });
  const launcher = new Launcher(join(dir, "logs"));
  const addresses = await launchNetwork(launcher, {
    data: dir,
    terminals: o.terminals.filter((t) => t.start !== false).map((t) => ({ id: t.id, ...(t.args ? { args: t.args } : {}) })),
    merchants: DEMO_SHOPS.map((d) => ({ id: d.shop.merchantId })),
    ...(loyalty ? { sites: [{ id: DEMO_SITE.merchantId, listen: loyalty.siteAddress }] } : {}),
    cardPath,
    ...(o.paymentArgs ? { paymentArgs: o.paymentArgs } : {}),
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
  const attached = async (ids: string[]) =>
    waitFor(
      async () => {
        const r = await c.concentrator.listTerminals({});
        return ids.every((id) => r.terminals.some((t) => t.terminalId === id)) && r.paymentServers.length > 0;
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
    attached,
    startTerminal: (id: string, args: string[] = []) =>
      launcher.start(id, SCRIPTS.terminal, ["--id", id, "--concentrator", addresses.concentrator!, "--clearing", addresses.clearing!, "--data", dir, ...args]),
    /** Starts the payment server again, with `env` for it alone (a test-only kill point, say). */
    async restartPayment(args: string[] = [], env: NodeJS.ProcessEnv = {}) {
      const started = await launcher.start(
        "payment",
        SCRIPTS.payment,
        ["--listen", addresses.payment!, "--concentrator", addresses.concentrator!, "--data", dir, ...args],
        60_000,
        env,
      );
      return started;
    },
    async close() {
      for (const x of channels.values()) x.close();
      await launcher.stopAll();
      await cleanup();
    },
  };
}

export type E2E = Awaited<ReturnType<typeof launchE2E>>;
