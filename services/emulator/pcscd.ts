// The pcscd that serves netpurse's emulated readers: its reader configuration
// (one vsmartcard vpcd entry per reader, each with its own copy of the
// driver, whose state is per loaded library), the loopback/TCP_NODELAY shim
// it is started with (vpcd-loopback.c says why), and the daemon itself, run
// in the foreground under the caller's control. pcscSupport() says whether
// all of that can be done on this machine, and if not, exactly why.
//
// The folder DIR holds:
//   reader.conf.d/netpurse-N.conf   what pcscd --config reads (or a system pcscd, installed by hand)
//   drivers/netpurse-N.so           the driver copy of entry N
//   vpcd-loopback.so (+ .sha256)    the shim, rebuilt when its source changes
//   pcscd.log                       the daemon's log (info level)
// pcscd runs as root and loads code from DIR, so DIR must be writable by its owner alone.

import { spawn, execFile, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { constants, createWriteStream, type WriteStream } from "node:fs";
import { access, chmod, copyFile, mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { answers } from "../../lib/socket.js";
import { delimiter, join } from "node:path";
import { promisify } from "node:util";
import type { Logger } from "../../lib/log.js";

/** The vsmartcard vpcd driver as Debian and Ubuntu install it (package vsmartcard-vpcd). */
export const VPCD_DRIVER = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
/** pcscd's socket; pcscd 1.9.9 ignores PCSCLITE_CSOCK_NAME, so there is one pcscd per machine. */
export const PCSCD_SOCKET = "/run/pcscd/pcscd.comm";
export const PCSCD_PID_FILE = "/run/pcscd/pcscd.pid";
/** First vpcd port (0x8CA0); reader N listens on PORT_BASE + 2N and, for vpcd's second slot, + 1. */
export const DEFAULT_PORT_BASE = 0x8ca0;
/** The shim's source, beside this file. */
export const SHIM_SOURCE = new URL("./vpcd-loopback.c", import.meta.url).pathname;

const DAEMON_READY = /daemon ready/;
const START_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 5_000;

/** One emulated reader: the name in reader.conf (FRIENDLYNAME) and the vpcd port its card connects to. */
export interface VirtualReader {
  name: string;
  port: number;
}

/**
 * The PC/SC name of a reader's first slot, as pcscd names it: FRIENDLYNAME, the reader's index among
 * readers of that name (00, names here are unique), the slot (00). vpcd also makes a second slot,
 * "NAME 00 01", on PORT + 1: netpurse leaves it empty.
 */
export function pcscReaderName(friendlyName: string): string {
  return `${friendlyName} 00 00`;
}

/** Readers named `names`, with ports from `portBase`, two apart (vpcd listens on PORT and PORT + 1). */
export function virtualReaders(names: string[], portBase = DEFAULT_PORT_BASE): VirtualReader[] {
  if (!Number.isInteger(portBase) || portBase < 1024 || portBase + 2 * names.length > 65_535) {
    throw new RangeError(`port base ${portBase} leaves no room for ${names.length} readers (2 ports each, below 65536, from 1024)`);
  }
  const seen = new Set<string>();
  return names.map((name, i) => {
    // Quotes and control characters would break reader.conf; pcscd keeps at most 128 bytes of a name.
    if (!/^[\x20-\x21\x23-\x7e]{1,100}$/.test(name))
      throw new RangeError(`reader name ${JSON.stringify(name)}: 1 to 100 printable ASCII characters, no quotes`);
    if (seen.has(name)) throw new RangeError(`two readers named ${JSON.stringify(name)}`);
    seen.add(name);
    return { name, port: portBase + 2 * i };
  });
}

/** One reader.conf entry. DEVICENAME /dev/null:PORT makes vpcd listen on PORT (never "HOST:PORT": pcscd 1.9.9 crashes when such a card goes). */
export function readerConfEntry(r: VirtualReader, driver: string): string {
  return [
    `# netpurse emulated reader: its card connects to vpcd on 127.0.0.1:${r.port} (slot 2 on ${r.port + 1} stays empty)`,
    `FRIENDLYNAME "${r.name}"`,
    `DEVICENAME /dev/null:${r.port}`,
    `LIBPATH ${driver}`,
    `CHANNELID ${r.port}`,
    "",
  ].join("\n");
}

export interface ReaderConfiguration {
  /** The folder to give pcscd --config (or to copy into /etc/reader.conf.d/). */
  confDir: string;
  /** Each entry's file. */
  files: string[];
}

/**
 * Writes the reader configuration into DIR: one entry per reader, each with its own copy of the vpcd
 * driver, and no entry of an earlier, longer list left behind.
 */
export async function writeReaderConf(dir: string, readers: VirtualReader[], driver = VPCD_DRIVER): Promise<ReaderConfiguration> {
  await privateDir(dir);
  const confDir = join(dir, "reader.conf.d");
  const drivers = join(dir, "drivers");
  await mkdir(confDir, { recursive: true, mode: 0o700 });
  await mkdir(drivers, { recursive: true, mode: 0o700 });
  for (const f of await readdir(confDir)) if (/^netpurse-\d+\.conf$/.test(f)) await rm(join(confDir, f));
  const files: string[] = [];
  for (const [i, r] of readers.entries()) {
    const copy = join(drivers, `netpurse-${i}.so`);
    // Replaced by rename: a pcscd still running keeps the copy it mapped.
    await copyFile(driver, `${copy}.tmp`);
    await chmod(`${copy}.tmp`, 0o644);
    await rename(`${copy}.tmp`, copy);
    const file = join(confDir, `netpurse-${i}.conf`);
    await writeFile(file, readerConfEntry(r, copy), { mode: 0o644 });
    files.push(file);
  }
  return { confDir, files };
}

/** The reader configuration as text, for a person to install for a system pcscd. */
export function readerConfText(readers: VirtualReader[], driverDir: string): string {
  return readers.map((r, i) => readerConfEntry(r, join(driverDir, `netpurse-${i}.so`))).join("\n");
}

/** Creates DIR for the owner alone, and refuses one others could write to: pcscd, as root, loads code from it. */
async function privateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: 0o700 });
  const s = await stat(dir);
  const uid = process.getuid?.();
  if (uid !== undefined && s.uid !== uid) throw new Error(`${dir} belongs to uid ${s.uid}, not to this user (${uid}): pcscd would load code from it`);
  if ((s.mode & 0o022) !== 0)
    throw new Error(`${dir} is writable by others (mode ${(s.mode & 0o777).toString(8)}): pcscd would load code from it; chmod go-w it`);
}

