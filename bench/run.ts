// npm run bench: purchases per second and latency of the whole network, per
// number of PSAMs and of concurrent cardholders, beside a bare gRPC echo on
// the same transport (the stack suite); and each confirmation mode with the
// cardholders some milliseconds away from the payment server, beside the
// chatty remote-reader approach (the modes suite). Markdown on stdout, JSON
// in bench/results/latest.json, progress on stderr.

import { execFileSync } from "node:child_process";
import { cpus } from "node:os";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { measureEcho, type EchoResult } from "./echo.js";
import { handleInterrupts } from "./interrupt.js";
import type { Phases } from "./load.js";
import { measureModes, type ModesReport, type ModesSettings } from "./modes.js";
import { modesErrors } from "./modes-report.js";
import { measurePurchases, type PurchaseResult } from "./purchases.js";
import { renderReport, writeJson, type Report } from "./report.js";

const DEFAULT_OUT = fileURLToPath(new URL("./results/latest.json", import.meta.url));

const USAGE = `Usage: npm run bench -- [options]

Two suites, both by default. Each starts the netpurse network as processes,
fresh for every configuration, with cardholders buying a song in a closed loop.

stack: purchases per second and payOffer latency per number of PSAMs and of
cardholders (mode PSAM_VERIFIES), beside a unary gRPC echo on the same
transport at the same concurrencies.

modes: each confirmation mode (one demo shop per mode) with the cardholder ↔
payment server path delayed by a TCP proxy, beside the chatty remote-reader
approach (one card APDU per round trip) through the same proxy: round trips
and messages per purchase, latency, PSAM hold time, throughput, memory.

Options:
  --suite NAME          all, stack or modes (default all)
  --psams LIST          stack: PSAMs on the terminal host, comma-separated (default 1,4,16)
  --clients LIST        stack: concurrent cardholders, comma-separated (default 1,8,64)
  --seconds N           stack: measuring window per configuration, seconds (default 10)
  --delay-ms LIST       modes: one-way delays on the cardholder ↔ payment server path, ms,
                        comma-separated; each gets a run per mode (default 25,100)
  --modes-psams N       modes: PSAMs (default 4)
  --modes-clients N     modes: concurrent cardholders (default 64)
  --modes-seconds N     modes: measuring window per run, seconds (default 8)
  --warmup N            warm-up before each window, seconds (default 2)
  --out FILE            JSON results (default bench/results/latest.json)
  --keep-data           keep each run's data folder and service logs (paths in the JSON)
  -h, --help            this text

Exit status: 0 when every purchase and echo succeeded, 1 otherwise, 2 for bad options.
`;

const SUITES = ["all", "stack", "modes"] as const;
type Suite = (typeof SUITES)[number];

interface Settings {
  suite: Suite;
  psams: number[];
  clients: number[];
  phases: Phases;
  modes: ModesSettings;
  out: string;
  keepData: boolean;
}

class UsageError extends Error {}

function wholeNumbers(text: string, flag: string, least: 0 | 1): number[] {
  const list = text.split(",").map((s) => Number(s.trim()));
  if (list.length === 0 || !list.every((n) => Number.isInteger(n) && n >= least)) {
    throw new UsageError(`--${flag} takes ${least ? "positive" : "non-negative"} whole numbers separated by commas, got "${text}"`);
  }
  return list;
}

const positiveInts = (text: string, flag: string) => wholeNumbers(text, flag, 1);

function positiveInt(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isInteger(n) || n <= 0) throw new UsageError(`--${flag} takes a positive whole number, got "${text}"`);
  return n;
}

function suite(text: string): Suite {
  const found = SUITES.find((s) => s === text);
  if (!found) throw new UsageError(`--suite takes ${SUITES.join(", ")}, got "${text}"`);
  return found;
}

function seconds(text: string, flag: string): number {
  const n = Number(text);
  if (!Number.isFinite(n) || n < 0) throw new UsageError(`--${flag} takes a number of seconds, got "${text}"`);
  return n * 1000;
}

