import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { daemonPaths } from "./access.js";
import { opt, runService } from "../../lib/service-main.js";
import { pkiDirOf, Security } from "../../lib/pki/security.js";
import { startClientDaemon } from "./server.js";

/** The card behind PC/SC that --pcsc or --reader asks for, if any. */
function pcscCard(v: Record<string, unknown>): { reader: string } | undefined {
  if (typeof v.reader === "string" && v.card !== undefined) throw new Error("--card names a software card and --reader a card in a reader: give one");
  if (typeof v.reader === "string") return { reader: v.reader };
  if (v.pcsc === true) return { reader: "" };
  return undefined;
}

/** Runs the client daemon until SIGINT/SIGTERM (also `netpurse daemon`). */
export function runDaemon(argv: string[], program = "netpurse-client-daemon"): Promise<void> {
  return runService({
    program,
    argv,
    summary:
      "Client daemon: holds the cardholder's card and serves CardholderService to the cardholder alone: on a Unix socket\nin a folder only they may enter, and on loopback TCP, if asked, to callers with its token.",
    options: {
      socket: { type: "string" },
      "listen-tcp": { type: "string" },
      token: { type: "string" },
      listen: { type: "string" },
      data: { type: "string" },
      dir: { type: "string" },
      card: { type: "string" },
      reader: { type: "string" },
      pcsc: { type: "boolean" },
      ca: { type: "string" },
      insecure: { type: "boolean" },
    },
    help: [
      "  --socket PATH            the Unix socket to serve on (default DIR/run/daemon.sock); its folder is made mode 0700,",
      "                           and the daemon refuses to start if it exists and others may enter it or it is not yours",
      `  --listen-tcp HOST:PORT   also serve on this loopback address (say ${defaultAddress("cardholder")}), where every call must carry`,
      "                           'authorization: Bearer TOKEN' with the token of the token file",
      "  --token FILE             the token file for --listen-tcp (default DIR/daemon.token; made mode 0600 on first use)",
      "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
      "  --card FILE              the software card (default DATA/cards/demo.card.json)",
      "  --pcsc                   use a card in a PC/SC reader instead (pcscd): the first reader holding a netpurse card",
      "  --reader NAME            use the card in the PC/SC reader of this name (see `netpurse readers`); implies --pcsc",
      "  --dir DIR                the daemon's folder (default DATA/client): its journal client.db, its socket, its token",
      "  --ca FILE                the CA bundle servers must prove themselves with (default DATA/pki/ca.crt)",
      "  --insecure               reach servers over plaintext, unchecked: for a network run with --insecure, for debugging only",
    ].join("\n"),
    start: async (v) => {
      if (v.listen !== undefined) {
        throw new Error("--listen is gone: the daemon serves its Unix socket (--socket), and TCP only with a token (--listen-tcp HOST:PORT)");
      }
      const data = dataDir(v.data as string | undefined);
      const dir = opt(v, "dir", join(data, "client"));
      const tcp = v["listen-tcp"];
      return startClientDaemon({
        security: v.insecure === true ? Security.insecure() : await Security.forCardholder(opt(v, "ca", join(pkiDirOf(data), "ca.crt"))),
        socket: opt(v, "socket", daemonPaths(dir).socket),
        ...(typeof tcp === "string" ? { listenTcp: tcp } : {}),
        tokenFile: opt(v, "token", daemonPaths(dir).token),
        card: pcscCard(v) ?? opt(v, "card", join(data, "cards", "demo.card.json")),
        dir,
      });
    },
  });
}

if (import.meta.url === `file://${process.argv[1]}`) await runDaemon(process.argv.slice(2));