/**
 * Builds the shim into DIR/vpcd-loopback.so, unless it was built from the same source already.
 * Returns its path.
 */
export async function buildLoopbackShim(dir: string): Promise<string> {
  await privateDir(dir);
  const source = await readFile(SHIM_SOURCE);
  const digest = createHash("sha256").update(source).digest("hex");
  const out = join(dir, "vpcd-loopback.so");
  const stamp = `${out}.sha256`;
  const built = await readFile(stamp, "utf8").catch(() => "");
  if (built.trim() === digest && (await exists(out))) return out;
  const cc = await findProgram("cc");
  if (!cc) throw new Error("no C compiler (cc) to build the vpcd loopback shim (Debian/Ubuntu: apt-get install gcc)");
  const tmp = `${out}.${process.pid}.tmp`;
  try {
    await promisify(execFile)(cc, ["-shared", "-fPIC", "-O2", "-Wall", "-o", tmp, SHIM_SOURCE, "-ldl"]);
  } catch (e) {
    await rm(tmp, { force: true });
    throw new Error(`building ${SHIM_SOURCE} failed: ${(e as { stderr?: string }).stderr ?? (e as Error).message}`, { cause: e });
  }
  await rename(tmp, out);
  await writeFile(stamp, `${digest}\n`);
  return out;
}

async function exists(path: string, mode = constants.F_OK): Promise<boolean> {
  try {
    await access(path, mode);
    return true;
  } catch {
    return false;
  }
}

/** A program's path, from PATH and the sbin folders a non-login shell may leave out. */
export async function findProgram(name: string): Promise<string | undefined> {
  const dirs = [...(process.env.PATH ?? "").split(delimiter), "/usr/local/sbin", "/usr/sbin", "/sbin"];
  for (const d of dirs) {
    if (d && (await exists(join(d, name), constants.X_OK))) return join(d, name);
  }
  return undefined;
}

/** Running pcscd processes other than `except` (zombies are not running). */
async function pcscdProcesses(except?: number): Promise<{ pid: number; command: string }[]> {
  const found: { pid: number; command: string }[] = [];
  for (const name of await readdir("/proc").catch(() => [] as string[])) {
    if (!/^\d+$/.test(name) || Number(name) === except) continue;
    try {
      const stat = await readFile(`/proc/${name}/stat`, "utf8");
      const comm = stat.slice(stat.indexOf("(") + 1, stat.lastIndexOf(")"));
      if (comm !== "pcscd" || stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) continue;
      const command = (await readFile(`/proc/${name}/cmdline`, "utf8")).split("\0").join(" ").trim();
      found.push({ pid: Number(name), command });
    } catch {
      // Gone meanwhile.
    }
  }
  return found;
}

