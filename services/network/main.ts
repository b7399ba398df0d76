// `npm start`: the whole netpurse network on this machine. Sets up the demo
// data on first run (issuer keys, PSAMs, merchants, the load server's
// security module, a bank account, a card), starts every part as its own
// process on loopback, loads the card from the bank and makes a demo
// purchase in each mode printing each step, then closes the PSAMs' batches,
// waits for clearing to post them, prints the day's settlement and runs the
// audit, and keeps the network up for the CLI and grpcurl until Ctrl-C.

import { parseArgs } from "node:util";
import { join } from "node:path";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { describeError } from "../../lib/cli.js";
import { DEFAULT_HOST, DEFAULT_PORTS, dataDir, defaultAddress } from "../../lib/config.js";
import { startLocalPostgres } from "./postgres.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { formatMoney, money } from "../../lib/money.js";
import { DEFAULT_DEMO, demoBankPassword, demoPasswordPath, DEMO_BANK, DEMO_LOYALTY, DEMO_SHOPS, ensureDemoData, EUR, paths } from "./layout.js";
import { DEMO_SITE } from "../benefits/site.js";
import { bankAccessToken, bankTokensFile } from "../../client/cli/bank-session.js";
import { launchNetwork, Launcher, SCRIPTS, type Death } from "./launcher.js";
import { readdir } from "node:fs/promises";
import { pcscSupport } from "../emulator/pcscd.js";
import { pkiDirOf, Security } from "../../lib/pki/security.js";
import { ClearingServiceDefinition, type Settlement } from "../../gen/netpurse/clearing/v1/clearing.js";
import { audit, cardFilesIn, count, readCardsAtHand, readSettlement, settlementReport, type ClearingClient } from "../operator/clearing-report.js";
import { hexOf } from "../../lib/ids.js";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";