/** The settings, or undefined when the user asked for help. */
function parseSettings(argv: string[]): Settings | undefined {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    options: {
      suite: { type: "string", default: "all" },
      psams: { type: "string", default: "1,4,16" },
      clients: { type: "string", default: "1,8,64" },
      seconds: { type: "string", default: "10" },
      "delay-ms": { type: "string", default: "25,100" },
      "modes-psams": { type: "string", default: "4" },
      "modes-clients": { type: "string", default: "64" },
      "modes-seconds": { type: "string", default: "8" },
      warmup: { type: "string", default: "2" },
      out: { type: "string", default: DEFAULT_OUT },
      "keep-data": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  const measureMs = seconds(values.seconds, "seconds");
  const modesMeasureMs = seconds(values["modes-seconds"], "modes-seconds");
  if (measureMs === 0 || modesMeasureMs === 0) throw new UsageError("--seconds and --modes-seconds must be more than 0");
  const warmupMs = seconds(values.warmup, "warmup");
  return {
    suite: suite(values.suite),
    psams: positiveInts(values.psams, "psams"),
    clients: positiveInts(values.clients, "clients"),
    phases: { warmupMs, measureMs },
    modes: {
      psams: positiveInt(values["modes-psams"], "modes-psams"),
      cardholders: positiveInt(values["modes-clients"], "modes-clients"),
      delaysMs: wholeNumbers(values["delay-ms"], "delay-ms", 0),
      phases: { warmupMs, measureMs: modesMeasureMs },
      keepData: values["keep-data"],
    },
    out: resolve(values.out),
    keepData: values["keep-data"],
  };
}

/** The commit measured, marked when the work tree differs from it: results compare only against the same code. */
function sourceVersion(): string {
  try {
    const git = (...args: string[]) => execFileSync("git", args, { cwd: fileURLToPath(new URL("..", import.meta.url)), encoding: "utf8" }).trim();
    return `${git("rev-parse", "--short", "HEAD")}${git("status", "--porcelain") ? " (with uncommitted changes)" : ""}`;
  } catch {
    return "unknown (not a git work tree)";
  }
}

/** The stack suite: the echo baseline, then every configuration. */
async function measureStack(s: Settings): Promise<{ echo: EchoResult[]; purchases: PurchaseResult[] }> {
  const configurations = s.psams.flatMap((psams) => s.clients.map((cardholders) => ({ psams, cardholders })));
  process.stderr.write(
    `netpurse bench, stack: ${configurations.length} configurations and ${s.clients.length} echo runs, ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of load each, plus start-up\n`,
  );
  const echo = await measureEcho([...new Set(s.clients)], s.phases);
  const purchases: PurchaseResult[] = [];
  for (const [i, c] of configurations.entries()) {
    process.stderr.write(`configuration ${i + 1}/${configurations.length}\n`);
    purchases.push(await measurePurchases(c, s.phases, { keepData: s.keepData }));
  }
  return { echo, purchases };
}

async function runBenchmark(s: Settings): Promise<Report> {
  const startedAt = new Date();
  const { echo, purchases } = s.suite === "modes" ? { echo: [], purchases: [] } : await measureStack(s);
  const modes: ModesReport | undefined = s.suite === "stack" ? undefined : await measureModes(s.modes);
  const cpu = cpus();
  return {
    startedAt: startedAt.toISOString(),
    source: sourceVersion(),
    wallSeconds: (Date.now() - startedAt.getTime()) / 1000,
    machine: { cores: cpu.length, cpuModel: cpu[0]?.model.trim() ?? "unknown", node: process.version, platform: `${process.platform} ${process.arch}` },
    phases: s.phases,
    echo,
    purchases,
    ...(modes ? { modes } : {}),
  };
}

async function main(): Promise<void> {
  let settings: Settings | undefined;
  try {
    settings = parseSettings(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`netpurse bench: ${(e as Error).message}\nRun 'npm run bench -- --help' for the options.\n`);
    process.exitCode = 2;
    return;
  }
  if (!settings) {
    process.stdout.write(USAGE);
    return;
  }
  handleInterrupts();
  const report = await runBenchmark(settings);
  process.stdout.write(`# netpurse benchmark, ${report.startedAt}, ${report.source}\n\n${renderReport(report)}`);
  await writeJson(settings.out, report);
  process.stderr.write(`results written to ${settings.out}\n`);
  const errors = [...report.echo, ...report.purchases].reduce((n, r) => n + r.errors, 0) + (report.modes ? modesErrors(report.modes) : 0);
  if (errors > 0) process.exitCode = 1;
}

main().catch((e) => {
  process.stderr.write(`netpurse bench failed: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exitCode = 1;
});
