// netpurse-bank: the demo bank's commands. Opening accounts and setting
// their passwords writes the bank's own books (which stand in for a core
// banking system); statements come from the running bank server over gRPC,
// for the account holder, who logs in with the account's password.

import { join } from "node:path";
import { BankServiceDefinition, HoldState, type Hold, type StatementLine } from "../../gen/netpurse/bank/v1/bank.js";
import { runCommands, int, str, UsageError, CONNECT_OPTIONS, CONNECT_USAGE, publicChannel } from "../../lib/cli.js";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { bearer, clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { isName } from "../../lib/ids.js";
import { formatMinor, formatMoney, parseMinor } from "../../lib/money.js";
import { storeConfig } from "../../lib/service-main.js";
import { openStore } from "../../lib/store/postgres.js";
import { table } from "../../lib/table.js";
import { bankPassword, BANK_PASSWORD_ENV } from "../../lib/secret-input.js";
import { hashPassword, passwordProblem } from "./credentials.js";
import { BANK_MIGRATIONS, BANK_SCHEMA, BankStore } from "./store.js";

/** Where the bank's books are: its folder's bank.db, or the database the bank server was given (--database, $NETPURSE_DATABASE_URL). */
const dataOption = { data: { type: "string" }, database: { type: "string" } } as const;
const DATA_USAGE = "[--data DIR | --database URL]";
const passwordOption = { "password-file": { type: "string" } } as const;
const PASSWORD_HELP = `The password is asked on the terminal (not shown), or, for scripts, read from --password-file FILE (its first line)\nor $${BANK_PASSWORD_ENV}; never from the command line, where other users of the machine could read it.`;

/** A new password for an account, from the file, the environment or the terminal, checked and hashed (only the hash is kept). */
async function newPasswordHash(v: Record<string, unknown>, accountId: string): Promise<string> {
  const password = await bankPassword({
    ...(typeof v["password-file"] === "string" ? { file: v["password-file"] } : {}),
    prompt: `new password for account ${accountId}: `,
    confirm: true,
  });
  const problem = passwordProblem(password);
  if (problem) throw new UsageError(problem);
  return hashPassword(password);
}

/** Every entry of a paged list (AIP-158), page after page, or the first `limit` of them. */
async function allPages<T>(page: (token: string) => Promise<{ items: T[]; next: string }>, limit = Infinity): Promise<T[]> {
  const out: T[] = [];
  let token = "";
  do {
    const r = await page(token);
    out.push(...r.items);
    token = r.next;
  } while (token && out.length < limit);
  return out.slice(0, limit);
}

async function withStore<T>(v: Record<string, unknown>, fn: (s: BankStore) => Promise<T>): Promise<T> {
  const { location } = storeConfig({ database: v.database as string | undefined }, join(dataDir(v.data as string | undefined), "bank", "bank.db"));
  // One connection is all a command needs; the schema is the bank server's.
  const db = await openStore(location, BANK_MIGRATIONS, { poolSize: 1, schema: BANK_SCHEMA });
  try {
    return await fn(new BankStore(db));
  } finally {
    await db.close();
  }
}

await runCommands("netpurse-bank", "Demo bank tools: accounts (standing in for a bank's core system), their holders' passwords, and statements.", [
  {
    name: "open-account",
    summary: `Open a demo account with an opening deposit and its holder's password.\nThe holder logs in with the password (at least 8 characters) to load a card or read the account.\n${PASSWORD_HELP}`,
    usage: `--id ACCOUNT --holder NAME [--deposit 500.00] [--currency 978] [--exponent 2] [--password-file FILE] ${DATA_USAGE}`,
    options: {
      ...dataOption,
      ...passwordOption,
      id: { type: "string" },
      holder: { type: "string" },
      deposit: { type: "string" },
      currency: { type: "string" },
      exponent: { type: "string" },
    },
    async run(v) {
      if (typeof v.id !== "string" || typeof v.holder !== "string") throw new UsageError("--id and --holder are required");
      if (!isName(v.id, 32)) throw new UsageError("--id must be 1..32 characters of [A-Za-z0-9._-]");
      const exponent = int(v.exponent, 2, "exponent");
      const currency = int(v.currency, 978, "currency");
      const openingMinor = Number(parseMinor(str(v.deposit, "500.00"), exponent));
      const id = v.id;
      if (await withStore(v, (s) => s.account(id))) throw new UsageError(`account ${id} exists already`);
      const passwordHash = await newPasswordHash(v, id);
      await withStore(v, async (s) => {
        if (await s.account(id)) throw new UsageError(`account ${id} exists already`);
        await s.open({ accountId: id, holder: v.holder as string, currency, exponent, openingMinor, passwordHash });
      });
      console.log(
        `opened account ${id} for ${v.holder} with ${formatMoney({ amountMinor: openingMinor, currency, exponent })}; its holder logs in with the password given`,
      );
    },
  },
  {
    name: "set-password",
    summary: `Set or reset an account's password; every access token of the account stops working.\nAccounts opened before passwords existed have none, and cannot log in until given one.\n${PASSWORD_HELP}`,
    usage: `ACCOUNT [--password-file FILE] ${DATA_USAGE}`,
    options: { ...dataOption, ...passwordOption },
    async run(v, positionals) {
      const id = positionals[0];
      if (!id) throw new UsageError("name the account");
      if (!(await withStore(v, (s) => s.account(id)))) throw new UsageError(`no account ${id} at this bank`);
      const hash = await newPasswordHash(v, id);
      await withStore(v, (s) => s.setPasswordHash(id, hash));
      console.log(`password of account ${id} set; its earlier access tokens no longer work`);
    },
  },
  {
    name: "accounts",
    summary: "List the bank's accounts with their balances.",
    usage: DATA_USAGE,
    options: { ...dataOption },
    async run(v) {
      const rows = await withStore(v, async (s) => Promise.all((await s.accounts()).map(async (a) => ({ a, available: await s.available(a) }))));
      console.log(
        table(
          ["account", "holder", "balance", "available"],
          rows.map(({ a, available }) => [a.account_id, a.holder, formatMinor(a.balance_minor, a.exponent), formatMinor(available, a.exponent)]),
        ),
      );
    },
  },
  {
    name: "statement",
    summary: `Show an account's balance, the funds on hold for loads, and its statement (every line, or the newest N), from the running bank.\nLogs in as the account holder, with the account's password. ${PASSWORD_HELP}`,
    usage: `ACCOUNT [--limit N] [--bank HOST:PORT] (default ${defaultAddress("bank")}) [--password-file FILE] ${CONNECT_USAGE}`,
    options: { bank: { type: "string" }, limit: { type: "string" }, ...passwordOption, ...CONNECT_OPTIONS },
    async run(v, positionals) {
      const id = positionals[0];
      if (!id) throw new UsageError("name the account");
      const limit = int(v.limit, 0, "limit");
      if (limit < 0) throw new UsageError("--limit must be 0 (every line) or more");
      const channel = openChannel(str(v.bank, defaultAddress("bank")), await publicChannel(v, "bank"));
      try {
        const bank = clientFactory().create(BankServiceDefinition, channel);
        const password = await bankPassword({
          ...(typeof v["password-file"] === "string" ? { file: v["password-file"] } : {}),
          prompt: `password for account ${id}: `,
        });
        const { accessToken } = await bank.login({ accountId: id, password }, { deadline: CLI_DEADLINE_MS });
        const asHolder = { deadline: CLI_DEADLINE_MS, metadata: bearer(accessToken) };
        const a = await bank.getAccount({ accountId: id }, asHolder);
        const holds = await allPages<Hold>(async (pageToken) => {
          const r = await bank.listHolds({ accountId: id, pageToken }, asHolder);
          return { items: r.holds, next: r.nextPageToken };
        });
        const statement = await allPages<StatementLine>(async (pageToken) => {
          const r = await bank.listStatementLines({ accountId: id, pageToken, pageSize: Math.min(limit, 1000) }, asHolder);
          return { items: r.lines, next: r.nextPageToken };
        }, limit || Infinity);
        console.log(`account ${a.accountId} (${a.holder})   balance ${formatMoney(a.balance!)}   available ${formatMoney(a.available!)}\n`);
        const held = holds.filter((h) => h.state === HoldState.HOLD_STATE_HELD);
        if (held.length) {
          console.log("on hold for loads not yet confirmed:");
          console.log(
            table(
              ["since (UTC)", "amount", "card", "transaction"],
              held.map((h) => [
                h.createdAt!.toISOString().replace("T", " ").slice(0, 19),
                formatMoney(h.amount!),
                Buffer.from(h.purseId?.value ?? []).toString("hex"),
                h.transactionId?.value ?? "",
              ]),
            ),
          );
          console.log("");
        }
        console.log(
          table(
            ["posted (UTC)", "text", "amount", "balance"],
            statement.map((l) => [l.postedAt!.toISOString().replace("T", " ").slice(0, 19), l.text, formatMoney(l.amount!), formatMoney(l.balanceAfter!)]),
          ),
        );
      } finally {
        channel.close();
      }
    },
  },
]);
