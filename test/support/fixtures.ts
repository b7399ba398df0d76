// Test fixtures: a temporary data folder with issuer keys, cards and PSAMs
// made by the real issuer tools.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { ApduError, SW } from "../../lib/apdu/apdu.js";
import { Issuer } from "../../services/issuer/issuer.js";

export async function tempDir(prefix = "netpurse-test-"): Promise<{ dir: string; cleanup: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  return { dir, cleanup: () => rm(dir, { recursive: true, force: true }) };
}

export const EUR = 978;

/**
 * A scenario of half a minute or more (a service stopped and waited out, the
 * README's first command run twice): run when NETPURSE_SLOW_TESTS=1, which
 * .ci/run sets for a second mocha pass (`--grep '\[slow\]'`), so that `npm
 * test` stays under ten minutes. Its title starts with "[slow]".
 */
export function slowIt(title: string, fn: Mocha.AsyncFunc): Mocha.Test {
  return process.env.NETPURSE_SLOW_TESTS === "1" ? it(title, fn) : it.skip(title, fn);
}

/** The demo loyalty programme (docs/loyalty.md). */
export const SKYWAYS = 1001;

/** An issuer with keys of version 1 in a fresh folder. */
export async function makeIssuer(dir: string): Promise<Issuer> {
  await Issuer.createKeys(join(dir, "issuer"), 1);
  return Issuer.open(join(dir, "issuer"));
}

/** Creates a loyalty programme at the issuer (redeem and earn master keys of every key version); returns its code. */
export async function makeProgramme(issuer: Issuer, code = SKYWAYS, name = "Skyways Miles"): Promise<number> {
  await issuer.createProgramme(code, name);
  return code;
}

export async function makeCard(
  issuer: Issuer,
  dir: string,
  o: {
    value?: number;
    expiry?: string;
    currency?: number;
    name?: string;
    maxBalance?: number;
    keyVersion?: number;
    purseId?: string;
    /** Points purses, one per programme (made with makeProgramme first); maxBalance defaults to 1,000,000 points. */
    points?: { programme: number; value: number; maxBalance?: number }[];
  } = {},
): Promise<string> {
  const path = join(dir, "cards", `${o.name ?? "card"}.card.json`);
  await issuer.personaliseCard({
    path,
    currency: o.currency ?? EUR,
    exponent: 2,
    initialValue: o.value ?? 10_000,
    maxBalance: o.maxBalance ?? 50_000,
    expiry: o.expiry ?? "2099-12-31",
    ...(o.keyVersion !== undefined ? { keyVersion: o.keyVersion } : {}),
    ...(o.purseId !== undefined ? { purseId: o.purseId } : {}),
    ...(o.points !== undefined ? { points: o.points } : {}),
  });
  return path;
}

/**
 * A software PSAM; `currency` is a money currency (default EUR), 999 for an
 * authentication PSAM, or a programme code for that programme's points PSAM.
 */
export async function makePsam(
  issuer: Issuer,
  dir: string,
  o: { name?: string; currency?: number; psamId?: string; batchCapacity?: number } = {},
): Promise<string> {
  const path = join(dir, "psams", `${o.name ?? "psam"}.psam.json`);
  await issuer.provisionPsam({
    path,
    currency: o.currency ?? EUR,
    ...(o.psamId ? { psamId: o.psamId } : {}),
    ...(o.batchCapacity ? { batchCapacity: o.batchCapacity } : {}),
  });
  return path;
}

/** A programme's security module file (the load server's software module with the programme's earn keys); returns its path. */
export async function makeProgrammeHsm(issuer: Issuer, dir: string, code = SKYWAYS, o: { hsmId?: string } = {}): Promise<string> {
  const path = join(dir, "programmes", String(code), "hsm.json");
  await issuer.provisionProgrammeHsm({ path, programme: code, ...(o.hsmId ? { hsmId: o.hsmId } : {}) });
  return path;
}

/** What a command that was expected to fail printed, and its exit code. */
export interface CommandFailure {
  code: number;
  stdout: string;
  stderr: string;
}

/** Awaits a command run by promisify(execFile) that must fail, and returns its exit code and output. */
export async function commandFailure(run: Promise<unknown>): Promise<CommandFailure> {
  try {
    await run;
  } catch (e) {
    const f = e as Partial<CommandFailure>;
    if (typeof f.code !== "number") throw e;
    return { code: f.code, stdout: String(f.stdout ?? ""), stderr: String(f.stderr ?? "") };
  }
  throw new Error("the command succeeded; a failure was expected");
}

/** The status word an APDU exchange ended with: 9000 if it succeeded, the card's or PSAM's refusal otherwise. */
export async function swOf(p: Promise<unknown>): Promise<number> {
  try {
    await p;
  } catch (e) {
    if (e instanceof ApduError) return e.sw;
    throw e;
  }
  return SW.OK;
}
