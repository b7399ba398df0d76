// `npm start`: the whole netpurse network on this machine. Sets up the demo
// data on first run (issuer keys, PSAMs, merchants, the load server's
// security module, a bank account, a card), starts every part as its own
// process on loopback, loads the card from the bank and makes a demo
// purchase in each mode printing each step, and keeps the network up for the
// CLI and grpcurl until Ctrl-C.

import { parseArgs } from "node:util";
import { join } from "node:path";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { describeError } from "../../lib/cli.js";
import { DEFAULT_HOST, dataDir, defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { formatMoney, money } from "../../lib/money.js";
import { DEFAULT_DEMO, demoBankPassword, demoPasswordPath, DEMO_BANK, DEMO_SHOPS, ensureDemoData, EUR } from "./layout.js";
import { bankAccessToken, bankTokensFile } from "../../client/cli/bank-session.js";
import { launchNetwork, Launcher, type Death } from "./launcher.js";
import { pkiDirOf, Security } from "../../lib/pki/security.js";

const { values } = parseArgs({
  options: {
    data: { type: "string" },
    once: { type: "boolean" },
    verbose: { type: "boolean", short: "v" },
    product: { type: "string" },
    insecure: { type: "boolean" },
    help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  console.log(`Usage: npm start -- [options]

Starts the whole netpurse network on this machine (loopback only), loads the
demo card from the demo bank account (logging in with the account's password,
made and printed on the first run and kept in DATA/bank/demo-password, mode
0600), makes a demo purchase with it in each confirmation mode, and keeps
running until Ctrl-C.

Options:
  --data DIR        data folder (default $NETPURSE_DATA or ./.data)
  --product ID      demo product to buy (default ${DEMO_SHOPS[0]!.shop.products[0]!.productId})
  --once            stop after the demo purchases
  --insecure        plaintext and no authentication on every link, for debugging only
                    (by default every link is TLS, mutual inside the operator's network)
  -v, --verbose     print every service's log lines
  -h, --help        this text

Each service is its own process, its log in DATA/logs. The cardholder's daemon
serves on its Unix socket DATA/client/run/daemon.sock only. A service that
dies is reported with how it ended and its last log lines; once none is left,
npm start exits with status 1. Services stop with npm start, even when it is
killed.`);
  process.exit(0);
}

// The data folder holds keys, cards, journals and logs: nothing in it is made readable by other users.
process.umask(0o077);
const data = dataDir(values.data);
/** What the main job loads onto the demo card before its purchases: EUR 20.00. */
const DEMO_LOAD_MINOR = 2_000;
const say = (s: string) => console.log(s);
const launcher = new Launcher(join(data, "logs"), { echo: values.verbose ? (n, l) => console.log(`  [${n}] ${l}`) : undefined, onDeath: reportDeath });

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
  const { cardPath } = await ensureDemoData(data, DEFAULT_DEMO, (l) => say(`  ${l}`));

  say("starting the network (each part is its own process; logs in " + join(data, "logs") + ")");
  const addresses = await launchNetwork(launcher, {
    data,
    terminals: DEFAULT_DEMO.terminals.map((t) => ({ id: t.id })),
    merchants: DEMO_SHOPS.map((d) => ({ id: d.shop.merchantId, listen: `${DEFAULT_HOST}:${d.port}` })),
    cardPath,
    insecure: values.insecure === true,
    listen: {
      concentrator: defaultAddress("concentrator"),
      payment: defaultAddress("payment"),
      merchantValidation: defaultAddress("merchantValidation"),
      bank: defaultAddress("bank"),
      load: defaultAddress("load"),
    },
  });
  for (const [name, address] of Object.entries(addresses)) say(`  ${name.padEnd(22)} ${address}`);

  // Wait until the terminal host's PSAMs are in the pool and the payment server is connected.
  const factory = clientFactory();
  // The main job looks at the pool as the operator, and shops as a cardholder does.
  const operator = values.insecure ? Security.insecure() : await Security.forService(pkiDirOf(data), { kind: "operator", id: "operator" });
  const concentrator = factory.create(
    TerminalConcentratorServiceDefinition,
    openChannel(addresses.concentrator!, operator.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 }),
  );
  for (let i = 0; ; i++) {
    const r = await concentrator.listTerminals({}, { deadline: 2_000 });
    const psams = r.terminals.reduce((n, t) => n + t.slots.length, 0);
    if (r.paymentServers.length > 0 && r.terminals.length === DEFAULT_DEMO.terminals.length) {
      say(`  terminal pool ready: ${r.terminals.length} terminal host(s), ${psams} PSAMs`);
      break;
    }
    if (i > 200) throw new Error("the terminal pool did not come up; see the logs");
    await new Promise((r) => setTimeout(r, 100));
  }

  const cardholder = factory.create(CardholderServiceDefinition, openChannel(addresses.clientDaemon!, { insecure: true })); // the daemon's Unix socket

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
  bin/netpurse-operator terminals    the terminal pool
  grpcurl -cacert ${join(pkiDirOf(data), "ca.crt")} ${defaultAddress("payment")} list
Press Ctrl-C to stop.`);
} catch (e) {
  console.error(`\nnetpurse: ${describeError(e)}`);
  await shutdown(1);
}
