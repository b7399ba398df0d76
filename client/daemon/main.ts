import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { opt, runService } from "../../lib/service-main.js";
import { startClientDaemon } from "./server.js";

await runService({
  program: "netpurse-client-daemon",
  summary: "Client daemon: holds the cardholder's card and serves CardholderService on this machine.",
  options: { listen: { type: "string" }, data: { type: "string" }, dir: { type: "string" }, card: { type: "string" } },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("cardholder")}; keep it on loopback)`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --card FILE              the software card (default DATA/cards/demo.card.json)",
    "  --dir DIR                the daemon's folder (default DATA/client): its journal client.db",
  ].join("\n"),
  start: (v) => {
    const data = dataDir(v.data as string | undefined);
    return startClientDaemon({
      listen: opt(v, "listen", defaultAddress("cardholder")),
      card: opt(v, "card", join(data, "cards", "demo.card.json")),
      dir: opt(v, "dir", join(data, "client")),
    });
  },
});
