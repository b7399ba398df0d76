// The cardholder's sessions at banks, for `netpurse load`: the CLI logs in
// to the bank itself, over TLS checked against the installation's CA, with
// the account's password (asked once, or $NETPURSE_BANK_PASSWORD), and keeps
// only the access token it gets, with its expiry, in a private file under the
// daemon's folder, by bank address and account. The next load reuses the
// token until it expires; the password is never written down.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { dataDir } from "../../lib/config.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import type { ChannelSecurity } from "../../lib/pki/security.js";

/** DATA/client/bank-tokens.json (mode 0600). */
export const bankTokensFile = (data: string | undefined) => join(dataDir(data), "client", "bank-tokens.json");

interface TokensFile {
  format: 1;
  /** By "<bank address> <account id>". */
  tokens: Record<string, { accessToken: string; expiresAt: string }>;
}

/** A token this close to its expiry is not used: a load takes a few seconds, and clocks differ a little. */
const MARGIN_MS = 60_000;

const keyOf = (bank: string, account: string) => `${bank} ${account}`;

async function readTokens(file: string): Promise<TokensFile> {
  if (!existsSync(file)) return { format: 1, tokens: {} };
  try {
    const f = await readJson<TokensFile>(file);
    return f.format === 1 && typeof f.tokens === "object" && f.tokens !== null ? f : { format: 1, tokens: {} };
  } catch {
    return { format: 1, tokens: {} }; // an unreadable file costs one login, nothing more
  }
}

/**
 * An access token for `account` at the bank at `bank`: the kept one while it
 * is valid (unless `fresh`), else a new one from Login with `password()`,
 * which is kept in its place (expired tokens are dropped from the file).
 */
export async function bankAccessToken(p: {
  bank: string;
  account: string;
  security: ChannelSecurity;
  file: string;
  password: () => Promise<string>;
  fresh?: boolean;
}): Promise<string> {
  const kept = await readTokens(p.file);
  const key = keyOf(p.bank, p.account);
  const known = kept.tokens[key];
  if (!p.fresh && known && Date.parse(known.expiresAt) - Date.now() > MARGIN_MS) return known.accessToken;
  const password = await p.password();
  const channel = openChannel(p.bank, p.security);
  let session;
  try {
    session = await clientFactory().create(BankServiceDefinition, channel).login({ accountId: p.account, password }, { deadline: CLI_DEADLINE_MS });
  } finally {
    channel.close();
  }
  const now = Date.now();
  const tokens = Object.fromEntries(Object.entries(kept.tokens).filter(([k, t]) => k !== key && Date.parse(t.expiresAt) > now));
  tokens[key] = { accessToken: session.accessToken, expiresAt: (session.expiresAt ?? new Date(now)).toISOString() };
  await writeJsonAtomic(p.file, { format: 1, tokens } satisfies TokensFile, { private: true });
  return session.accessToken;
}
