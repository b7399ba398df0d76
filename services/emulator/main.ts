// netpurse-emulator: software cards and PSAMs in emulated PC/SC readers, one
// reader per file, all served by this one process; with --pcscd it also runs
// the pcscd that shows them. `netpurse-emulator reader-conf` writes the same
// readers' configuration for a system pcscd. docs/readers.md.

import { resolve } from "node:path";
import { parseArgs } from "node:util";
import { createLogger } from "../../lib/log.js";
import { runService } from "../../lib/service-main.js";
import { openSlot, readerSlots, startEmulatedReaders, type ReaderSlot } from "./emulator.js";
import { serveControl } from "./emulator-process.js";
import { buildLoopbackShim, DEFAULT_PORT_BASE, pcscSupport, writeReaderConf } from "./pcscd.js";

const PROGRAM = "netpurse-emulator";

type Values = Record<string, string | boolean | (string | boolean)[] | undefined>;

/** The options naming the readers, shared by serving and reader-conf so that both make the same readers. */
const READER_OPTIONS = {
  card: { type: "string", multiple: true },
  psam: { type: "string", multiple: true },
  "port-base": { type: "string" },
} as const;

const READER_HELP = [
  '  --card FILE              a software card file (*.card.json) to serve in reader "netpurse card N"; repeat for more',
  '  --psam FILE              a software PSAM file (*.psam.json) to serve in reader "netpurse PSAM N"; repeat for more',
  `  --port-base N            first vpcd port on 127.0.0.1; reader K uses N + 2K (default ${DEFAULT_PORT_BASE})`,
].join("\n");

