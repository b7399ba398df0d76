// netpurse: the cardholder's command line. It talks to the client daemon
// (which holds the card) and, to shop, to the merchant.

import { randomUUID } from "node:crypto";
import { createInterface } from "node:readline/promises";
import { CardTransactionKind, PurseStatus, type CardTransaction, type Money } from "../../gen/netpurse/card/v1/card.js";
import { CardholderServiceDefinition } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { MerchantServiceDefinition, type PaymentOffer, type Receipt } from "../../gen/netpurse/merchant/v1/merchant.js";
import { BenefitsServiceDefinition, RewardKind, type Reward } from "../../gen/netpurse/benefits/v1/benefits.js";
import { CONNECT_OPTIONS, CONNECT_USAGE, int, publicChannel, runCommands, str, UsageError } from "../../lib/cli.js";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { join } from "node:path";
import { bearer, clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";
import { hexOf } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, formatMoney, isMoneyCurrency, isProgrammeCode, money, parseMinor } from "../../lib/money.js";
import { HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadOutcome } from "../../gen/netpurse/load/v1/load.js";
import { table } from "../../lib/table.js";
import { runDaemon } from "../daemon/main.js";
import { readersTable, surveyReaders } from "./readers.js";
import { checkDaemonSocket, daemonPaths, readDaemonToken } from "../daemon/access.js";
import { ClientError, Status } from "nice-grpc";
import { errorMetadataOf } from "../../lib/grpc/errors.js";
import { bankAccessToken, bankTokensFile } from "./bank-session.js";
import { bankPassword, BANK_PASSWORD_ENV } from "../../lib/secret-input.js";

const factory = clientFactory();

/** The client daemon is on this machine: plaintext on its Unix socket, or on loopback TCP with its token. */
const DAEMON: ChannelSecurity = { insecure: true };

/** The token file of each daemon address reached over TCP (daemonAddress fills it). */
const daemonTokenFiles = new Map<string, string>();

async function withClient<D extends typeof CardholderServiceDefinition | typeof MerchantServiceDefinition | typeof BenefitsServiceDefinition, T>(
  def: D,
  address: string,
  security: ChannelSecurity,
  fn: (c: ReturnType<typeof factory.create<D>>) => Promise<T>,
): Promise<T> {
  // Over TCP every call to the daemon carries its token; its socket needs none, its folder keeps others out.
  const tokenFile = security === DAEMON ? daemonTokenFiles.get(address) : undefined;
  // On the socket: speak only to a daemon of the cardholder's own, in a folder no one else could have put it in.
  if (security === DAEMON && address.startsWith("unix:")) checkDaemonSocket(address.slice("unix:".length));
  const defaults = tokenFile !== undefined ? { "*": { metadata: bearer(readDaemonToken(tokenFile)) } } : {};
  const channel = openChannel(address, security);
  try {
    return await fn(factory.create(def, channel, defaults));
  } finally {
    channel.close();
  }
}

const m = (x: Money | undefined) => (x ? formatMoney(x) : "?");

async function approve(question: string): Promise<boolean> {
  if (!process.stdin.isTTY) throw new UsageError("cannot ask for approval without a terminal; pass --yes to approve in scripts");
  const rl = createInterface({ input: process.stdin, output: process.stdout });
  try {
    return /^y(es)?$/i.test((await rl.question(`${question} [y/N] `)).trim());
  } finally {
    rl.close();
  }
}

const daemonOption = { daemon: { type: "string" }, "daemon-token": { type: "string" }, data: { type: "string" } } as const;
const DAEMON_USAGE = "[--daemon unix:PATH | HOST:PORT] [--daemon-token FILE]";
/** Where the merchant is, and how to check it: the CA bundle (--ca, default DATA/pki/ca.crt), or --insecure. */
const merchantOptions = { merchant: { type: "string" }, ...CONNECT_OPTIONS } as const;
/**
 * Where the daemon is: its socket (DATA/client/run/daemon.sock, or --daemon unix:PATH), or --daemon
 * HOST:PORT, a TCP listener it was started with (--listen-tcp), whose token is in --daemon-token FILE
 * (default DATA/client/daemon.token).
 */