const { values } = parseArgs({
  options: {
    data: { type: "string" },
    once: { type: "boolean" },
    verbose: { type: "boolean", short: "v" },
    product: { type: "string" },
    insecure: { type: "boolean" },
    pcsc: { type: "boolean" },
    "payment-servers": { type: "string" },
    concentrators: { type: "string" },
    terminals: { type: "string" },
    database: { type: "string" },
    help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  console.log(`Usage: npm start -- [options]

Starts the whole netpurse network on this machine (loopback only), loads the
demo card from the demo bank account (logging in with the account's password,
made and printed on the first run and kept in DATA/bank/demo-password, mode
0600), makes a demo purchase with it in each confirmation mode (each earns
points of the demo loyalty programme), authenticates the card to the
programme's benefits site and redeems a reward with the points, closes the
PSAMs' batches, waits until clearing has posted them, prints the day's
settlement and runs the audit (with --once, exit status 1 if it fails), and keeps running
until Ctrl-C.

Options:
  --data DIR        data folder (default $NETPURSE_DATA or ./.data)
  --product ID      demo product to buy (default ${DEMO_SHOPS[0]!.shop.products[0]!.productId})
  --once            stop after the demo purchases, the settlement and the audit
  --pcsc            the card and every PSAM behind real PC/SC readers: pcscd with
                    vsmartcard's vpcd driver and netpurse-emulator serving them
                    (needs Debian's pcscd, vsmartcard-vpcd and libpcsclite-dev, root
                    or write access to /run/pcscd, and no other pcscd running)
  --insecure        plaintext and no authentication on every link, for debugging only
                    (by default every link is TLS, mutual inside the operator's network)
  --payment-servers N  payment servers, 1..8 (default 1): replicas of one payment server
                    sharing one PostgreSQL database, reached by every caller as one
                    target balanced round robin on the caller's side
  --concentrators N terminal concentrators, 1..8 (default 1); every payment server
                    connects to each, each terminal host attaches to one of them
  --terminals N     terminal hosts, 1..8 (default 1): terminal-1 holds 4 money PSAMs,
                    each other one 2
  --database URL    the PostgreSQL database every service keeps its state in (a schema
                    each), e.g. postgres://netpurse:PASSWORD@127.0.0.1:5432/netpurse
                    (default $NETPURSE_DATABASE_URL; else SQLite files, or, with several
                    payment servers, a PostgreSQL server of the network's own in
                    DATA/postgres on port ${DEFAULT_PORTS.postgres}, made with Debian's postgresql package)
  -v, --verbose     print every service's log lines
  -h, --help        this text

Each service is its own process, its log in DATA/logs. The cardholder's daemon
serves on its Unix socket DATA/client/run/daemon.sock only. A service that
dies is reported with how it ended and its last log lines; once none is left,
npm start exits with status 1. Services stop with npm start, even when it is
killed.`);
  process.exit(0);
}

/** A count option: 1..8, default 1. */
function countOption(name: "payment-servers" | "concentrators" | "terminals"): number {
  const v = values[name];
  if (v === undefined) return 1;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 8) {
    console.error(`--${name} must be a whole number from 1 to 8, got "${v}"`);
    process.exit(2);
  }
  return n;
}
const layout = { paymentServers: countOption("payment-servers"), concentrators: countOption("concentrators"), terminals: countOption("terminals") };
const demo = {
  ...DEFAULT_DEMO,
  terminals: Array.from({ length: layout.terminals }, (_, i) => ({ id: `terminal-${i + 1}`, psams: i === 0 ? 4 : 2 })),
  concentrators: layout.concentrators,
};

// The data folder holds keys, cards, journals and logs: nothing in it is made readable by other users.
process.umask(0o077);
const data = dataDir(values.data);
/** The network's own PostgreSQL server, when it runs one: stopped after the services. */
let localPostgres: { stop(): Promise<void> } | undefined;
/** How long the main job waits for clearing to post the demo's purchases and load. */
const CLEARING_WAIT_MS = 20_000;
/** What the main job loads onto the demo card before its purchases: EUR 20.00. */
const DEMO_LOAD_MINOR = 2_000;
const say = (s: string) => console.log(s);
const launcher = new Launcher(join(data, "logs"), { echo: values.verbose ? (n, l) => console.log(`  [${n}] ${l}`) : undefined, onDeath: reportDeath });

/** The readers netpurse-emulator names its PSAMs' readers with ("netpurse PSAM 1", ...): the terminal host's --psam-readers. */
const PSAM_READERS = "^netpurse PSAM ";

/**
 * --pcsc: the demo card and the terminal host's PSAMs go into emulated PC/SC
 * readers, served by netpurse-emulator to a pcscd of its own (DATA/pcscd);
 * the daemon and the terminal host reach them through pcscd alone.
 */
async function startReaders(cardPath: string): Promise<void> {
  const support = await pcscSupport({ binding: true });
  if (!support.ok) throw new Error(`--pcsc: PC/SC cannot be set up here: ${support.reason}`);
  const psams = (
    await Promise.all(
      demo.terminals.map(async (t) => {
        const dir = join(paths(data).terminal(t.id), "psams");
        return (await readdir(dir)).filter((n) => n.endsWith(".psam.json")).map((n) => join(dir, n));
      }),
    )
  ).flat();
  const args = ["--card", cardPath, ...psams.flatMap((f) => ["--psam", f]), "--pcscd", join(data, "pcscd")];
  await launcher.start("emulator", SCRIPTS.emulator, args);
  say(`  PC/SC: the card and ${count(psams.length, "PSAM")} in emulated readers of a pcscd of the network's own (${join(data, "pcscd")})`);
}

/** A service ended unasked: say which, how, and its last lines; once none is left, stop with a failure. */
function reportDeath(d: Death): void {
  if (stopping) return;
  const how = d.signal ? `killed by ${d.signal}` : `exit code ${d.code}`;
  console.error(`\nnetpurse: ${d.name} died (${how}); the last lines of its log (${d.logFile}):`);
  for (const line of d.lastLines.length ? d.lastLines : ["(nothing)"]) console.error(`  | ${line}`);
  const left = launcher.names();
  if (left.length > 0) return console.error(`netpurse: still running: ${left.join(", ")}`);
  console.error("netpurse: every service has died; stopping");
  shutdown(1).catch(() => process.exit(1));
}

let stopping = false;
async function shutdown(code: number): Promise<never> {
  if (!stopping) {
    stopping = true;
    say("\nstopping the network…");
    await launcher.stopAll();
    await localPostgres?.stop();
    say("stopped.");
  }
  process.exit(code);
}
const onSignal = () => {
  shutdown(0).catch((e: unknown) => {
    console.error(`could not stop every service: ${(e as Error).message}`);
    process.exit(1);
  });
};
process.on("SIGINT", onSignal);
process.on("SIGTERM", onSignal);

try {
  say(`netpurse: data folder ${data}`);
  if (values.insecure) say("  INSECURE: every link is plaintext and unauthenticated (--insecure); for debugging only");
  let database = values.database ?? (process.env.NETPURSE_DATABASE_URL || undefined);
  if (database === undefined && layout.paymentServers > 1) {
    say(`${layout.paymentServers} payment servers share one PostgreSQL database: starting the network's own`);
    const local = await startLocalPostgres(data, say);
    localPostgres = local;
    database = local.url;
  }
  const { cardPath } = await ensureDemoData(data, { ...demo, ...(database ? { database } : {}) }, (l) => say(`  ${l}`));
  if (values.pcsc) await startReaders(cardPath);
  if (layout.paymentServers > 1 || layout.concentrators > 1 || layout.terminals > 1)
    say(
      `layout: ${count(layout.paymentServers, "payment server")}, ${count(layout.concentrators, "concentrator")}, ${count(layout.terminals, "terminal host")}`,
    );

  say("starting the network (each part is its own process; logs in " + join(data, "logs") + ")");
  const addresses = await launchNetwork(launcher, {
    data,
    terminals: demo.terminals.map((t) => ({ id: t.id })),
    concentrators: layout.concentrators,
    paymentServers: layout.paymentServers,
    ...(database ? { database } : {}),
    merchants: DEMO_SHOPS.map((d) => ({ id: d.shop.merchantId, listen: `${DEFAULT_HOST}:${d.port}` })),
    sites: [{ id: DEMO_SITE.merchantId, listen: DEMO_LOYALTY.siteAddress }],
    cardPath,
    insecure: values.insecure === true,
    ...(values.pcsc ? { psamReaders: PSAM_READERS } : {}),
    listen: {
      concentrator: defaultAddress("concentrator"),
      payment: defaultAddress("payment"),
      merchantValidation: defaultAddress("merchantValidation"),
      bank: defaultAddress("bank"),
      load: defaultAddress("load"),
      clearing: defaultAddress("clearing"),
    },
  });
  for (const [name, address] of Object.entries(addresses)) say(`  ${name.padEnd(22)} ${address}`);

  // Wait until the terminal host's PSAMs are in the pool and the payment server is connected.
  const factory = clientFactory();
  // The main job looks at the pool as the operator, and shops as a cardholder does.
  const operator = values.insecure ? Security.insecure() : await Security.forService(pkiDirOf(data), { kind: "operator", id: "operator" });
  const concentrators = Object.entries(addresses)
    .filter(([name]) => name === "concentrator" || name.startsWith("concentrator:"))
    .map(([, address]) =>
      factory.create(TerminalConcentratorServiceDefinition, openChannel(address, operator.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 })),
    );
  for (let i = 0; ; i++) {
    // Every payment server (each replica) at every concentrator, and every terminal host attached to one of them.
    const lists = await Promise.all(concentrators.map((c) => c.listTerminals({}, { deadline: 2_000 })));
    const terminals = lists.flatMap((r) => r.terminals);
    const psams = terminals.reduce((n, t) => n + t.slots.length, 0);
    if (lists.every((r) => r.paymentServers.length >= layout.paymentServers) && terminals.length === demo.terminals.length) {
      say(`  terminal pool ready: ${count(terminals.length, "terminal host")}, ${psams} PSAMs`);
      break;
    }
    if (i > 200) throw new Error("the terminal pool did not come up; see the logs");
    await new Promise((r) => setTimeout(r, 100));
  }

  const cardholder = factory.create(CardholderServiceDefinition, openChannel(addresses.clientDaemon!, { insecure: true })); // the daemon's Unix socket
  const clearing = factory.create(ClearingServiceDefinition, openChannel(addresses.clearing!, operator.channel({ kind: "clearing" })));
  // What clearing had posted before this run's demo (an earlier run's, the same day): the demo waits for its own on top.
  const clearedBefore = (await clearing.getSettlement({ day: "" }, { deadline: CLI_DEADLINE_MS })).settlement!;
  let purchasesMade = 0;
  let loadsMade = 0;

  // The card is loaded from the demo bank account first (FIG. 18), as a cardholder would top it up.
  const before = (await cardholder.getCard({}, { deadline: CLI_DEADLINE_MS })).purse!;
  const load = money(DEMO_LOAD_MINOR, EUR, 2);
  say(`\ndemo load from ${DEMO_BANK.bankId}, account ${DEMO_BANK.accountId}`);
  if (before.maxBalance!.amountMinor - before.balance!.amountMinor < load.amountMinor) {
    say(`  skipped: the card holds ${formatMoney(before.balance!)} of at most ${formatMoney(before.maxBalance!)}, no room for ${formatMoney(load)}`);
  } else {
    say(`  the cardholder approves loading ${formatMoney(load)} (card balance ${formatMoney(before.balance!)})`);
    // The cardholder logs in to the bank as 'netpurse load' does (TLS checked against the CA), with the demo password.
    const asCardholder = values.insecure ? Security.insecure() : await Security.forCardholder(join(pkiDirOf(data), "ca.crt"));
    const bankAddress = addresses.bank ?? defaultAddress("bank");
    const accessToken = await bankAccessToken({
      bank: bankAddress,
      account: DEMO_BANK.accountId,
      security: asCardholder.channel({ kind: "bank" }),
      file: bankTokensFile(data),
      password: () => demoBankPassword(data),
      fresh: true,
    });
    say(`  logged in to the bank as the holder of ${DEMO_BANK.accountId} (password in ${demoPasswordPath(data)})`);
    const loaded = await cardholder.loadCard(
      { bankAddress, accountId: DEMO_BANK.accountId, amount: load, approvedAmount: load, bankAccessToken: accessToken },
      { deadline: 60_000 },
    );
    for (const s of loaded.steps) say(`  ${s.name.padEnd(15)} ${s.detail}`);
    say(`  card balance now ${formatMoney(loaded.purse!.balance!)}`);
    loadsMade++;
  }
  for (const { shop } of DEMO_SHOPS) {
    const mode = shop.confirmationMode.replace("CONFIRMATION_MODE_", "");
    say(`\ndemo purchase at ${shop.name} (mode ${mode})`);
    const merchant = factory.create(MerchantServiceDefinition, openChannel(addresses[`merchant:${shop.merchantId}`]!, operator.channel({ kind: "merchant" })));
    const { purse } = await cardholder.getCard({}, { deadline: CLI_DEADLINE_MS });
    const { offer } = await merchant.createOrder({ productId: values.product ?? shop.products[0]!.productId }, { deadline: CLI_DEADLINE_MS });
    say(`  the cardholder approves ${formatMoney(offer!.amount!)} (card balance ${formatMoney(purse!.balance!)})`);
    const paid = await cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 60_000 });
    for (const s of paid.steps) say(`  ${s.name.padEnd(15)} ${s.detail}`);
    say(`  card balance now ${formatMoney(paid.purse!.balance!)}`);
    purchasesMade++;
  }

  // FIG. 16: the card proves itself to the benefits site (a zero-value draw), then pays a reward with the points it earned.
  const redeemed = await demoLoyalty(
    cardholder,
    factory.create(MerchantServiceDefinition, openChannel(addresses[`benefits:${DEMO_SITE.merchantId}`]!, operator.channel({ kind: "merchant" }))),
  );

  // Clearing (FIG. 2 and 3): the PSAMs' batches go to clearing, which checks and posts each record; then the day's figures and the audit.
  say("\nclearing: closing every PSAM's batch");
  const settlement = await clearDemo(concentrators, clearing, clearedBefore, { purchases: purchasesMade, loads: loadsMade, redemptions: redeemed });
  say(indent(settlementReport(settlement)));
  say("\naudit of clearing's ledger, with the cards in " + paths(data).cards);
  const cards = await readCardsAtHand(await cardFilesIn(paths(data).cards), paths(data).issuer);
  const audited = await audit(clearing, cards, CLI_DEADLINE_MS);
  say(indent(audited.report));
  if (!audited.ok) {
    console.error("\nnetpurse: the audit failed: clearing's ledger does not add up (the FAILED checks above say where)");
    // The main job's check fails; a network kept running stays up, so the operator can look with 'netpurse-operator audit' and 'quarantined'.
    if (values.once) await shutdown(1);
  }

  if (values.once) await shutdown(0);
  say(`
The network is running. Try, in another terminal:
  bin/netpurse card                  the card's balance and log
  bin/netpurse shop                  what the demo shop sells
  bin/netpurse pay ebook-grpc        buy something (asks you first)
  bin/netpurse load 20.00            load the card from the demo bank account (asks you first, and the
                                     account's password: see ${demoPasswordPath(data)})
  bin/netpurse-bank statement ${DEMO_BANK.accountId}
                                     the bank account: balance, holds, statement (asks the password)
  bin/netpurse pay song-1 --merchant 127.0.0.1:7414
                                     the same in another confirmation mode (7410 PSAM verifies,
                                     7412 server compares, 7413 client compares, 7414 merchant compares)
  bin/netpurse rewards               the benefits site's rewards and your card's points
  bin/netpurse authenticate          prove your card to the benefits site (no password, nothing paid)
  bin/netpurse redeem lounge         pay a reward with the points on the card (asks you first)
  bin/netpurse-operator terminals    the terminal pool
  bin/netpurse-operator settlement   the day's positions and payouts (--csv FILE, --close)
  bin/netpurse-operator audit        check clearing's ledger and the card's balance
  grpcurl -cacert ${join(pkiDirOf(data), "ca.crt")} ${defaultAddress("payment")} list
Press Ctrl-C to stop.`);
} catch (e) {
  console.error(`\nnetpurse: ${describeError(e)}`);
  await shutdown(1);
}