/** Whether something answers on pcscd's socket (a pcscd, or systemd's pcscd.socket waiting to start one). */
const socketServed = (path = PCSCD_SOCKET) => answers(path);

/** Why a pcscd of our own cannot start now: another one holds the machine's one socket. */
export async function otherPcscd(except?: number): Promise<string | undefined> {
  const running = await pcscdProcesses(except);
  if (running.length > 0) {
    const list = running.map((p) => `pid ${p.pid}: ${p.command}`).join(", ");
    return `another pcscd is running (${list}); pcscd has one socket per machine (${PCSCD_SOCKET}): stop it (systemctl stop pcscd.socket pcscd) or serve the readers through it (netpurse-emulator reader-conf)`;
  }
  if (await socketServed()) {
    return `${PCSCD_SOCKET} is served by another process (systemd's pcscd.socket?): stop it (systemctl stop pcscd.socket) or serve the readers through it (netpurse-emulator reader-conf)`;
  }
  return undefined;
}

export type PcscSupport = { ok: true } | { ok: false; reason: string };

/**
 * Whether this machine can run netpurse's emulated readers in a pcscd of its own: pcscd and the vpcd
 * driver installed, a C compiler for the shim (unless shim is false), the right to create pcscd's
 * socket, no other pcscd running, and (unless binding is false) the pcsclite npm binding built. The
 * reason names every missing piece and how to get it.
 */
export async function pcscSupport(o: { shim?: boolean; binding?: boolean } = {}): Promise<PcscSupport> {
  if (process.platform !== "linux")
    return { ok: false, reason: `emulated PC/SC readers need Linux (pcscd with vsmartcard's vpcd driver); this is ${process.platform}` };
  const missing: string[] = [];
  if (!(await findProgram("pcscd"))) missing.push("pcscd is not installed (Debian/Ubuntu: apt-get install pcscd)");
  if (!(await exists(VPCD_DRIVER))) missing.push(`the vpcd driver ${VPCD_DRIVER} is missing (Debian/Ubuntu: apt-get install vsmartcard-vpcd)`);
  if (o.shim !== false && !(await findProgram("cc"))) missing.push("no C compiler (cc) to build the vpcd loopback shim (Debian/Ubuntu: apt-get install gcc)");
  if (process.getuid?.() !== 0 && !(await exists("/run/pcscd", constants.W_OK))) {
    missing.push(`pcscd must create ${PCSCD_SOCKET}: run as root (this is uid ${process.getuid?.()}) or make /run/pcscd writable for this user`);
  }
  const other = await otherPcscd();
  if (other) missing.push(other);
  if (o.binding !== false) {
    const why = pcscliteBindingProblem();
    if (why) missing.push(why);
  }
  return missing.length === 0 ? { ok: true } : { ok: false, reason: missing.join("; ") };
}

/** Why the pcsclite npm binding cannot be loaded, or undefined if it can. Loading it starts nothing. */
export function pcscliteBindingProblem(): string | undefined {
  try {
    createRequire(import.meta.url)("pcsclite");
    return undefined;
  } catch (e) {
    return `the pcsclite npm binding is not built (it is optional: needs libpcsclite-dev and a C++ compiler at npm install): ${(e as Error).message.split("\n")[0]}`;
  }
}

export interface PcscdOptions {
  /** The folder for the configuration, the shim and the log (see the file header). */
  dir: string;
  readers: VirtualReader[];
  /** Start with the loopback/TCP_NODELAY shim (default true). Without it vpcd listens on every interface. */
  shim?: boolean;
  log?: Logger;
}

/** A pcscd of our own, in the foreground, serving `readers` and nothing else. */
export class Pcscd {
  private child: ChildProcess | undefined;
  private exited: Promise<void> = Promise.resolve();
  private logFile: WriteStream | undefined;
  private readonly tail: string[] = [];
  private stopping = false;

  private constructor(
    private readonly o: PcscdOptions,
    private readonly config: ReaderConfiguration,
    private readonly shim: string | undefined,
    private readonly program: string,
  ) {}

