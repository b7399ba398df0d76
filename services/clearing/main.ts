import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { DATABASE_HELP, DATABASE_OPTIONS, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity, storeConfig } from "../../lib/service-main.js";
import { psamRegistryPath } from "../network/pki.js";
import { startClearing } from "./server.js";

await runService({
  program: "netpurse-clearing",
  summary:
    "Clearing: the concentration point for the PSAMs' batches and the load server's loads; checks every record, posts it once to a double-entry ledger and reports settlement positions.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    id: { type: "string" },
    "psam-registry": { type: "string" },
    ...DATABASE_OPTIONS,
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("clearing")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                clearing's folder (default DATA/clearing): clearing.db, keys.json, merchants.json",
    "  --psam-registry FILE     the issuer's PSAM registry (default DATA/concentrator/psams.json)",
    "  --id NAME                this service's identity (default clearing-1)",
    DATABASE_HELP,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const data = dataDir(v.data as string | undefined);
    const security = await serviceSecurity(v, { kind: "clearing", id: opt(v, "id", "clearing-1") });
    const dir = opt(v, "dir", join(data, "clearing"));
    return startClearing({
      security,
      listen: opt(v, "listen", defaultAddress("clearing")),
      dir,
      store: storeConfig(v, join(dir, "clearing.db")),
      ...(security.insecure && v["psam-registry"] === undefined ? {} : { psamRegistry: opt(v, "psam-registry", psamRegistryPath(data)) }),
    });
  },
});
