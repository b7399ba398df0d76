import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { intOpt, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity } from "../../lib/service-main.js";
import { startTerminalHost } from "./server.js";
import { BATCH_CLOSE_DEFAULTS } from "./terminal-host.js";

await runService({
  program: "netpurse-terminal",
  summary: "Terminal host: holds PSAM slots, works off PSAM jobs from the concentrator, and sends its PSAMs' closed batches to clearing.",
  options: {
    id: { type: "string" },
    concentrator: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    window: { type: "string" },
    "batch-close-at": { type: "string" },
    "batch-close-after-ms": { type: "string" },
    clearing: { type: "string" },
    "answer-delay-ms": { type: "string" },
    "psam-readers": { type: "string" },
    ...SECURITY_OPTIONS,
  },
  help: [
    "  --id NAME                terminal id (default terminal-1)",
    `  --concentrator HOST:PORT[,HOST:PORT...]  concentrators to attach to, one at a time: when the stream ends or the
                           attach fails, the next in the list, after a back-off (default ${defaultAddress("concentrator")})`,
    `  --clearing HOST:PORT     clearing service, where closed batches are sent (default ${defaultAddress("clearing")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this host's folder (default DATA/terminals/ID): terminal.db and psams/*.psam.json",
    "  --psam-readers PATTERN   PSAMs are the cards in the PC/SC readers whose names match PATTERN (a regular expression,",
    "                           say 'netpurse PSAM'), instead of the PSAM files; a PSAM taken out leaves the pool at once,",
    "                           one put in joins it (see `netpurse readers`)",
    "  --window N               most jobs in flight (default: the number of PSAMs, at least 4 with --psam-readers)",
    `  --batch-close-at N       close a PSAM batch at N records (default ${BATCH_CLOSE_DEFAULTS.closeAt})`,
    `  --batch-close-after-ms N close a non-empty PSAM batch once its first record is N ms old (default ${BATCH_CLOSE_DEFAULTS.closeAfterMs})`,
    "  --answer-delay-ms N      fault injection: do each job, then wait N ms before answering (default 0)",
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const id = opt(v, "id", "terminal-1");
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "terminals", id));
    const t = await startTerminalHost({
      security: await serviceSecurity(v, { kind: "terminal", id }),
      terminalId: id,
      concentrator: opt(v, "concentrator", defaultAddress("concentrator")),
      dir,
      ...(v.window !== undefined ? { window: intOpt(v, "window", 1) } : {}),
      clearingAddress: opt(v, "clearing", defaultAddress("clearing")),
      batchCloseAt: intOpt(v, "batch-close-at", BATCH_CLOSE_DEFAULTS.closeAt),
      batchCloseAfterMs: intOpt(v, "batch-close-after-ms", BATCH_CLOSE_DEFAULTS.closeAfterMs),
      answerDelayMs: intOpt(v, "answer-delay-ms", 0),
      ...(typeof v["psam-readers"] === "string" ? { psamReaders: v["psam-readers"] } : {}),
    });
    return t;
  },
});