/**
 * The demo of FIG. 16 at the benefits site: an authentication (the card
 * proves it is present; the site shows its member's booking) and, when the
 * card holds enough points, the redemption of a reward. Returns how many
 * redemptions clearing is to post.
 */
async function demoLoyalty(
  cardholder: Client<typeof CardholderServiceDefinition, DeadlineOptions>,
  site: Client<typeof MerchantServiceDefinition, DeadlineOptions>,
): Promise<number> {
  const { points } = await cardholder.getCard({}, { deadline: CLI_DEADLINE_MS });
  const held = points.find((p) => p.programme === DEMO_SITE.programme.code);
  if (!held) {
    say(
      `\ndemo authentication and redemption skipped: the card has no points purse of programme ${DEMO_SITE.programme.code} (it was personalised before loyalty points; a new data folder has one)`,
    );
    return 0;
  }
  say(`\ndemo authentication at ${DEMO_SITE.name} (FIG. 16: a zero-value draw in the authentication currency 999)`);
  const auth = (await site.createOrder({ productId: "booking" }, { deadline: CLI_DEADLINE_MS })).offer!;
  say(`  the cardholder lets the card prove itself for "${auth.description}" (nothing is paid)`);
  const authenticated = await cardholder.payOffer({ offer: auth, approvedAmount: auth.amount }, { deadline: 60_000 });
  for (const s of authenticated.steps) say(`  ${s.name.padEnd(15)} ${s.detail}`);
  say(`  card balance still ${formatMoney(authenticated.purse!.balance!)}`);

  const reward = (await site.createOrder({ productId: "lounge" }, { deadline: CLI_DEADLINE_MS })).offer!;
  say(`\ndemo redemption at ${DEMO_SITE.name}: "${reward.description}" for ${formatMoney(reward.amount!)}`);
  if (held.balance!.amountMinor < reward.amount!.amountMinor) {
    say(`  skipped: the card holds ${formatMoney(held.balance!)}`);
    return 0;
  }
  say(`  the cardholder approves ${formatMoney(reward.amount!)} (the card holds ${formatMoney(held.balance!)})`);
  const paid = await cardholder.payOffer({ offer: reward, approvedAmount: reward.amount }, { deadline: 60_000 });
  for (const s of paid.steps) say(`  ${s.name.padEnd(15)} ${s.detail}`);
  say(`  points now ${formatMoney(paid.points!.balance!)}; card balance still ${formatMoney(paid.purse!.balance!)}`);
  return 1;
}

