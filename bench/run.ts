// npm run bench: purchases per second and latency of the whole network, per
// number of PSAMs and of concurrent cardholders, beside a bare gRPC echo on
// the same transport (the stack suite); and each confirmation mode with the
// cardholders some milliseconds away from the payment server, beside the
// chatty remote-reader approach (the modes suite); and records cleared per
// second by the clearing service per batch size, beside the stack's
// purchases per second (the clearing suite); and what real readers and a
// real security module cost against the software path: APDUs and purchases
// through PC/SC, S2 signings through PKCS#11 (the hardware suite); and, when
// asked, purchases per second and CPU per purchase per process with 1 and 2
// payment servers and terminal hosts on SQLite and PostgreSQL (the replicas
// suite). Markdown
// on stdout, JSON in bench/results/latest.json, progress on stderr.

import { execFileSync } from "node:child_process";
import { cpus } from "node:os";
import { resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { MAX_BATCH_RECORDS } from "../services/clearing/clearing.js";
import { clearingErrors, measureClearing, type ClearingReport, type ClearingSettings } from "./clearing.js";
import { measureEcho, type EchoResult } from "./echo.js";
import { HARDWARE_DEFAULTS, measureHardware, type HardwareReport, type HardwareSettings } from "./hardware.js";
import { hardwareErrors } from "./hardware-report.js";
import { handleInterrupts } from "./interrupt.js";
import type { Phases } from "./load.js";
import { measureModes, type ModesReport, type ModesSettings } from "./modes.js";
import { MODES } from "./network.js";
import { modesErrors } from "./modes-report.js";
import { PCSC_DEFAULTS } from "./pcsc.js";
import { DEFAULT_MODE, measurePurchases, type PurchaseConfiguration, type PurchaseResult } from "./purchases.js";
import { PROFILE_TOP } from "./profile.js";
import { DATABASES, measureReplicas, REPLICAS_DEFAULTS, replicasErrors, type ReplicasReport, type ReplicasSettings } from "./replicas.js";
import { measureSkeleton, type SkeletonResult } from "./skeleton/skeleton.js";
import { SKELETON_MODES, type SkeletonMode } from "./skeleton/wire.js";
import { measureSoak, SOAK_CONFIGURATION, type SoakResult } from "./soak.js";
import { issueTargets } from "./targets.js";
import { renderReport, writeJson, type Report, type SkeletonFailure } from "./report.js";
import { echoTlsCosts, tlsCosts, tlsSummary } from "./tls-report.js";

/** The stack suite's configurations unless told: what the targets of issue #13 need. */
const DEFAULT_CONFIGS = "4x1,4x8,16x64,64x256:SERVER_COMPARES";
/**
 * Warm-ups, s. The stack suite's purchases: until CPU per purchase stops
 * falling (the JIT and the caches settled), measured at 16–34 s from a
 * fresh network (bench/README.md). The echo settles within a second at
 * thousands of calls a second: its warm-up is at most ECHO_WARMUP_S. The
 * other suites' as their published figures were measured.
 */
const STACK_WARMUP_S = 30;
const ECHO_WARMUP_S = 5;
const OTHER_WARMUP_S = 2;

const DEFAULT_OUT = fileURLToPath(new URL("./results/latest.json", import.meta.url));

const USAGE = `Usage: npm run bench -- [options]

Four suites by default (all), a fifth when asked (replicas). The stack, modes
and replicas suites start the netpurse network as processes, fresh for every
configuration, with cardholders buying a song in a closed loop.

stack: purchases per second and payOffer latency per configuration (PSAMs ×
cardholders, a confirmation mode), beside a unary gRPC echo on the same
transport at the same concurrencies; where each purchase's CPU and durable
syncs go, process by process; PSAM hold times, event-loop delays and the
payment server's memory per purchase in flight; the protocol skeleton (the
same processes making a purchase's calls, stream messages and durable
appends, no protocol logic) right after each configuration in
${SKELETON_MODES.join(" or ")}, and each configuration's ratio to it; the
targets of issue #13. TLS on by default (--tls both adds every configuration with every link
plaintext, --insecure, and the cost of TLS). --profile writes CPU profiles
of every process and prints where each spends its time; --soak-minutes runs
${SOAK_CONFIGURATION.psams} PSAMs × ${SOAK_CONFIGURATION.cardholders} cardholders for that long and reports the payment server's memory.

modes: each confirmation mode (one demo shop per mode) with the cardholder ↔
payment server path delayed by a TCP proxy, beside the chatty remote-reader
approach (one card APDU per round trip) through the same proxy: round trips
and messages per purchase, latency, PSAM hold time, throughput, memory.

clearing: records cleared per second by the clearing service (its own process,
TLS on) for each batch size, from one terminal host and from several at once,
its CPU per record and peak memory, beside the stack suite's best purchases/s
(or, without the stack suite, a run of 4 PSAMs × 8 cardholders, TLS on, for
--clearing-seconds).

hardware: what PC/SC readers and a PKCS#11 token cost against the software
path, in one run: one APDU's round trip through pcsclite → pcscd → vpcd →
emulator (with the loopback/TCP_NODELAY shim and with the stock driver) and
in-process; one cardholder's purchases in a row on the same network (one
terminal host, TLS on) with the card and PSAMs in-process and with them in
emulated PC/SC readers: payOffer latency, APDUs per purchase, the ratio; and
S2 signings per second on SoftHSM2 against the software module. A part that
cannot be set up here (PC/SC needs root, pcscd, vsmartcard-vpcd, cc, the
pcsclite binding and no other pcscd; the token SoftHSM2 and pkcs11js) says
why in the report, and the others still run.

replicas (not part of all: some six minutes more, and a PostgreSQL server
of its own): purchases/s, p50 and p99 payOffer latency, and CPU ms per
purchase per process (payment servers, concentrators, terminal hosts,
merchant, validation, the cardholders, the PostgreSQL server's processes)
for {1, 2} payment servers × {1, 2} terminal hosts × {SQLite, PostgreSQL},
in one run, each configuration on a fresh data folder, network and
database. ${REPLICAS_DEFAULTS.cardholders} cardholders in every configuration and ${REPLICAS_DEFAULTS.psamsPerHost} PSAMs per terminal host
(a second host doubles the PSAMs); TLS on; the demo shop's mode. Replicas
need the shared database: 2 payment servers on SQLite read "n/a". PostgreSQL
is a durable throwaway cluster made with this machine's initdb and pg_ctl
(Debian's postgresql package); without them its configurations read "n/a".

Options:
  --suite NAME          all, stack, modes, hardware, clearing or replicas (default all: every one
                        but replicas)
  --configs LIST        stack: configurations, comma-separated, each PSAMSxCARDHOLDERS or
                        PSAMSxCARDHOLDERS:MODE (default ${DEFAULT_CONFIGS}:
                        one cardholder for latency, the issue's reference load, its ratio to
                        echo, and an early-release mode at scale)
  --psams LIST          stack: instead of --configs, every one of these PSAM counts (comma-separated;
                        default 4 with --clients) with every one of --clients (default 8 with --psams)
  --clients LIST        stack: concurrent cardholders for that grid, comma-separated
  --mode MODE           stack: confirmation mode of the grid and of --configs entries without one
                        (default ${DEFAULT_MODE}; one of ${MODES.slice(0, 2).join(", ")},
                        ${MODES.slice(2).join(", ")})
  --seconds N           stack: measuring window per configuration, seconds (default 10)
  --tls WHICH           stack: on, off or both: each configuration and echo run with TLS on,
                        then off, each on a fresh network (default on; the modes suite runs TLS on)
  --profile DIR         stack: CPU profiles of every service process and of the benchmark's own, in
                        DIR/<configuration>/<process>.cpuprofile (Chrome DevTools opens them), and the
                        top ${PROFILE_TOP} functions by self time per process over the window in the report;
                        profiling costs CPU, so read the other figures from a run without it
  --skeleton WHICH      stack: on or off: measure the protocol skeleton right after each configuration
                        whose mode it runs (${SKELETON_MODES.join(", ")}), with the same PSAMs,
                        cardholders, TLS, warm-up and window (default on)
  --soak-minutes N      stack: after the configurations, run ${SOAK_CONFIGURATION.psams} × ${SOAK_CONFIGURATION.cardholders} (${SOAK_CONFIGURATION.mode}) for N
                        minutes and report the payment server's memory each minute (default 0:
                        no soak; 5 for the issue's target)
  --delay-ms LIST       modes: one-way delays on the cardholder ↔ payment server path, ms,
                        comma-separated; each gets a run per mode (default 25,100)
  --modes-psams N       modes: PSAMs (default 4)
  --modes-clients N     modes: concurrent cardholders (default 64)
  --modes-seconds N     modes: measuring window per run, seconds (default 8)
  --clearing-sizes LIST clearing: records per batch, comma-separated (default 1,100,1000; at most ${MAX_BATCH_RECORDS})
  --clearing-hosts LIST clearing: terminal hosts submitting at once, comma-separated (default 1,4)
  --clearing-seconds N  clearing: measuring window per run, seconds (default 5)
  --hardware-purchases N
                        hardware: purchases timed per run, one after the other, after
                        ${HARDWARE_DEFAULTS.warmupPurchases} not timed (default ${HARDWARE_DEFAULTS.purchases})
  --hardware-modes LIST hardware: confirmation modes, comma-separated, or all; each gets a
                        run in-process and one through PC/SC (default all:
                        ${MODES.join(", ")})
  --hardware-psams N    hardware: PSAMs on the terminal host (default ${HARDWARE_DEFAULTS.psams})
  --hardware-apdus N    hardware: APDUs timed through the shimmed PC/SC path (in-process 10×;
                        default ${PCSC_DEFAULTS.rounds})
  --hardware-stock-apdus N
                        hardware: APDUs timed through the stock driver, ~45 ms each (default ${PCSC_DEFAULTS.stockRounds})
  --hardware-signings N hardware: S2 signings per path (default ${HARDWARE_DEFAULTS.signings})
  --replicas-payment-servers LIST
                        replicas: payment servers, comma-separated (default ${REPLICAS_DEFAULTS.paymentServers.join(",")})
  --replicas-hosts LIST replicas: terminal hosts, comma-separated (default ${REPLICAS_DEFAULTS.terminalHosts.join(",")})
  --replicas-databases LIST
                        replicas: ${DATABASES.join(", ")}, comma-separated (default both)
  --replicas-clients N  replicas: concurrent cardholders (default ${REPLICAS_DEFAULTS.cardholders})
  --replicas-psams N    replicas: PSAMs per terminal host (default ${REPLICAS_DEFAULTS.psamsPerHost})
  --replicas-concentrators N
                        replicas: concentrators (default ${REPLICAS_DEFAULTS.concentrators})
  --replicas-seconds N  replicas: measuring window per configuration, seconds (default ${REPLICAS_DEFAULTS.seconds})
  --warmup N            warm-up before each window, seconds (default ${STACK_WARMUP_S} for the stack suite's
                        purchases, the time CPU per purchase takes to settle (bench/README.md), and at
                        most ${ECHO_WARMUP_S} for its echo; ${REPLICAS_DEFAULTS.warmupSeconds} for the replicas suite, for the same
                        reason; ${OTHER_WARMUP_S} for the other suites)
  --out FILE            JSON results (default bench/results/latest.json)
  --keep-data           keep each run's data folder and service logs (paths in the JSON)
  -h, --help            this text

Exit status: 0 when every purchase, echo and protocol-skeleton purchase
succeeded (and every skeleton run could be made), every batch was accepted
with all its records posted, no hardware part failed (one that cannot be
set up here is no failure) and every replicas configuration that can run
here ran (n/a is no failure), 1 otherwise, 2 for bad options.
`;

const SUITES = ["all", "stack", "modes", "hardware", "clearing", "replicas"] as const;
type Suite = (typeof SUITES)[number];

const TLS_CHOICES = { on: [true], off: [false], both: [true, false] } as const;

interface Settings {
  suite: Suite;
  /** The stack suite's configurations, in order, each with its mode. */
  configurations: Required<PurchaseConfiguration>[];
  /** The stack suite's transports, in the order each configuration runs them: true for TLS on. */
  tls: readonly boolean[];
  /** The stack suite's warm-up and window. */
  phases: Phases;
  profileDir?: string;
  /** Measure the protocol skeleton beside each configuration it can mirror. */
  skeleton: boolean;
  soakMinutes: number;
  modes: ModesSettings;
  clearing: ClearingSettings;
  hardware: HardwareSettings;
  replicas: ReplicasSettings;
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

function hardwareModes(text: string): string[] {
  if (text === "all") return MODES;
  const list = text.split(",").map((m) => m.trim().toUpperCase());
  const unknown = list.filter((m) => !MODES.includes(m));
  if (list.length === 0 || unknown.length > 0) throw new UsageError(`--hardware-modes takes all or some of ${MODES.join(", ")}, got "${text}"`);
  return [...new Set(list)];
}

function databases(text: string): ReplicasSettings["databases"] {
  const list = text.split(",").map((d) => d.trim().toLowerCase());
  const found = DATABASES.filter((d) => list.includes(d));
  if (list.length === 0 || found.length !== new Set(list).size)
    throw new UsageError(`--replicas-databases takes some of ${DATABASES.join(", ")}, got "${text}"`);
  return found;
}

function mode(text: string, flag: string): string {
  const m = text.trim().toUpperCase();
  if (!MODES.includes(m)) throw new UsageError(`--${flag} takes one of ${MODES.join(", ")}, got "${text}"`);
  return m;
}

/** "4x8,64x256:SERVER_COMPARES" into configurations; entries without a mode take `fallback`. */
function configurations(text: string, fallback: string): Required<PurchaseConfiguration>[] {
  return text.split(",").map((entry) => {
    const m = /^\s*(\d+)\s*[x×]\s*(\d+)\s*(?::\s*(\S+)\s*)?$/i.exec(entry);
    if (!m || Number(m[1]) < 1 || Number(m[2]) < 1) {
      throw new UsageError(`--configs takes PSAMSxCARDHOLDERS or PSAMSxCARDHOLDERS:MODE separated by commas, got "${entry}"`);
    }
    return { psams: Number(m[1]), cardholders: Number(m[2]), mode: m[3] ? mode(m[3], "configs") : fallback };
  });
}

function tlsChoice(text: string): readonly boolean[] {
  if (!Object.hasOwn(TLS_CHOICES, text)) throw new UsageError(`--tls takes ${Object.keys(TLS_CHOICES).join(", ")}, got "${text}"`);
  return TLS_CHOICES[text as keyof typeof TLS_CHOICES];
}

function onOrOff(text: string, flag: string): boolean {
  if (text !== "on" && text !== "off") throw new UsageError(`--${flag} takes on or off, got "${text}"`);
  return text === "on";
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
      configs: { type: "string" },
      psams: { type: "string" },
      clients: { type: "string" },
      mode: { type: "string", default: DEFAULT_MODE },
      seconds: { type: "string", default: "10" },
      tls: { type: "string", default: "on" },
      profile: { type: "string" },
      skeleton: { type: "string", default: "on" },
      "soak-minutes": { type: "string", default: "0" },
      "delay-ms": { type: "string", default: "25,100" },
      "modes-psams": { type: "string", default: "4" },
      "modes-clients": { type: "string", default: "64" },
      "modes-seconds": { type: "string", default: "8" },
      "clearing-sizes": { type: "string", default: "1,100,1000" },
      "clearing-hosts": { type: "string", default: "1,4" },
      "clearing-seconds": { type: "string", default: "5" },
      "hardware-purchases": { type: "string", default: String(HARDWARE_DEFAULTS.purchases) },
      "hardware-modes": { type: "string", default: "all" },
      "hardware-psams": { type: "string", default: String(HARDWARE_DEFAULTS.psams) },
      "hardware-apdus": { type: "string", default: String(PCSC_DEFAULTS.rounds) },
      "hardware-stock-apdus": { type: "string", default: String(PCSC_DEFAULTS.stockRounds) },
      "hardware-signings": { type: "string", default: String(HARDWARE_DEFAULTS.signings) },
      "replicas-payment-servers": { type: "string", default: REPLICAS_DEFAULTS.paymentServers.join(",") },
      "replicas-hosts": { type: "string", default: REPLICAS_DEFAULTS.terminalHosts.join(",") },
      "replicas-databases": { type: "string", default: DATABASES.join(",") },
      "replicas-clients": { type: "string", default: String(REPLICAS_DEFAULTS.cardholders) },
      "replicas-psams": { type: "string", default: String(REPLICAS_DEFAULTS.psamsPerHost) },
      "replicas-concentrators": { type: "string", default: String(REPLICAS_DEFAULTS.concentrators) },
      "replicas-seconds": { type: "string", default: String(REPLICAS_DEFAULTS.seconds) },
      warmup: { type: "string" },
      out: { type: "string", default: DEFAULT_OUT },
      "keep-data": { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return undefined;
  const measureMs = seconds(values.seconds, "seconds");
  const modesMeasureMs = seconds(values["modes-seconds"], "modes-seconds");
  const clearingMeasureMs = seconds(values["clearing-seconds"], "clearing-seconds");
  const replicasMeasureMs = seconds(values["replicas-seconds"], "replicas-seconds");
  if (measureMs === 0 || modesMeasureMs === 0 || clearingMeasureMs === 0 || replicasMeasureMs === 0) {
    throw new UsageError("--seconds, --modes-seconds, --clearing-seconds and --replicas-seconds must be more than 0");
  }
  const batchSizes = positiveInts(values["clearing-sizes"], "clearing-sizes");
  if (batchSizes.some((n) => n > MAX_BATCH_RECORDS)) throw new UsageError(`--clearing-sizes: clearing takes at most ${MAX_BATCH_RECORDS} records per batch`);
  const warmupMs = values.warmup === undefined ? OTHER_WARMUP_S * 1000 : seconds(values.warmup, "warmup");
  const stackWarmupMs = values.warmup === undefined ? STACK_WARMUP_S * 1000 : warmupMs;
  const replicasWarmupMs = values.warmup === undefined ? REPLICAS_DEFAULTS.warmupSeconds * 1000 : warmupMs;
  const stackMode = mode(values.mode, "mode");
  if (values.configs !== undefined && (values.psams !== undefined || values.clients !== undefined)) {
    throw new UsageError("--configs and --psams/--clients each choose the stack's configurations: give one or the other");
  }
  const grid =
    values.psams !== undefined || values.clients !== undefined
      ? positiveInts(values.psams ?? "4", "psams").flatMap((psams) =>
          positiveInts(values.clients ?? "8", "clients").map((cardholders) => ({ psams, cardholders, mode: stackMode })),
        )
      : undefined;
  const soakMinutes = Number(values["soak-minutes"]);
  if (!Number.isFinite(soakMinutes) || soakMinutes < 0) throw new UsageError(`--soak-minutes takes a number of minutes, got "${values["soak-minutes"]}"`);
  return {
    suite: suite(values.suite),
    configurations: grid ?? configurations(values.configs ?? DEFAULT_CONFIGS, stackMode),
    tls: tlsChoice(values.tls),
    phases: { warmupMs: stackWarmupMs, measureMs },
    ...(values.profile !== undefined ? { profileDir: resolve(values.profile) } : {}),
    skeleton: onOrOff(values.skeleton, "skeleton"),
    soakMinutes,
    modes: {
      psams: positiveInt(values["modes-psams"], "modes-psams"),
      cardholders: positiveInt(values["modes-clients"], "modes-clients"),
      delaysMs: wholeNumbers(values["delay-ms"], "delay-ms", 0),
      phases: { warmupMs, measureMs: modesMeasureMs },
      keepData: values["keep-data"],
    },
    clearing: {
      batchSizes,
      terminalHosts: positiveInts(values["clearing-hosts"], "clearing-hosts"),
      phases: { warmupMs, measureMs: clearingMeasureMs },
      keepData: values["keep-data"],
    },
    hardware: {
      purchases: positiveInt(values["hardware-purchases"], "hardware-purchases"),
      warmupPurchases: HARDWARE_DEFAULTS.warmupPurchases,
      psams: positiveInt(values["hardware-psams"], "hardware-psams"),
      modes: hardwareModes(values["hardware-modes"]),
      apdu: {
        rounds: positiveInt(values["hardware-apdus"], "hardware-apdus"),
        stockRounds: positiveInt(values["hardware-stock-apdus"], "hardware-stock-apdus"),
      },
      signings: positiveInt(values["hardware-signings"], "hardware-signings"),
      keepData: values["keep-data"],
    },
    replicas: {
      paymentServers: [...new Set(positiveInts(values["replicas-payment-servers"], "replicas-payment-servers"))],
      terminalHosts: [...new Set(positiveInts(values["replicas-hosts"], "replicas-hosts"))],
      databases: databases(values["replicas-databases"]),
      cardholders: positiveInt(values["replicas-clients"], "replicas-clients"),
      psamsPerHost: positiveInt(values["replicas-psams"], "replicas-psams"),
      concentrators: positiveInt(values["replicas-concentrators"], "replicas-concentrators"),
      mode: DEFAULT_MODE,
      tls: true,
      phases: { warmupMs: replicasWarmupMs, measureMs: replicasMeasureMs },
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

/** The commit at the end, when it differs from the start's: services start from the work tree, so later runs measured other code. */
function sourceChange(atStart: string): { sourceAtEnd?: string } {
  const atEnd = sourceVersion();
  return atEnd === atStart ? {} : { sourceAtEnd: atEnd };
}

/** The echo's warm-up and window: its warm-up no longer than ECHO_WARMUP_S. */
const echoPhases = (p: Phases): Phases => ({ warmupMs: Math.min(p.warmupMs, ECHO_WARMUP_S * 1000), measureMs: p.measureMs });

const skeletonMode = (mode: string): SkeletonMode | undefined => SKELETON_MODES.find((m) => m === mode);

interface StackResults {
  echo: EchoResult[];
  purchases: PurchaseResult[];
  skeleton: SkeletonResult[];
  skeletonFailures: SkeletonFailure[];
  soak?: SoakResult;
}

/**
 * The stack suite: the echo baseline with each transport, then every
 * configuration with each transport in turn, each followed by the protocol
 * skeleton of the same configuration (when its mode has one), then the
 * soak. The skeleton runs right after its configuration so that both meet
 * the same other work on the machine, which drifts over a run.
 */
async function measureStack(s: Settings): Promise<StackResults> {
  const configurations = s.configurations;
  const concurrencies = [...new Set(configurations.map((c) => c.cardholders))];
  const runs = configurations.flatMap((c) => s.tls.map((tls) => ({ ...c, tls })));
  const skeletonRuns = s.skeleton ? runs.filter((r) => skeletonMode(r.mode)).length : 0;
  const ways = s.tls.map((tls) => (tls ? "TLS on" : "TLS off")).join(" and ");
  process.stderr.write(
    `netpurse bench, stack: ${configurations.length} configurations and ${concurrencies.length} echo concurrencies, each with ${ways} (${runs.length} runs, ${skeletonRuns} protocol-skeleton runs and ${concurrencies.length * s.tls.length} echo runs), ${(s.phases.warmupMs + s.phases.measureMs) / 1000} s of load each (${s.phases.warmupMs / 1000} s warm-up, the echo's ${echoPhases(s.phases).warmupMs / 1000} s), plus start-up${s.soakMinutes > 0 ? `; then a ${s.soakMinutes}-minute soak` : ""}\n`,
  );
  const echo: EchoResult[] = [];
  for (const tls of s.tls) echo.push(...(await measureEcho(concurrencies, echoPhases(s.phases), tls)));
  const purchases: PurchaseResult[] = [];
  const skeleton: SkeletonResult[] = [];
  const skeletonFailures: SkeletonFailure[] = [];
  for (const [i, { tls, ...c }] of runs.entries()) {
    process.stderr.write(`run ${i + 1}/${runs.length}\n`);
    purchases.push(await measurePurchases(c, s.phases, { keepData: s.keepData, tls, ...(s.profileDir ? { profileDir: s.profileDir } : {}) }));
    const mode = skeletonMode(c.mode);
    if (!s.skeleton || !mode) continue;
    const configuration = { psams: c.psams, cardholders: c.cardholders, mode, tls };
    try {
      skeleton.push(await measureSkeleton({ ...configuration, warmupSeconds: s.phases.warmupMs / 1000, seconds: s.phases.measureMs / 1000 }));
    } catch (e) {
      // A baseline that could not run leaves its ratios unmeasured; the real figures of the run still stand.
      process.stderr.write(`protocol skeleton failed: ${(e as Error)?.stack ?? String(e)}\n`);
      skeletonFailures.push({ ...configuration, message: (e as Error)?.message ?? String(e) });
    }
  }
  // The issue measures memory with TLS as installed: the soak runs with the first transport asked.
  const soak = s.soakMinutes > 0 ? await measureSoak(s.soakMinutes, { tls: s.tls[0]!, keepData: s.keepData }) : undefined;
  return { echo, purchases, skeleton, skeletonFailures, ...(soak ? { soak } : {}) };
}

async function runBenchmark(s: Settings): Promise<Report> {
  const startedAt = new Date();
  const sourceAtStart = sourceVersion();
  // The replicas suite runs only when asked for by name.
  const runs = (suite: Suite) => s.suite === suite || (s.suite === "all" && suite !== "replicas");
  const { echo, purchases, skeleton, skeletonFailures, soak }: StackResults = runs("stack")
    ? await measureStack(s)
    : { echo: [], purchases: [], skeleton: [], skeletonFailures: [] };
  const modes: ModesReport | undefined = runs("modes") ? await measureModes(s.modes) : undefined;
  const hardware: HardwareReport | undefined = runs("hardware") ? await measureHardware(s.hardware) : undefined;
  // Last: it compares with the stack suite's purchases/s when that ran.
  const clearing: ClearingReport | undefined = runs("clearing") ? await measureClearing(s.clearing, purchases) : undefined;
  const replicas: ReplicasReport | undefined = runs("replicas") ? await measureReplicas(s.replicas) : undefined;
  const costs = tlsCosts(purchases, echo);
  const summary = tlsSummary(costs);
  const cpu = cpus();
  return {
    startedAt: startedAt.toISOString(),
    source: sourceAtStart,
    ...sourceChange(sourceAtStart),
    wallSeconds: (Date.now() - startedAt.getTime()) / 1000,
    machine: { cores: cpu.length, cpuModel: cpu[0]?.model.trim() ?? "unknown", node: process.version, platform: `${process.platform} ${process.arch}` },
    phases: s.phases,
    echoPhases: echoPhases(s.phases),
    echo,
    purchases,
    tlsCosts: costs,
    ...(summary ? { tlsSummary: summary } : {}),
    echoTlsCosts: echoTlsCosts(echo),
    skeleton,
    skeletonFailures,
    ...(soak ? { soak } : {}),
    targets: runs("stack") ? issueTargets({ purchases, echo, ...(soak ? { soak } : {}) }, s.skeleton ? skeleton : undefined) : [],
    ...(s.profileDir && runs("stack") ? { profileDir: s.profileDir } : {}),
    ...(modes ? { modes } : {}),
    ...(hardware ? { hardware } : {}),
    ...(clearing ? { clearing } : {}),
    ...(replicas ? { replicas } : {}),
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
  const source = report.sourceAtEnd ? `${report.source} at the start, ${report.sourceAtEnd} at the end (the tree changed during the run)` : report.source;
  process.stdout.write(`# netpurse benchmark, ${report.startedAt}, ${source}\n\n${renderReport(report)}`);
  await writeJson(settings.out, report);
  process.stderr.write(`results written to ${settings.out}\n`);
  const errors =
    [...report.echo, ...report.purchases, ...report.skeleton, ...(report.soak ? [report.soak] : [])].reduce((n, r) => n + r.errors, 0) +
    report.skeletonFailures.length +
    report.purchases.reduce((n, p) => n + p.unrecordedAfterLoad.left, 0) +
    (report.modes ? modesErrors(report.modes) : 0) +
    (report.hardware ? hardwareErrors(report.hardware) : 0) +
    (report.clearing ? clearingErrors(report.clearing) : 0) +
    (report.replicas ? replicasErrors(report.replicas) : 0);
  if (errors > 0) process.exitCode = 1;
}

main().catch((e) => {
  process.stderr.write(`netpurse bench failed: ${(e as Error)?.stack ?? String(e)}\n`);
  process.exitCode = 1;
});
