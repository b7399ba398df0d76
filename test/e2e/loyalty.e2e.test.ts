// End to end: authentication and loyalty points (FIG. 16, docs/loyalty.md)
// as a cardholder meets them. Every part is its own process, the demo
// programme's benefits site among them on a free port, which the enrolled
// shops name in their shop.json; the real `bin/netpurse` runs against the
// daemon's socket, the site and a shop. One network for the whole file.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { DEMO_SITE } from "../../services/benefits/site.js";
import type { ShopFile } from "../../services/merchant/shop.js";
import { SCRIPTS } from "../../services/network/launcher.js";
import { commandFailure } from "../support/fixtures.js";
import { launchE2E, type E2E } from "../support/processes.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;
const CLI = join(ROOT, "bin/netpurse");
const SKYWAYS = `programme ${DEMO_SITE.programme.code}`;

/** What `netpurse card` shows: the money balance, the points, the counter, and each table of its log. */
interface CardShown {
  balance: string;
  points: number;
  counter: number;
  money: string;
  loyalty: string;
}

describe("end to end: authentication and loyalty points through the netpurse CLI", function () {
  this.timeout(180_000);
  let net: E2E;
  /** The benefits site's address, as the network's enrolled shops name it. */
  let site: string;
  /** A plain shop (no BenefitsService). */
  let shop: string;
  before(async () => {
    net = await launchE2E({ terminals: [{ id: "terminal-1", psams: 1 }], loyalty: {} });
    site = net.loyalty?.siteAddress ?? "";
    shop = net.addresses["merchant:demo-shop"] ?? "";
  });
  after(async () => net?.close());

  // The CLI finds the installation's CA (to check the site and the shop) in the network's data folder.
  const netpurse = (...args: string[]) =>
    run(CLI, [...args, "--daemon", net.addresses.clientDaemon ?? ""], { env: { ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: net.dir } });

  async function card(): Promise<CardShown> {
    const { stdout } = await netpurse("card", "--log", "0");
    const loyaltyAt = stdout.indexOf("\nauthentications and points (no money moved)\n");
    const moneyAt = stdout.indexOf("\nmoney\n");
    return {
      balance: /balance (EUR \d+\.\d\d)/.exec(stdout)?.[1] ?? `no balance in:\n${stdout}`,
      points: Number(new RegExp(`^points (\\d+) points of ${SKYWAYS} `, "m").exec(stdout)?.[1] ?? NaN),
      counter: Number(/ counter (\d+) /.exec(stdout)?.[1] ?? NaN),
      money: moneyAt < 0 ? "" : stdout.slice(moneyAt, loyaltyAt > moneyAt ? loyaltyAt : undefined),
      loyalty: loyaltyAt < 0 ? "" : stdout.slice(loyaltyAt),
    };
  }

  it("rewards, authenticate (nothing paid), pay at an enrolled shop (points earned), redeem a lounge pass, and an upgrade beyond the points refused", async () => {
    // The site listens where the enrolled shops' shop.json says it does.
    expect(net.addresses[`benefits:${DEMO_SITE.merchantId}`]).to.equal(site);
    const enrolled = JSON.parse(await readFile(join(net.paths.merchant("demo-shop"), "shop.json"), "utf8")) as ShopFile;
    expect(enrolled.loyalty).to.deep.equal({ siteAddress: site, programme: DEMO_SITE.programme.code, siteId: DEMO_SITE.merchantId });

    const rewards = await netpurse("rewards", "--site", site);
    expect(rewards.stdout).to.contain("Skyways benefits (skyways), programme Skyways Miles (1001)");
    expect(rewards.stdout).to.match(new RegExp(`^lounge +2000 points of ${SKYWAYS} +Lounge pass$`, "m"));
    expect(rewards.stdout).to.match(new RegExp(`^upgrade +15000 points of ${SKYWAYS} +Cabin upgrade$`, "m"));
    expect(rewards.stdout).to.match(/^booking +your card, no points +See your booking$/m);
    expect(rewards.stdout).to.contain(`your card holds 0 points of ${SKYWAYS}`);

    const start = await card();
    expect([start.balance, start.points]).to.deep.equal(["EUR 100.00", 0]);

    // Authentication: the site shows its member's booking, and no value moves.
    const auth = await netpurse("authenticate", "--site", site, "--yes");
    expect(auth.stdout).to.contain("asks your card to prove it is present");
    expect(auth.stdout).to.contain("reward:   member 100234 Ana Silva: booking NP4821");
    expect(auth.stdout).to.contain("your card was authenticated by Skyways benefits; nothing was paid");
    const authenticated = await card();
    expect([authenticated.balance, authenticated.points, authenticated.counter]).to.deep.equal(["EUR 100.00", 0, start.counter + 1]);

    // EUR 9.90 at an enrolled shop at 250 points per euro: 2475 points, on the card at once.
    const paid = await netpurse("pay", "ebook-grpc", "--merchant", shop, "--yes");
    expect(paid.stdout).to.contain("paid EUR 9.90 to Netpurse Demo Bookshop; card balance now EUR 90.10");
    expect(paid.stdout).to.match(new RegExp(`granted 2475 points of ${SKYWAYS} \\(grant [0-9a-f-]{36}\\); points now 2475 points of ${SKYWAYS}`));
    const earned = await card();
    expect([earned.balance, earned.points]).to.deep.equal(["EUR 90.10", 2475]);
    // The log: the purchase in the money table; the authentication and the points apart, as no money moved.
    expect(earned.money).to.match(/ purchase +EUR 9\.90 +EUR 90\.10 /);
    expect(earned.money).to.not.match(/authentication|points/);
    expect(earned.loyalty).to.match(/ authentication +no value \(authentication\) /);
    expect(earned.loyalty).to.match(new RegExp(` points earned +2475 points of ${SKYWAYS} +2475 points of ${SKYWAYS} `));
    expect(earned.loyalty).to.not.contain("EUR");

    const lounge = await netpurse("redeem", "lounge", "--site", site, "--yes");
    expect(lounge.stdout).to.contain(`redeemed 2000 points of ${SKYWAYS} at Skyways benefits; points now 475 points of ${SKYWAYS}`);
    expect(lounge.stdout).to.match(/reward: {3}Lounge pass voucher [0-9A-F]{4}(-[0-9A-F]{4}){3} for member 100234 Ana Silva/);
    const redeemed = await card();
    expect([redeemed.balance, redeemed.points]).to.deep.equal(["EUR 90.10", earned.points - 2000]);
    expect(redeemed.loyalty).to.match(new RegExp(` points redeemed +2000 points of ${SKYWAYS} +475 points of ${SKYWAYS} `));

    // 15000 points asked of a card holding 475: refused before anything reaches the card.
    const upgrade = await commandFailure(netpurse("redeem", "upgrade", "--site", site, "--yes"));
    expect(upgrade.code).to.equal(1);
    expect(upgrade.stderr).to.equal(
      `netpurse redeem: not enough points for "Cabin upgrade": the card holds 475 points of ${SKYWAYS}, it asks 15000 points of ${SKYWAYS}; nothing done\n`,
    );
    const after = await card();
    expect([after.balance, after.points, after.counter]).to.deep.equal([redeemed.balance, redeemed.points, redeemed.counter]);
  });

  it("--help of rewards, redeem, authenticate and netpurse-benefits exits 0 and names every option", async () => {
    const connect = ["--daemon", "--daemon-token", "--data", "--ca", "--insecure"];
    const helps: { command: string[]; options: string[] }[] = [
      { command: [CLI, "rewards", "--help"], options: ["--site", ...connect] },
      { command: [CLI, "redeem", "--help"], options: ["REWARD", "--site", "--yes", ...connect] },
      { command: [CLI, "authenticate", "--help"], options: ["--site", "--reward", "--yes", ...connect] },
      {
        command: [process.execPath, "--import", "tsx", join(ROOT, SCRIPTS.benefits), "--help"],
        options: [
          ...["--listen", "--data", "--id", "--dir", "--validation", "--payment-server", "--advertise", "--offer-ttl-ms", "--expiry-grace-ms"],
          ...["--retention-ms", "--max-unpaid-orders", "--sweep-every-ms", "--pki", "--insecure", "--help"],
        ],
      },
    ];
    // execFile resolves only on exit status 0.
    const outputs = await Promise.all(helps.map(({ command: [file = "", ...args] }) => run(file, args, { cwd: ROOT })));
    const texts = outputs.map((o) => o.stdout);
    helps.forEach(({ command, options }, i) => {
      for (const o of options) expect(texts[i], `${command.slice(-2).join(" ")} names ${o}`).to.match(new RegExp(`${o}(?![\\w-])`));
    });
    expect(texts.slice(0, 3).every((t) => t.includes("(default 127.0.0.1:7480)"))).to.equal(true);
    expect(texts[3]).to.contain("Usage: netpurse-benefits");
  });

  it("a plain shop given as the site is named as no benefits site (UNIMPLEMENTED); an offer of another kind than the command is never answered", async () => {
    const before = await card();
    for (const command of ["authenticate", "rewards"]) {
      const wrong = await commandFailure(netpurse(command, "--site", shop, ...(command === "authenticate" ? ["--yes"] : [])));
      expect(wrong.code, command).to.equal(1);
      expect(wrong.stderr, command).to.equal(
        `netpurse ${command}: ${shop} is no benefits site: it serves no netpurse.benefits.v1.BenefitsService (UNIMPLEMENTED); give the site's address with --site (default 127.0.0.1:7480)\n`,
      );
    }
    // A reward in points behind 'authenticate' (which promises that nothing is paid), an authentication behind 'redeem', points behind 'pay'.
    const mismatched: [string[], string][] = [
      [["authenticate", "--site", site, "--reward", "lounge"], `asks 2000 points of ${SKYWAYS} for "Lounge pass", not an authentication`],
      [["redeem", "booking", "--site", site], `asks no value (authentication) for "See your booking", not points`],
      [["pay", "lounge", "--merchant", site], `asks 2000 points of ${SKYWAYS} for "Lounge pass", not money`],
    ];
    for (const [args, why] of mismatched) {
      const refused = await commandFailure(netpurse(...args, "--yes"));
      expect(refused.code, args[0]).to.equal(1);
      expect(refused.stderr, args[0]).to.contain(`Skyways benefits ${why}; nothing done, the card was not touched`);
    }
    const after = await card();
    expect([after.balance, after.points, after.counter]).to.deep.equal([before.balance, before.points, before.counter]);
  });
});