function daemonAddress(v: Record<string, unknown>): string {
  const paths = daemonPaths(join(dataDir(v.data as string | undefined), "client"));
  const address = str(v.daemon, `unix:${paths.socket}`);
  if (!address.startsWith("unix:")) daemonTokenFiles.set(address, str(v["daemon-token"], paths.token));
  return address;
}
const merchantAddress = (v: Record<string, unknown>) => str(v.merchant, defaultAddress("merchant"));
/** Where the benefits site is, and how to check it (a site is a merchant at the payment operator). */
const siteOptions = { site: { type: "string" }, ...CONNECT_OPTIONS } as const;
const siteAddress = (v: Record<string, unknown>) => str(v.site, defaultAddress("benefits"));

/** A benefits site's rewards; an address that serves no BenefitsService (a plain shop, say) is named as no site. */
async function listRewards(v: Record<string, unknown>) {
  const address = siteAddress(v);
  return withClient(BenefitsServiceDefinition, address, await publicChannel(v, "merchant"), (c) => c.listRewards({}, { deadline: CLI_DEADLINE_MS })).catch(
    (e: unknown) => {
      if (e instanceof ClientError && e.code === Status.UNIMPLEMENTED) {
        throw new Error(
          `${address} is no benefits site: it serves no netpurse.benefits.v1.BenefitsService (UNIMPLEMENTED); give the site's address with --site (default ${defaultAddress("benefits")})`,
        );
      }
      throw e;
    },
  );
}

/** How a card log entry's kind reads in the table. */
const KIND_NAMES: Record<number, string> = {
  [CardTransactionKind.CARD_TRANSACTION_KIND_PURCHASE]: "purchase",
  [CardTransactionKind.CARD_TRANSACTION_KIND_LOAD]: "load",
  [CardTransactionKind.CARD_TRANSACTION_KIND_AUTHENTICATION]: "authentication",
  [CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_REDEMPTION]: "points redeemed",
  [CardTransactionKind.CARD_TRANSACTION_KIND_POINTS_CREDIT]: "points earned",
};
const isMoneyKind = (k: CardTransactionKind) =>
  k === CardTransactionKind.CARD_TRANSACTION_KIND_PURCHASE || k === CardTransactionKind.CARD_TRANSACTION_KIND_LOAD;

/** What each command may answer: the cardholder approves what the command says, never another kind of value. */
const OFFER_KINDS = {
  pay: { accepts: isMoneyCurrency, what: "money" },
  redeem: { accepts: isProgrammeCode, what: "points" },
  authenticate: { accepts: (c: number) => c === AUTHENTICATION_CURRENCY, what: "an authentication" },
} as const;

/** The command for an offer of this currency. */
const verbFor = (currency: number) => (isProgrammeCode(currency) ? "redeem" : currency === AUTHENTICATION_CURRENCY ? "authenticate" : "pay");

/** How often a load or payment is asked again under its request id when the daemon did not answer, and the waits between. */
const RETRY_WAITS_MS = [1_000, 2_000, 4_000];

/**
 * A load or payment under one request id per command: asked again with the
 * same id while the daemon answers UNAVAILABLE or DEADLINE_EXCEEDED (a retry
 * never makes a second one, the daemon returns the first); a final error
 * that names a journaled transaction says what became of it.
 */
async function underRequestId<T>(kind: "load" | "payment", call: (requestId: string) => Promise<T>): Promise<T> {
  const requestId = randomUUID();
  for (let attempt = 0; ; attempt++) {
    try {
      return await call(requestId);
    } catch (e) {
      const wait = RETRY_WAITS_MS[attempt];
      const transient = e instanceof ClientError && (e.code === Status.UNAVAILABLE || e.code === Status.DEADLINE_EXCEEDED);
      if (transient && wait !== undefined) {
        process.stderr.write(
          `${Status[e.code]}: ${e.details}\n  asking again in ${wait / 1000} s under the same request id ${requestId} (it never makes a second ${kind})\n`,
        );
        await new Promise((r) => setTimeout(r, wait));
        continue;
      }
      const { transaction_id: id, state, may_complete: mayComplete, debit_sent: debitSent } = errorMetadataOf(e);
      if (id) {
        process.stderr.write(
          mayComplete === "true"
            ? `${kind} ${id} is journaled (${state}) and may still complete: do not ${kind === "load" ? "load" : "pay"} again. Run 'netpurse card sync' in a while, then check 'netpurse card'\n`
            : debitSent === "true"
              ? `${kind} ${id} ended ${state} after the card was asked to pay: the card may have been debited. Check 'netpurse card' before paying again, and keep the transaction id for the merchant\n`
              : `${kind} ${id} ended ${state}: nothing was ${kind === "load" ? "loaded" : "paid"}\n`,
        );
      }
      throw e;
    }
  }
}

