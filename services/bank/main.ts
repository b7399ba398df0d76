import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import {
  DATABASE_HELP,
  DATABASE_OPTIONS,
  intOpt,
  opt,
  runService,
  SECURITY_HELP,
  SECURITY_OPTIONS,
  serviceSecurity,
  storeConfig,
} from "../../lib/service-main.js";
import { DEFAULT_ACCESS_TOKEN_TTL_MS, DEFAULT_MAX_HOLDS_PER_ACCOUNT } from "./bank-server.js";
import { readBankFile } from "./identity.js";
import { startBankServer } from "./server.js";

await runService({
  program: "netpurse-bank-server",
  summary:
    "Demo bank: load offers with a hold on the account, posted only on the load server's sealed confirmation.\nIts accounts stand in for a bank's core system. Only the account holder, logged in with the account's\npassword (Login, then 'authorization: Bearer TOKEN'), reads an account or has its funds held for a load.\nFailed logins lock an account after 5 within 15 minutes, and a caller address after 20, for 15 minutes.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    "load-server": { type: "string" },
    "stale-hold-ms": { type: "string" },
    "max-holds-per-account": { type: "string" },
    "access-token-ttl-ms": { type: "string" },
    ...DATABASE_OPTIONS,
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("bank")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this bank's folder (default DATA/bank): bank.db, bank.json",
    `  --load-server HOST:PORT  the load server named in load offers (default ${defaultAddress("load")})`,
    "  --stale-hold-ms N        after how long without a confirmation the bank asks the load server to end a load (default 900000)",
    `  --max-holds-per-account N  loads one account may have waiting for their confirmation at once (default ${DEFAULT_MAX_HOLDS_PER_ACCOUNT})`,
    `  --access-token-ttl-ms N  how long an access token from Login acts for its account (default ${DEFAULT_ACCESS_TOKEN_TTL_MS})`,
    DATABASE_HELP,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "bank"));
    const { bankId } = await readBankFile(join(dir, "bank.json"));
    return startBankServer({
      security: await serviceSecurity(v, { kind: "bank", id: bankId }),
      listen: opt(v, "listen", defaultAddress("bank")),
      dir,
      store: storeConfig(v, join(dir, "bank.db")),
      loadServer: opt(v, "load-server", defaultAddress("load")),
      staleHoldMs: intOpt(v, "stale-hold-ms", 15 * 60_000),
      maxHoldsPerAccount: intOpt(v, "max-holds-per-account", DEFAULT_MAX_HOLDS_PER_ACCOUNT),
      accessTokenTtlMs: intOpt(v, "access-token-ttl-ms", DEFAULT_ACCESS_TOKEN_TTL_MS),
    });
  },
});
