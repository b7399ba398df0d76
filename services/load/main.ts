import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity } from "../../lib/service-main.js";
import { startLoadServer } from "./server.js";

await runService({
  program: "netpurse-load",
  summary:
    "Load server: has its host security module sign LOAD commands for cards, verifies the cards' answers, confirms loads to the banks and reports each settled load to clearing.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    id: { type: "string" },
    clearing: { type: "string" },
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("load")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this server's folder (default DATA/load): load.db, banks.json, hsm.json",
    "  --id NAME                this load server's identity (default load-1)",
    `  --clearing HOST:PORT     the clearing service every settled load is reported to (default ${defaultAddress("clearing")});`,
    "                           loads go on while it is down, and wait in load.db until it acknowledges them",
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) =>
    startLoadServer({
      security: await serviceSecurity(v, { kind: "load", id: opt(v, "id", "load-1") }),
      listen: opt(v, "listen", defaultAddress("load")),
      dir: opt(v, "dir", join(dataDir(v.data as string | undefined), "load")),
      clearing: opt(v, "clearing", defaultAddress("clearing")),
    }),
});
