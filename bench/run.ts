// npm run bench: purchases per second and latency of the whole network, per
// number of PSAMs and of concurrent cardholders, beside a bare gRPC echo on
// the same transport. Markdown on stdout, JSON in bench/results/latest.json,
// progress on stderr.

import { execFileSync } from "node:child_process";
import { cpus } from "node:os";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { measureEcho } from "./echo.js";
import { handleInterrupts } from "./interrupt.js";
import type { Phases } from "./load.js";
import { measurePurchases, type PurchaseResult } from "./purchases.js";
import { renderReport, writeJson, type Report } from "./report.js";

const DEFAULT_OUT = fileURLToPath(new URL("./results/latest.json", import.meta.url));

const USAGE = `Usage: npm run bench -- [options]

Starts the netpurse network as processes, once per configuration (PSAMs x
cardholders), and measures purchases per second and payOffer latency with
cardholders buying a song in a closed loop; measures a unary gRPC echo on the
same transport at the same concurrencies as a baseline.

Options:
  --psams LIST      PSAMs on the terminal host, comma-separated (default 1,4,16)
  --clients LIST    concurrent cardholders, comma-separated (default 1,8,64)
  --seconds N       measuring window per configuration, seconds (default 10)
  --warmup N        warm-up before each window, seconds (default 2)
  --out FILE        JSON results (default bench/results/latest.json)
  --keep-data       keep each configuration's data folder and service logs (paths in the JSON)
  -h, --help        this text

Exit status: 0 when every purchase and echo succeeded, 1 otherwise.
`;

interface Settings {
  psams: number[];
  clients: number[];
  phases: Phases;
  out: string;
  keepData: boolean;
}

class UsageError extends Error {}

function positiveInts(text: string, flag: string): number[] {
  const list = text.split(",").map((s) => Number(s.trim()));
  if (list.length === 0 || !list.every((n) => Number.isInteger(n) && n > 0)) throw new UsageError(`--${flag} takes positive whole numbers separated by commas, got "${text}"`);
  return list;
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
      psams: { type: "string", default: "1,4,16" },
      clients: { type: "string", default: "1,8,64" },
      seconds: { type: "string", default: "10" },
      warmup: { type: "string", default: "2" },
      out: { type: "string", default: DEFAULT_OUT },
      "keep-data": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  const measureMs = seconds(values.seconds, "seconds");
  if (measureMs === 0) throw new UsageError("--seconds must be more than 0");
  return {
    psams: positiveInts(values.psams, "psams"),
    clients: positiveInts(values.clients, "clients"),
    phases: { warmupMs: seconds(values.warmup, "warmup"), measureMs },
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

async function runBenchmark(s: Settings): Promise<Report> {
  const startedAt = new Date();
  const configurations = s.psams.flatMap((psams) => s.clients.map((cardholders) => ({ psams, cardholders })));
  process.stderr.write(`netpurse bench: ${configurations.length} configurations and ${s.clients.length} echo runs, ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of load each, plus start-up\n`);
  const echo = await measureEcho([...new Set(s.clients)], s.phases);
  const purchases: PurchaseResult[] = [];
  for (const [i, c] of configurations.entries()) {
    process.stderr.write(`configuration ${i + 1}/${configurations.length}\n`);
    purchases.push(await measurePurchases(c, s.phases, { keepData: s.keepData }));
  }
  const cpu = cpus();
  return {
    startedAt: startedAt.toISOString(),
    source: sourceVersion(),
    wallSeconds: (Date.now() - startedAt.getTime()) / 1000,
    machine: { cores: cpu.length, cpuModel: cpu[0]?.model.trim() ?? "unknown", node: process.version, platform: `${process.platform} ${process.arch}` },
    phases: s.phases,
    echo,
    purchases,
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
  const errors = [...report.echo, ...report.purchases].reduce((n, r) => n + r.errors, 0);
  if (errors > 0) process.exitCode = 1;
}

main().catch((e) => {
  process.stderr.write(`netpurse bench failed: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exitCode = 1;
});
