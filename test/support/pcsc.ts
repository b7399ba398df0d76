// Tests through real PC/SC: netpurse's emulated readers in a pcscd of the
// test's own, reached with opensc-tool as any PC/SC client reaches a reader.
// When this machine cannot run that (no pcscd, no vpcd driver, another pcscd
// running, not root...), the suite is skipped LOUDLY: the exact reason on
// stderr and the tests marked pending, never passed. With
// NETPURSE_REQUIRE_PCSC=1 (a CI that installs PC/SC) it fails instead.

import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { startEmulatedReaders, type EmulatedReaders, type EmulatedReadersOptions } from "../../services/emulator/emulator.js";
import { findProgram, pcscSupport } from "../../services/emulator/pcscd.js";
import { tempDir } from "./fixtures.js";

/** Why emulated readers cannot be tested here, or undefined when they can. */
export async function pcscUnavailable(o: { opensc?: boolean; binding?: boolean } = {}): Promise<string | undefined> {
  const support = await pcscSupport({ binding: o.binding ?? false });
  const reasons = support.ok ? [] : [support.reason];
  if (o.opensc !== false && !(await findProgram("opensc-tool"))) reasons.push("opensc-tool is not installed (Debian/Ubuntu: apt-get install opensc)");
  return reasons.length > 0 ? reasons.join("; ") : undefined;
}

/** Skips the running suite or test, saying why on stderr; fails instead when NETPURSE_REQUIRE_PCSC=1. */
export function skipLoudly(ctx: Mocha.Context, reason: string): never {
  // In a before() hook the whole suite is skipped: name the suite, not the hook.
  const runnable = ctx.test;
  const title = ((runnable as { type?: string } | undefined)?.type === "hook" ? runnable?.parent?.fullTitle() : runnable?.fullTitle()) ?? "PC/SC tests";
  if (process.env.NETPURSE_REQUIRE_PCSC === "1") throw new Error(`NETPURSE_REQUIRE_PCSC=1 but PC/SC cannot be set up: ${reason}`);
  console.warn(`\n  SKIPPED "${title}": PC/SC cannot be set up on this machine: ${reason}\n`);
  ctx.skip();
}

export interface TestReaders extends EmulatedReaders {
  dir: string;
}

/**
 * In before(): starts pcscd and the emulated readers for the suite, or skips the suite loudly.
 * Call close() in after(), which runs even when tests fail: it stops pcscd and removes the folder.
 */
export async function emulatedReadersOrSkip(
  ctx: Mocha.Context,
  o: Omit<EmulatedReadersOptions, "dir" | "pcscd"> & { binding?: boolean },
): Promise<TestReaders> {
  ctx.timeout(30_000);
  const reason = await pcscUnavailable({ binding: o.binding ?? false });
  if (reason) skipLoudly(ctx, reason);
  const { dir, cleanup } = await tempDir("netpurse-pcscd-");
  let readers: EmulatedReaders;
  try {
    readers = await startEmulatedReaders({ ...o, dir, pcscd: true });
  } catch (e) {
    await cleanup();
    throw e;
  }
  return {
    ...readers,
    dir,
    close: async () => {
      try {
        await readers.close();
      } finally {
        await cleanup();
      }
    },
  };
}

/** A reader as `opensc-tool -l` lists it. */
export interface ListedReader {
  index: number;
  name: string;
  card: boolean;
}

const run = promisify(execFile);

/** The readers PC/SC lists, through opensc-tool. */
export async function openscReaders(): Promise<ListedReader[]> {
  const { stdout } = await run("opensc-tool", ["-l"]);
  const lines = stdout.split("\n");
  const header = lines.findIndex((l) => l.startsWith("Nr."));
  if (header < 0) return [];
  const nameAt = lines[header]!.indexOf("Name");
  return lines
    .slice(header + 1)
    .filter((l) => /^\d+\s/.test(l))
    .map((l) => ({ index: Number(l.split(/\s+/)[0]), card: /^\d+\s+Yes/.test(l), name: l.slice(nameAt).trim() }));
}

/** One APDU exchanged by opensc-tool: the status word as hex (e.g. "9000") and the response data. */
export interface OpenscExchange {
  sw: string;
  data: Buffer;
}

/** Sends command APDUs (hex) in one connection to the reader named `reader`, through opensc-tool. */
export async function openscSend(reader: string, apdus: string[]): Promise<OpenscExchange[]> {
  const { stdout } = await run("opensc-tool", ["-r", reader, ...apdus.flatMap((a) => ["-s", a])]);
  const out: OpenscExchange[] = [];
  let current: OpenscExchange | undefined;
  for (const line of stdout.split("\n")) {
    const received = /^Received \(SW1=0x([0-9A-Fa-f]{2}), SW2=0x([0-9A-Fa-f]{2})\)/.exec(line);
    if (received) {
      current = { sw: `${received[1]}${received[2]}`.toUpperCase(), data: Buffer.alloc(0) };
      out.push(current);
    } else if (line.startsWith("Sending:")) {
      current = undefined;
    } else if (current && /^[0-9A-F]{2} /.test(line)) {
      // "01 4E 50 ... .NP..": up to 16 bytes in hex, then the same as text.
      current.data = Buffer.concat([current.data, Buffer.from((line.slice(0, 48).match(/[0-9A-F]{2}/g) ?? []).join(""), "hex")]);
    }
  }
  return out;
}