/** The readers the options ask for: cards first, then PSAMs, each numbered from 1. */
function slotsOf(v: Values): ReaderSlot[] {
  const files = (name: string) => ((v[name] as string[] | undefined) ?? []).map((f) => resolve(f));
  const cards = files("card");
  const psams = files("psam");
  if (cards.length + psams.length === 0) throw new UsageError("give at least one --card FILE or --psam FILE");
  const raw = v["port-base"];
  const portBase = raw === undefined ? DEFAULT_PORT_BASE : Number(raw);
  if (!Number.isInteger(portBase)) throw new UsageError(`--port-base must be an integer, got ${JSON.stringify(raw)}`);
  try {
    return readerSlots({ cards, psams }, portBase);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

class UsageError extends Error {}

async function readerConf(argv: string[]): Promise<void> {
  const usage = [
    `Usage: ${PROGRAM} reader-conf --dir DIR (--card FILE | --psam FILE)... [--port-base N]`,
    "",
    "Writes the reader configuration of the readers that the same --card, --psam and --port-base options",
    "serve, for a system pcscd: DIR/reader.conf.d/netpurse-N.conf (one entry per reader), DIR/drivers/ (a copy",
    "of the vpcd driver per entry) and DIR/vpcd-loopback.so (the shim that keeps vpcd on loopback and fast),",
    "then prints how to install them. DIR must be writable by its owner alone: pcscd loads code from it.",
    "",
    "Options:",
    "  --dir DIR                where to write (made mode 0700 if missing)",
    READER_HELP,
    "  -h, --help               this text",
    "",
  ].join("\n");
  let v: Values;
  try {
    v = parseArgs({ args: argv, options: { ...READER_OPTIONS, dir: { type: "string" }, help: { type: "boolean", short: "h" } }, strict: true }).values;
    if (v.help) {
      process.stdout.write(usage);
      return;
    }
    if (typeof v.dir !== "string") throw new UsageError("--dir DIR is required");
  } catch (e) {
    process.stderr.write(`${PROGRAM} reader-conf: ${(e as Error).message}\n\n${usage}`);
    process.exitCode = 2;
    return;
  }
  try {
    const dir = resolve(v.dir);
    const slots = slotsOf(v);
    const conf = await writeReaderConf(
      dir,
      slots.map((s) => ({ name: s.friendlyName, port: s.port })),
    );
    const shim = await buildLoopbackShim(dir);
    const lines = [
      `wrote ${slots.length} reader entries in ${conf.confDir} (a driver copy each in ${dir}/drivers) and the shim ${shim}:`,
      ...slots.map((s) => `  "${s.name}" on vpcd port ${s.port}, for ${s.kind} ${s.file}`),
      "",
      "To serve them with the system pcscd (as root; docs/readers.md):",
      `  cp ${conf.confDir}/netpurse-*.conf /etc/reader.conf.d/`,
      "  mkdir -p /etc/systemd/system/pcscd.service.d",
      `  printf '[Service]\\nEnvironment=LD_PRELOAD=${shim}\\n' > /etc/systemd/system/pcscd.service.d/netpurse-vpcd.conf`,
      "  systemctl daemon-reload && systemctl restart pcscd",
      `then run ${PROGRAM} with the same --card, --psam and --port-base options (without --pcscd).`,
      "",
    ];
    process.stdout.write(lines.join("\n"));
  } catch (e) {
    const usageError = e instanceof UsageError;
    process.stderr.write(`${PROGRAM} reader-conf: ${(e as Error).message}\n${usageError ? `\n${usage}` : ""}`);
    process.exitCode = usageError ? 2 : 1;
  }
}

const argv = process.argv.slice(2);
if (argv[0] === "reader-conf") {
  await readerConf(argv.slice(1));
} else {
  await runService({
    program: PROGRAM,
    summary: [
      "Serves software cards and PSAMs in emulated PC/SC readers (pcscd with vsmartcard's vpcd driver), one",
      "reader per file, from this one process, until SIGINT or SIGTERM. With --pcscd it also runs its own",
      "pcscd (only one pcscd can run per machine); without, the cards wait for a system pcscd configured by",
      `'${PROGRAM} reader-conf' (run '${PROGRAM} reader-conf --help'). Do not serve a file another process`,
      "is using (a client daemon's card, a terminal host's PSAM): each would overwrite the other's state.",
    ].join("\n"),
    options: { ...READER_OPTIONS, pcscd: { type: "string" } },
    help: [READER_HELP, "  --pcscd DIR              run pcscd with these readers, its configuration, shim and log in DIR (mode 0700)"].join("\n"),
    start: async (v) => {
      const slots = slotsOf(v);
      const pcscdDir = typeof v.pcscd === "string" ? resolve(v.pcscd) : undefined;
      if (pcscdDir) {
        const support = await pcscSupport({ binding: false });
        if (!support.ok) throw new Error(support.reason);
      }
      const cards = await Promise.all(slots.map(async (s) => ({ name: s.friendlyName, app: await openSlot(s) })));
      const emulated = await startEmulatedReaders({
        dir: pcscdDir ?? "",
        cards,
        pcscd: pcscdDir !== undefined,
        portBase: slots[0]!.port,
        log: createLogger(PROGRAM),
      });
      const stopControl = serveControl(emulated);
      for (const s of slots) process.stdout.write(`reader "${s.name}" serves ${s.kind} ${s.file} (vpcd 127.0.0.1:${s.port})\n`);
      if (emulated.pcscd) {
        process.stdout.write(`pcscd pid ${emulated.pcscd.pid} serves them; its log: ${emulated.pcscd.logPath}\n`);
      } else {
        process.stdout.write(
          `no --pcscd: the cards connect as soon as a pcscd configured by '${PROGRAM} reader-conf --dir DIR' with the same --card, --psam and --port-base options listens\n`,
        );
      }
      return {
        // One word, for whoever reads the "listening on" line: the vpcd ports the cards connect to.
        address: `127.0.0.1:${slots.map((s) => s.port).join(",")}`,
        close: async () => {
          stopControl();
          await emulated.close();
        },
      };
    },
  });
}
