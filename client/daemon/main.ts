import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { opt, runService } from "../../lib/service-main.js";
import { pkiDirOf, Security } from "../../lib/pki/security.js";
import { startClientDaemon } from "./server.js";

/** Runs the client daemon until SIGINT/SIGTERM (also `netpurse daemon`). */
export function runDaemon(argv: string[], program = "netpurse-client-daemon"): Promise<void> {
  return runService({
    program,
    argv,
    summary: "Client daemon: holds the cardholder's card and serves CardholderService on this machine.",
    options: {
      listen: { type: "string" },
      data: { type: "string" },
      dir: { type: "string" },
      card: { type: "string" },
      ca: { type: "string" },
      insecure: { type: "boolean" },
    },
    help: [
      `  --listen HOST:PORT       address to serve on (default ${defaultAddress("cardholder")}; keep it on loopback)`,
      "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
      "  --card FILE              the software card (default DATA/cards/demo.card.json)",
      "  --dir DIR                the daemon's folder (default DATA/client): its journal client.db",
      "  --ca FILE                the CA bundle servers must prove themselves with (default DATA/pki/ca.crt)",
      "  --insecure               reach servers over plaintext, unchecked: for a network run with --insecure, for debugging only",
    ].join("\n"),
    start: async (v) => {
      const data = dataDir(v.data as string | undefined);
      return startClientDaemon({
        security: v.insecure === true ? Security.insecure() : await Security.forCardholder(opt(v, "ca", join(pkiDirOf(data), "ca.crt"))),
        listen: opt(v, "listen", defaultAddress("cardholder")),
        card: opt(v, "card", join(data, "cards", "demo.card.json")),
        dir: opt(v, "dir", join(data, "client")),
      });
    },
  });
}

if (import.meta.url === `file://${process.argv[1]}`) await runDaemon(process.argv.slice(2));