await runCommands("netpurse", "netpurse: pay on-line merchants with the stored-value card in your reader.", [
  {
    name: "daemon",
    summary:
      "Run the client daemon until Ctrl-C: it holds the card and serves the cardholder API to you alone, on its\nUnix socket DATA/client/run/daemon.sock (a folder of mode 0700), and with --listen-tcp also on loopback TCP,\nwhere every call must carry the token of DATA/client/daemon.token (made mode 0600 on first use).",
    usage: "[--card FILE | --pcsc | --reader NAME] [--socket PATH] [--listen-tcp HOST:PORT] [--token FILE] [--data DIR] [--dir DIR] [--ca FILE] [--insecure]",
    options: {
      card: { type: "string" },
      pcsc: { type: "boolean" },
      reader: { type: "string" },
      socket: { type: "string" },
      "listen-tcp": { type: "string" },
      token: { type: "string" },
      listen: { type: "string" },
      data: { type: "string" },
      dir: { type: "string" },
      ca: { type: "string" },
      insecure: { type: "boolean" },
    },
    async run() {
      await runDaemon(process.argv.slice(3), "netpurse daemon");
      await new Promise(() => {}); // runs until a signal
    },
  },
  {
    name: "readers",
    summary:
      "List the PC/SC readers on this machine and what is in each: a netpurse card (purse id and balance),\na netpurse PSAM, another card, or nothing. Asks pcscd directly; a reader the daemon holds shows as in use.",
    usage: "[--json]",
    options: { json: { type: "boolean" } },
    async run(v) {
      const rows = await surveyReaders();
      console.log(v.json === true ? JSON.stringify(rows, null, 2) : readersTable(rows));
    },
  },
  {
    name: "card",
    summary:
      "Show the card: balance, expiry, counter, and its own log of its last transactions.\n'netpurse card sync' sends the card's history to the load server of every pending load and\nthe confirmations it gets to the bank, finishing loads whose confirmation was lost.",
    usage: `[sync] [--log N] ${DAEMON_USAGE} [--data DIR]\n  (the daemon's socket DATA/client/run/daemon.sock by default; HOST:PORT needs its token, default DATA/client/daemon.token)`,
    options: { ...daemonOption, log: { type: "string" } },
    async run(v, positionals) {
      if (positionals[0] === "sync") return syncCard(daemonAddress(v));
      if (positionals.length) throw new UsageError(`unknown 'card ${positionals[0]}'; did you mean 'card sync'?`);
      await withClient(CardholderServiceDefinition, daemonAddress(v), DAEMON, async (c) => {
        const { purse, points } = await c.getCard({}, { deadline: CLI_DEADLINE_MS });
        const p = purse!;
        console.log(`card ${hexOf(p.purseId?.value)}   balance ${m(p.balance)}   (most ${m(p.maxBalance)})`);
        for (const pp of points) console.log(`points ${m(pp.balance)}   (most ${m(pp.maxBalance)})`);
        console.log(
          `expires ${p.expiryDate}   counter ${p.transactionCounter}   key version ${p.keyVersion}   ${p.status === PurseStatus.PURSE_STATUS_ACTIVE ? "active" : "BLOCKED"}`,
        );
        // Every page of the listing; the daemon ends it after `limit` entries.
        const limit = int(v.log, 10, "log");
        if (limit < 0) throw new UsageError("--log must be 0 (all the card holds) or more");
        const transactions: CardTransaction[] = [];
        let pageToken = "";
        do {
          const r = await c.listCardTransactions({ limit, pageToken }, { deadline: CLI_DEADLINE_MS });
          transactions.push(...r.transactions);
          pageToken = r.nextPageToken;
        } while (pageToken);
        if (!transactions.length) return console.log("\nno transactions yet");
        // Money apart from authentications and points: only the first moves the balance above.
        const rows = (ts: CardTransaction[]) =>
          ts.map((t) => [
            String(t.transactionCounter),
            t.time!.toISOString().replace("T", " ").slice(0, 19),
            KIND_NAMES[t.kind] ?? `kind ${t.kind}`,
            m(t.amount),
            m(t.balanceAfter),
            `${hexOf(t.psamId?.value)}/${t.psamCounter}`,
            t.transactionId?.value ?? "",
          ]);
        const head = ["#", "when (UTC)", "kind", "amount", "balance after", "security module", "transaction"];
        const moneyRows = transactions.filter((t) => isMoneyKind(t.kind));
        const loyaltyRows = transactions.filter((t) => !isMoneyKind(t.kind));
        if (moneyRows.length) console.log(`\nmoney\n${table(head, rows(moneyRows))}`);
        if (loyaltyRows.length) console.log(`\nauthentications and points (no money moved)\n${table(head, rows(loyaltyRows))}`);
      });
    },
  },
  {
    name: "load",
    summary:
      "Load the card from your bank account: the bank holds the amount, the load server's security module\nsigns the LOAD command, the card credits itself, and the bank debits the account on the load server's\nsealed confirmation. Nothing is asked of the bank before you approve.\n" +
      `You log in to the bank with the account's password, asked once without echo (or $${BANK_PASSWORD_ENV} in scripts);\n` +
      "the access token the bank gives, not the password, is kept in DATA/client/bank-tokens.json (mode 0600) until it expires.\n" +
      "The load goes to the daemon under a request id of its own: if the daemon answers UNAVAILABLE or DEADLINE_EXCEEDED\n" +
      "it is asked again (up to 3 times, 1, 2 and 4 s apart, said on stderr), and a retry never loads twice. If it still fails\n" +
      "after the daemon journaled the load, the transaction id is printed, and whether it may still complete (then do not\n" +
      "load again: run 'netpurse card sync' later and check 'netpurse card'). Exit status 1 on any failure.",
    usage: `AMOUNT [--account ID] [--bank HOST:PORT] [--yes] [--daemon HOST:PORT] ${CONNECT_USAGE}   (AMOUNT like 20.00, in the card's currency)`,
    options: { ...daemonOption, ...CONNECT_OPTIONS, account: { type: "string" }, bank: { type: "string" }, yes: { type: "boolean", short: "y" } },
    async run(v, positionals) {
      const text = positionals[0];
      if (!text) throw new UsageError("give the amount to load, like 20.00");
      if (!v.yes && !process.stdin.isTTY) throw new UsageError("cannot ask for approval without a terminal; pass --yes to approve in scripts");
      await withClient(CardholderServiceDefinition, daemonAddress(v), DAEMON, async (c) => {
        const { purse } = await c.getCard({}, { deadline: CLI_DEADLINE_MS });
        const b = purse!.balance!;
        let minor: bigint;
        try {
          minor = parseMinor(text, b.exponent);
        } catch (e) {
          throw new UsageError((e as Error).message);
        }
        const amount = money(minor, b.currency, b.exponent);
        const account = str(v.account, "demo-account");
        console.log(`your card holds ${m(b)} of at most ${m(purse!.maxBalance)}`);
        if (!v.yes && !(await approve(`Load ${m(amount)} from account ${account}?`))) {
          console.log("not loaded; nothing was asked of the bank");
          return;
        }
        // The CLI logs in to the bank itself, over TLS checked against the installation's CA; the daemon gets the token only.
        const bankAddress = str(v.bank, defaultAddress("bank"));
        const security = await publicChannel(v, "bank");
        let password: Promise<string> | undefined;
        const session = (fresh: boolean) =>
          bankAccessToken({
            bank: bankAddress,
            account,
            security,
            file: bankTokensFile(v.data as string | undefined),
            password: () => (password ??= bankPassword({ prompt: `bank password for account ${account}: ` })),
            fresh,
          });
        const load = async (token: string) =>
          underRequestId("load", (requestId) =>
            c.loadCard({ bankAddress, accountId: account, amount, approvedAmount: amount, bankAccessToken: token, requestId }, { deadline: 60_000 }),
          );
        const token = await session(false);
        console.log("loading…");
        // A kept token the bank no longer takes (a new password, a restarted clock): log in once more, and load again.
        const r = await load(token).catch(async (e: unknown) => {
          // Only a load that did not start again: one that may still complete must never be joined by a second.
          if ((e as { code?: Status }).code !== Status.UNAUTHENTICATED || errorMetadataOf(e).may_complete === "true") throw e;
          return load(await session(true));
        });
        for (const s of r.steps) console.log(`  ${s.name.padEnd(15)} ${s.detail}`);
        const loaded = r.outcome === LoadOutcome.LOAD_OUTCOME_LOADED;
        console.log(`\n${loaded ? `loaded ${m(amount)}` : "not loaded; the bank released the hold"}; card balance now ${m(r.purse!.balance)}`);
        console.log(`transaction ${r.transactionId?.value}, bank ${r.holdState === HoldState.HOLD_STATE_POSTED ? "debited the account" : "released the hold"}`);
      });
    },
  },
  {
    name: "shop",
    summary: "List what a merchant sells.",
    usage: `[--merchant HOST:PORT] (default ${defaultAddress("merchant")}) ${CONNECT_USAGE}`,
    options: merchantOptions,
    async run(v) {
      await withClient(MerchantServiceDefinition, merchantAddress(v), await publicChannel(v, "merchant"), async (c) => {
        const r = await c.listProducts({}, { deadline: CLI_DEADLINE_MS });
        console.log(`${r.merchantName} (${r.merchantId?.value})\n`);
        console.log(
          table(
            ["product", "price", "name"],
            r.products.map((p) => [p.productId, m(p.price), p.name]),
          ),
        );
        console.log(`\nbuy one with: netpurse pay PRODUCT`);
      });
    },
  },
  {
    name: "pay",
    summary:
      "Buy a product: the merchant makes an offer, you approve the amount, the card pays,\nthe merchant releases the goods. Nothing touches the card before you approve.\n" +
      "The payment goes to the daemon under a request id of its own: if the daemon answers UNAVAILABLE or DEADLINE_EXCEEDED\n" +
      "it is asked again (up to 3 times, 1, 2 and 4 s apart, said on stderr), and a retry never pays twice. If it still fails\n" +
      "after the daemon journaled the purchase, the transaction id is printed, and whether it may still complete (then do\n" +
      "not pay again: the daemon finishes it; check 'netpurse card'). Exit status 1 on any failure.",
    usage: `PRODUCT [--yes] [--merchant HOST:PORT] ${DAEMON_USAGE} ${CONNECT_USAGE}`,
    options: { ...daemonOption, ...merchantOptions, yes: { type: "boolean", short: "y" } },
    async run(v, positionals) {
      const product = positionals[0];
      if (!product) throw new UsageError("name the product to buy (see 'netpurse shop')");
      if (!v.yes && !process.stdin.isTTY) throw new UsageError("cannot ask for approval without a terminal; pass --yes to approve in scripts");
      const { offer } = await withClient(MerchantServiceDefinition, merchantAddress(v), await publicChannel(v, "merchant"), (c) =>
        c.createOrder({ productId: product }, { deadline: CLI_DEADLINE_MS }),
      );
      await payWithCard(v, offer!, "pay");
    },
  },
  {
    name: "rewards",
    summary: "List a benefits site's rewards (a loyalty programme's shop) and the points your card holds for its programme.",
    usage: `[--site HOST:PORT] (default ${defaultAddress("benefits")}) ${DAEMON_USAGE} [--data DIR] ${CONNECT_USAGE}`,
    options: { ...daemonOption, ...siteOptions },
    async run(v) {
      const r = await listRewards(v);
      console.log(`${r.siteName} (${r.siteId?.value}), programme ${r.programme?.name} (${r.programme?.code})\n`);
      console.log(
        table(
          ["reward", "asks", "name"],
          r.rewards.map((x) => [x.rewardId, x.kind === RewardKind.REWARD_KIND_AUTHENTICATION ? "your card, no points" : m(x.price), x.name]),
        ),
      );
      const { points } = await withClient(CardholderServiceDefinition, daemonAddress(v), DAEMON, (c) => c.getCard({}, { deadline: CLI_DEADLINE_MS }));
      const held = points.find((p) => p.programme === r.programme?.code);
      console.log(`\nyour card holds ${held ? m(held.balance) : `no points of programme ${r.programme?.code}`}`);
      console.log("redeem one with: netpurse redeem REWARD; prove your card with: netpurse authenticate");
    },
  },
  {
    name: "redeem",
    summary:
      "Redeem a reward of a benefits site with the points on your card: the site makes an offer in its programme's\npoints, you approve, the card pays the points through the purchase protocol, the site releases the reward.",
    usage: `REWARD [--yes] [--site HOST:PORT] (default ${defaultAddress("benefits")}) ${DAEMON_USAGE} [--data DIR] ${CONNECT_USAGE}`,
    options: { ...daemonOption, ...siteOptions, yes: { type: "boolean", short: "y" } },
    async run(v, positionals) {
      const reward = positionals[0];
      if (!reward) throw new UsageError("name the reward to redeem (see 'netpurse rewards')");
      if (!v.yes && !process.stdin.isTTY) throw new UsageError("cannot ask for approval without a terminal; pass --yes to approve in scripts");
      await payWithCard(v, await siteOffer(v, reward), "redeem");
    },
  },
  {
    name: "authenticate",
    summary:
      "Prove to a benefits site that your card is present, with no password: a draw of zero in the authentication\ncurrency (999) that the card signs without moving value; the site matches the card to your member account\nand shows what needs only that (by default its first authentication reward, or --reward ID).",
    usage: `[--site HOST:PORT] (default ${defaultAddress("benefits")}) [--reward ID] [--yes] ${DAEMON_USAGE} [--data DIR] ${CONNECT_USAGE}`,
    options: { ...daemonOption, ...siteOptions, reward: { type: "string" }, yes: { type: "boolean", short: "y" } },
    async run(v) {
      if (!v.yes && !process.stdin.isTTY) throw new UsageError("cannot ask for approval without a terminal; pass --yes to approve in scripts");
      let reward = typeof v.reward === "string" ? v.reward : undefined;
      if (!reward) {
        const r = await listRewards(v);
        reward = r.rewards.find((x: Reward) => x.kind === RewardKind.REWARD_KIND_AUTHENTICATION)?.rewardId;
        if (!reward) throw new UsageError(`${r.siteName} offers nothing that needs only an authentication; see 'netpurse rewards'`);
      }
      await payWithCard(v, await siteOffer(v, reward), "authenticate");
    },
  },
]);