function indent(text: string): string {
  return text
    .split("\n")
    .map((l) => (l ? `  ${l}` : l))
    .join("\n");
}

/**
 * Closes every PSAM's batch (the terminal hosts send each to clearing at
 * once) and waits until clearing has posted this run's purchases and loads
 * on top of what it held before. A card's proof that reaches its PSAM after
 * the close (the modes of FIG. 7 and 8 report it afterwards) lands in a new
 * batch: closing again while waiting sends that one too.
 */
async function clearDemo(
  concentrators: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>[],
  clearing: ClearingClient,
  before: Settlement,
  made: { purchases: number; loads: number; redemptions: number },
): Promise<Settlement> {
  const deadline = Date.now() + CLEARING_WAIT_MS;
  let closed = 0;
  for (let attempt = 0; ; attempt++) {
    // A proof reported after the goods (FIG. 7 and 8) may reach its PSAM just after a close: close again soon.
    if (attempt % 3 === 0) {
      const r = { closed: (await Promise.all(concentrators.map((c) => c.closeBatches({}, { deadline: CLI_DEADLINE_MS })))).flatMap((x) => x.closed) };
      for (const b of r.closed) say(`  closed batch ${b.batchNumber} of PSAM ${hexOf(b.psamId?.value)} on ${b.terminalId}: ${count(b.count, "record")}`);
      closed += r.closed.length;
    }
    const now = (await clearing.getSettlement({ day: "" }, { deadline: CLI_DEADLINE_MS })).settlement!;
    // Past midnight (UTC) the open day is a new one: what was posted to the day before counts too.
    const earlier = now.day === before.day ? undefined : (await clearing.getSettlement({ day: before.day }, { deadline: CLI_DEADLINE_MS })).settlement!;
    const purchases = now.purchases + (earlier?.purchases ?? 0) - before.purchases;
    const loads = now.loads + (earlier?.loads ?? 0) - before.loads;
    const redemptions = now.redemptions + (earlier?.redemptions ?? 0) - before.redemptions;
    if (purchases >= made.purchases && loads >= made.loads && redemptions >= made.redemptions) {
      say(
        `  clearing posted ${count(purchases, "purchase")}, ${count(loads, "load")} and ${count(redemptions, "points redemption")} (${count(closed, "batch", "batches")} closed now)`,
      );
      return readSettlement(clearing, now.day, CLI_DEADLINE_MS);
    }
    if (Date.now() > deadline) {
      throw new Error(
        `clearing posted ${purchases} of the ${made.purchases} demo purchases, ${loads} of the ${made.loads} loads and ${redemptions} of the ${made.redemptions} redemptions within ${CLEARING_WAIT_MS / 1000} s; ` +
          `see 'bin/netpurse-operator quarantined' and the logs of clearing, the terminal host and the load server in ${join(data, "logs")}`,
      );
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}
