import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { DATABASE_HELP, DATABASE_OPTIONS, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity, storeConfig } from "../../lib/service-main.js";
import { startLoadServer } from "./server.js";

await runService({
  program: "netpurse-load",
  summary: [
    "Load server: has its host security module sign LOAD commands for cards, verifies the cards' answers, confirms loads to the banks and reports each settled load to clearing.",
    "",
    "Its host security module is the one DATA/load/hsm.json describes (docs/hsm.md):",
    "  software (the default; 'netpurse-issuer provision-hsm'): the load master keys and the counter in that file;",
    "  PKCS#11, kind \"pkcs11\" ('netpurse-issuer provision-hsm --pkcs11 --module LIB --token LABEL'): the keys in a",
    "  token (SoftHSM2 or an HSM), never out of it; the file names the module, the token and the PIN file, and keeps",
    "  the counter. The PIN is read from the PIN file (mode 0600) or $NETPURSE_HSM_PIN, never from the command line.",
    "  It needs the optional npm package pkcs11js. While the token is out of reach, loads answer UNAVAILABLE",
    "  (reason SECURITY_MODULE_UNAVAILABLE), nothing is recorded, and each call tries the token again.",
  ].join("\n"),
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    id: { type: "string" },
    clearing: { type: "string" },
    ...DATABASE_OPTIONS,
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("load")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this server's folder (default DATA/load): load.db, banks.json, hsm.json",
    "  --id NAME                this load server's identity (default load-1)",
    `  --clearing HOST:PORT     the clearing service every settled load is reported to (default ${defaultAddress("clearing")});`,
    "                           loads go on while it is down, and wait in load.db until it acknowledges them",
    DATABASE_HELP,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "load"));
    return startLoadServer({
      security: await serviceSecurity(v, { kind: "load", id: opt(v, "id", "load-1") }),
      listen: opt(v, "listen", defaultAddress("load")),
      dir,
      store: storeConfig(v, join(dir, "load.db")),
      clearing: opt(v, "clearing", defaultAddress("clearing")),
    });
  },
});