/** A benefits site's offer for one of its rewards, from its merchant service. */
async function siteOffer(v: Record<string, unknown>, reward: string): Promise<PaymentOffer> {
  const { offer } = await withClient(MerchantServiceDefinition, siteAddress(v), await publicChannel(v, "merchant"), (c) =>
    c.createOrder({ productId: reward }, { deadline: CLI_DEADLINE_MS }),
  );
  return offer!;
}

/**
 * The card answers an offer once the cardholder approved it: a payment in
 * money, a redemption in points, or an authentication (nothing paid). Points
 * a merchant grants with its receipt are collected onto the card by the
 * daemon as part of the payment.
 */
async function payWithCard(v: Record<string, unknown>, offer: PaymentOffer, verb: "pay" | "redeem" | "authenticate"): Promise<void> {
  const amount = offer.amount!;
  // An offer of another kind than the command says (points behind 'authenticate', money behind 'redeem') is never answered.
  if (!OFFER_KINDS[verb].accepts(amount.currency)) {
    throw new Error(
      `${offer.merchantName} asks ${m(amount)} for "${offer.description}", not ${OFFER_KINDS[verb].what}; nothing done, the card was not touched (that is for 'netpurse ${verbFor(amount.currency)}')`,
    );
  }
  await withClient(CardholderServiceDefinition, daemonAddress(v), DAEMON, async (c) => {
    const { purse, points } = await c.getCard({}, { deadline: CLI_DEADLINE_MS });
    const held = verb === "redeem" ? points.find((p) => p.programme === amount.currency)?.balance : purse!.balance;
    if (verb === "authenticate") {
      console.log(`${offer.merchantName} asks your card to prove it is present, for "${offer.description}"; nothing is paid`);
    } else {
      console.log(`${offer.merchantName} asks ${m(amount)} for "${offer.description}"`);
      console.log(`your card holds ${held ? m(held) : `no points of programme ${amount.currency}`}`);
      // Not asked to approve what the card cannot pay: the daemon would refuse it anyway.
      if (verb === "redeem" && (held?.amountMinor ?? 0n) < amount.amountMinor) {
        throw new Error(`not enough points for "${offer.description}": the card holds ${held ? m(held) : "none"}, it asks ${m(amount)}; nothing done`);
      }
    }
    const question = { pay: `Pay ${m(amount)}?`, redeem: `Redeem ${m(amount)}?`, authenticate: "Let the card sign a zero-value authentication?" }[verb];
    if (!v.yes && !(await approve(question))) {
      console.log("nothing done; the card was not touched");
      return;
    }
    console.log(verb === "authenticate" ? "authenticating…" : verb === "redeem" ? "redeeming…" : "paying…");
    const r = await underRequestId("payment", (requestId) => c.payOffer({ offer, approvedAmount: amount, requestId }, { deadline: 60_000 }));
    for (const s of r.steps) console.log(`  ${s.name.padEnd(15)} ${s.detail}`);
    const receipt: Receipt = r.receipt!;
    if (verb === "authenticate") console.log(`\nyour card was authenticated by ${receipt.merchantName}; nothing was paid`);
    else if (verb === "redeem") console.log(`\nredeemed ${m(receipt.amount)} at ${receipt.merchantName}; points now ${m(r.points?.balance)}`);
    else console.log(`\npaid ${m(receipt.amount)} to ${receipt.merchantName}; card balance now ${m(r.purse!.balance)}`);
    console.log(`receipt: transaction ${receipt.transactionId?.value}, PSAM ${hexOf(receipt.psamId?.value)}/${receipt.psamCounter}`);
    console.log(`${verb === "pay" ? "goods" : "reward"}:   ${receipt.goods}`);
    if (receipt.pointsGrant) {
      // The daemon collected the grant with the payment (its steps above); a step "points" says it kept it, to try again before the card's next use.
      const g = receipt.pointsGrant;
      const now = (await c.getCard({}, { deadline: CLI_DEADLINE_MS })).points.find((p) => p.programme === g.programme);
      const kept = r.steps.some((s) => s.name === "points");
      console.log(
        `\n${receipt.merchantName} granted ${m(g.points)} (grant ${g.grantId?.value}); ` +
          (kept ? `not on the card yet: the daemon collects them before the card's next use; points now ${m(now?.balance)}` : `points now ${m(now?.balance)}`),
      );
    }
  });
}

async function syncCard(address: string): Promise<void> {
  await withClient(CardholderServiceDefinition, address, DAEMON, async (c) => {
    const r = await c.syncCard({}, { deadline: 60_000 });
    if (!r.loads.length) console.log("no pending loads");
    else
      console.log(
        table(
          ["transaction", "outcome", "bank", "detail"],
          r.loads.map((l) => [
            l.transactionId?.value ?? "",
            LoadOutcome[l.outcome].replace("LOAD_OUTCOME_", "").toLowerCase(),
            HoldState[l.holdState].replace("HOLD_STATE_", "").toLowerCase(),
            l.detail,
          ]),
        ),
      );
    console.log(`\ncard balance ${m(r.purse!.balance)}`);
  });
}