  /** Writes the configuration, builds the shim, starts pcscd and waits until it says it is ready. */
  static async start(o: PcscdOptions): Promise<Pcscd> {
    const program = await findProgram("pcscd");
    if (!program) throw new Error("pcscd is not installed (Debian/Ubuntu: apt-get install pcscd)");
    const config = await writeReaderConf(o.dir, o.readers);
    const shim = o.shim === false ? undefined : await buildLoopbackShim(o.dir);
    const d = new Pcscd(o, config, shim, program);
    await d.launch();
    return d;
  }

  /** The PC/SC names of the readers, in the order given. */
  get readerNames(): string[] {
    return this.o.readers.map((r) => pcscReaderName(r.name));
  }

  get pid(): number | undefined {
    return this.child?.pid;
  }

  /** Whether the daemon is up. */
  get running(): boolean {
    return this.child !== undefined;
  }

  /** Where its log goes. */
  get logPath(): string {
    return join(this.o.dir, "pcscd.log");
  }

  /** Stops the daemon (SIGTERM, then SIGKILL if it has not gone within 5 s) and waits until it has. */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child) return;
    this.stopping = true;
    try {
      child.kill("SIGTERM");
      const killer = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
      await this.exited;
      clearTimeout(killer);
    } finally {
      this.stopping = false;
    }
  }

  /** Stops and starts it again with the same configuration; the cards reconnect by themselves. */
  async restart(): Promise<void> {
    await this.stop();
    await this.launch();
  }

  private async launch(): Promise<void> {
    const other = await otherPcscd();
    if (other) throw new Error(other);
    this.logFile ??= createWriteStream(this.logPath, { flags: "a", mode: 0o600 });
    const env = { ...process.env };
    if (this.shim) env.LD_PRELOAD = this.shim;
    else delete env.LD_PRELOAD;
    // --info: "daemon ready", and each card's arrival and departure, without the APDUs.
    const child = spawn(this.program, ["--foreground", "--info", "--config", this.config.confDir], { env, stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    const onExit = () => {
      // Whatever ends this process (an uncaught error, process.exit) takes the daemon with it.
      child.kill("SIGTERM");
    };
    process.on("exit", onExit);
    let ready: () => void = () => {};
    let failed: (e: Error) => void = () => {};
    const started = new Promise<void>((resolve, reject) => {
      ready = resolve;
      failed = reject;
    });
    let partial = "";
    const onOutput = (chunk: Buffer) => {
      this.logFile?.write(chunk);
      const lines = (partial + chunk.toString("utf8")).split("\n");
      partial = lines.pop() ?? "";
      for (const line of lines) {
        this.tail.push(line);
        if (this.tail.length > 20) this.tail.shift();
        if (DAEMON_READY.test(line)) ready();
      }
    };
    child.stdout.on("data", onOutput);
    child.stderr.on("data", onOutput);
    this.exited = new Promise<void>((resolve) => {
      child.once("exit", (code, signal) => {
        process.off("exit", onExit);
        if (this.child === child) this.child = undefined;
        const how = signal ? `signal ${signal}` : `exit code ${code}`;
        failed(new Error(`pcscd ended (${how}) before it was ready:\n${this.tail.join("\n")}`));
        if (!this.stopping) this.o.log?.warn("pcscd ended on its own", { how, log: this.logPath });
        resolve();
      });
      child.once("error", (e) => {
        process.off("exit", onExit);
        if (this.child === child) this.child = undefined;
        failed(e);
        resolve();
      });
    });
    const timer = setTimeout(
      () => failed(new Error(`pcscd did not say it was ready within ${START_TIMEOUT_MS} ms:\n${this.tail.join("\n")}`)),
      START_TIMEOUT_MS,
    );
    try {
      await started;
      // Two pcscd started at the same moment both pass the check above; the one whose pid is in the
      // pid file holds the socket, and clients reach only it.
      const holder = Number((await readFile(PCSCD_PID_FILE, "utf8").catch(() => "")).trim());
      if (holder && holder !== child.pid) throw new Error(`another pcscd (pid ${holder}) started at the same time and holds ${PCSCD_SOCKET}`);
    } catch (e) {
      await this.stop();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    this.o.log?.info("pcscd ready", { pid: child.pid, readers: this.readerNames.join(", "), shim: this.shim ? "loopback, TCP_NODELAY" : "none" });
  }

  /** Stops the daemon and closes its log. */
  async close(): Promise<void> {
    await this.stop();
    const f = this.logFile;
    this.logFile = undefined;
    if (f) await new Promise<void>((resolve) => f.end(resolve));
  }
}
