// The whole network as separate processes with the load server's security
// module on a SoftHSM2 token, set up as an operator would: netpurse-issuer
// provision-hsm --pkcs11 generates the load master key of version 2 in the
// token, export-clearing-keys gives clearing a reference to it, and the demo
// card is personalised at that version (its load key derived in the token).
// The cardholder loads the card with the CLI and pays a shop: the load server
// and clearing, each its own process, work on the same token. Skipped,
// loudly, without SoftHSM2 or pkcs11js.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { findSoftHsmModule } from "../../lib/hsm/softhsm.js";
import { launchNetwork, Launcher } from "../../services/network/launcher.js";
import { DEMO_SHOP, DEMO_SHOPS, demoBankPassword, ensureDemoData, paths } from "../../services/network/layout.js";
import { tempDir } from "../support/fixtures.js";
import { testSecurity, waitFor } from "../support/network.js";
import { defined } from "../support/offers.js";
import { requirePkcs11 } from "../support/softhsm.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;
const bin = (name: string) => join(ROOT, "bin", name);

describe("end to end: the network with the load master key in a PKCS#11 token (SoftHSM2), every part its own process", function () {
  this.timeout(180_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  let launcher: Launcher | undefined;
  let addresses: Record<string, string>;
  const channels: ReturnType<typeof openChannel>[] = [];
  const outputs: string[] = [];

  before(async function () {
    await requirePkcs11(this);
    ({ dir, cleanup } = await tempDir("netpurse-e2e-pkcs11-"));
    const issuer = async (...args: string[]) => {
      const r = await run(bin("netpurse-issuer"), [...args, "--data", dir]);
      outputs.push(r.stdout, r.stderr);
      return r.stdout;
    };
    await issuer("create-keys");
    expect(await issuer("provision-hsm", "--pkcs11", "--module", findSoftHsmModule()!, "--token", "netpurse-load", "--key-version", "2")).to.match(
      /generated the load master key of version 2 in token netpurse-load \(sensitive, never extractable\)/,
    );
    await issuer("export-clearing-keys", "--out", join(paths(dir).clearing, "keys.json"));
    // The rest of the demo data as npm start makes it: the card at the newest key version (2), PSAMs with every purchase key version.
    const { cardPath } = await ensureDemoData(dir, {
      terminals: [{ id: "terminal-1", psams: 1 }],
      shops: DEMO_SHOPS.map((d) => d.shop),
      card: { name: "demo", value: 0, maxBalance: 50_000, expiry: "2031-12-31" },
    });
    launcher = new Launcher(join(dir, "logs"));
    addresses = await launchNetwork(launcher, {
      data: dir,
      terminals: [{ id: "terminal-1" }],
      merchants: DEMO_SHOPS.map((d) => ({ id: d.shop.merchantId })),
      cardPath,
    });
  });
  after(async () => {
    for (const c of channels) c.close();
    await launcher?.stopAll();
    await cleanup();
  });

  it("loads the card through the token, pays a shop with it, and clearing posts both; no PIN in any output or log", async () => {
    const security = await testSecurity(dir);
    const operator = await security.of("operator", "operator");
    const factory = clientFactory();
    const open = (address: string, s: Parameters<typeof openChannel>[1]) => {
      const c = openChannel(address, s);
      channels.push(c);
      return c;
    };
    const cardholder = factory.create(CardholderServiceDefinition, open(addresses.clientDaemon!, { insecure: true }));
    const clearing = factory.create(ClearingServiceDefinition, open(addresses.clearing!, operator.channel({ kind: "clearing" })));
    const concentrator = factory.create(TerminalConcentratorServiceDefinition, open(addresses.concentrator!, operator.channel({ kind: "concentrator" })));
    const shop = factory.create(
      MerchantServiceDefinition,
      open(addresses[`merchant:${DEMO_SHOP.merchantId}`]!, security.cardholder.channel({ kind: "merchant" })),
    );

    const hsm = JSON.parse(await readFile(join(paths(dir).load, "hsm.json"), "utf8")) as { kind: string; loadKeys: Record<string, string> };
    expect(hsm).to.deep.include({ kind: "pkcs11", loadKeys: { "2": "netpurse-load-mk-v2" } });
    const before = defined((await cardholder.getCard({})).purse, "the card");
    expect(before.keyVersion).to.equal(2);

    const password = await demoBankPassword(dir);
    const env = { ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: dir, NETPURSE_BANK_PASSWORD: password };
    const load = await run(
      bin("netpurse"),
      ["load", "20.00", "--yes", "--bank", addresses.bank!, "--account", "demo-account", "--daemon", addresses.clientDaemon!],
      {
        env,
      },
    );
    outputs.push(load.stdout, load.stderr);
    expect(load.stdout).to.match(/loaded EUR 20\.00; card balance now EUR 20\.00/);
    expect(load.stdout).to.contain("bank debited the account");
    expect(defined((await cardholder.getCard({})).purse, "the card").balance!.amountMinor).to.equal(before.balance!.amountMinor + 2_000n);

    const { offer } = await shop.createOrder({ productId: "song-1" });
    const o = defined(offer, "the shop's offer");
    await cardholder.payOffer({ offer: o, approvedAmount: o.amount }, { deadline: 30_000 });

    let lastClose = 0;
    await waitFor(
      async () => {
        if (Date.now() - lastClose > 1_000) {
          await concentrator.closeBatches({});
          lastClose = Date.now();
        }
        const s = defined((await clearing.getSettlement({ day: "" })).settlement, "the settlement");
        return s.loads === 1 && s.purchases === 1;
      },
      30_000,
      "clearing to post the load and the purchase",
    );
    expect((await clearing.listQuarantined({ pageSize: 500, pageToken: "" })).entries).to.deep.equal([]);
    const audit = await clearing.runAudit({ cards: [] });
    expect(audit.ok, JSON.stringify(audit.checks)).to.equal(true);

    const pins = [(await readFile(join(dir, "hsm", "user.pin"), "utf8")).trim(), (await readFile(join(dir, "hsm", "so.pin"), "utf8")).trim()];
    const logs = await Promise.all(["load", "clearing", "bank", "client-daemon"].map((n) => readFile(join(dir, "logs", `${n}.log`), "utf8")));
    for (const text of [...outputs, ...logs]) for (const pin of pins) expect(text).to.not.contain(pin);
  });
});
