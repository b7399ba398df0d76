import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { opt, runService } from "../../lib/service-main.js";
import { startClientDaemon } from "./server.js";

/** Runs the client daemon until SIGINT/SIGTERM (also `netpurse daemon`). */
export function runDaemon(argv: string[], program = "netpurse-client-daemon"): Promise<void> {
  return runService({
    program,
    argv,
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
}

if (import.meta.url === `file://${process.argv[1]}`) await runDaemon(process.argv.slice(2));
