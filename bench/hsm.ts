// S2 signings per second: the load server's host security module signing
// LOAD commands (issueLoad: S1 verified, the counter written with fsync, S2
// made) on a SoftHSM2 token through PKCS#11, against the software module, in
// the same run on the same machine; and the cryptography alone (S1 checked
// and S2 made, no counter), to show what the token itself costs. Each
// signing waits for the one before, as the load server's module takes one
// command at a time.
//
// Alone: node --import tsx bench/hsm.ts [--signings N]. It needs SoftHSM2 and
// the pkcs11js binding; otherwise it says why and exits 1. The token lives in
// a temporary folder, removed afterwards.

import { randomBytes, randomUUID } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { availableParallelism, cpus, tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { macEqual } from "../lib/crypto/aes.js";
import { deriveSessionKey, diversifyCardKey } from "../lib/crypto/keys.js";
import { ensureToken, loadMasterKeyLabel, Pkcs11Token, withToken, type TokenConfig } from "../lib/hsm/pkcs11.js";
import { ensurePinFile, ensureSoftHsmConf, findSoftHsmModule, readPinFile, softHsmMissing } from "../lib/hsm/softhsm.js";
import { InitializeForLoadResponse, loadS1, loadS2, s1Message, s2Message, type LoadInit, type LoadInitCommand } from "../lib/protocol/load.js";
import { PurseStatusByte } from "../lib/protocol/purse.js";
import { loadFields, SoftwareHsm, type HostSecurityModule } from "../services/load/hsm.js";
import { Pkcs11Hsm, type Pkcs11HsmFile } from "../services/load/pkcs11-hsm.js";
import { markdown } from "./format.js";
import { handleInterrupts, stopOnInterrupt } from "./interrupt.js";

export const HSM_DEFAULTS = { signings: 2_000 };
const WARMUP = 50;
const CARDS = 64;
const HSM_ID = "0a0b0c0d";

export interface HsmPathResult {
  path: string;
  signings: number;
  perSecond: number;
  medianMs: number;
  p99Ms: number;
}

export interface HsmReport {
  cores: number;
  cpu: string;
  signings: number;
  paths: HsmPathResult[];
}

interface Card {
  authorised: LoadInitCommand;
  init: LoadInit;
}

function cardFor(cardKey: Buffer, purseId: Buffer, keyVersion: number): Card {
  const authorised: LoadInitCommand = {
    amount: 1_000,
    currency: 978,
    bankId: "bench-bank",
    dateTime: Math.floor(Date.now() / 1000),
    transactionRef: randomUUID(),
  };
  const response = {
    format: 1,
    providerId: Buffer.from("4e500001", "hex"),
    purseId,
    currency: 978,
    exponent: 2,
    balance: 0,
    maxBalance: 50_000,
    expiry: "2031-12-31",
    counter: 1,
    keyVersion,
    algorithm: 1,
    status: PurseStatusByte.ACTIVE,
    challenge: randomBytes(8),
  };
  return { authorised, init: InitializeForLoadResponse.decode(InitializeForLoadResponse.encode({ ...response, s1: loadS1(cardKey, authorised, response) })) };
}

/** Runs `once` for the warm-up, then `n` times one after the other, timing each. */
async function timed(path: string, n: number, once: (i: number) => unknown): Promise<HsmPathResult> {
  for (let i = 0; i < WARMUP; i++) await once(i);
  const took: number[] = [];
  const start = performance.now();
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await once(i);
    took.push(performance.now() - t);
  }
  const seconds = (performance.now() - start) / 1000;
  took.sort((a, b) => a - b);
  const at = (q: number) => took[Math.min(took.length - 1, Math.floor(q * took.length))]!;
  return { path, signings: n, perSecond: n / seconds, medianMs: at(0.5), p99Ms: at(0.99) };
}

/** Why the benchmark cannot run here, or undefined. */
const missing = softHsmMissing;

/**
 * S2 signings per second through PKCS#11 (SoftHSM2) and the software module,
 * and the cryptography of each alone; the token and the modules' files in a
 * temporary folder, removed afterwards. Throws, saying why, without SoftHSM2
 * or pkcs11js.
 */
export async function measureHsm(o: { signings?: number } = {}): Promise<HsmReport> {
  const why = await missing();
  if (why) throw new Error(`the HSM benchmark needs SoftHSM2 and pkcs11js: ${why}`);
  const dir = await mkdtemp(join(tmpdir(), "netpurse-bench-hsm-"));
  const removeDir = () => rm(dir, { recursive: true, force: true });
  const forget = stopOnInterrupt(removeDir);
  try {
    return await measureIn(dir, o.signings ?? HSM_DEFAULTS.signings);
  } finally {
    forget();
    await removeDir();
  }
}

async function measureIn(dir: string, n: number): Promise<HsmReport> {
  const token: TokenConfig = {
    module: findSoftHsmModule()!,
    tokenLabel: "netpurse-bench",
    pinFile: await ensurePinFile(join(dir, "user.pin")),
    softhsm2Conf: await ensureSoftHsmConf(join(dir, "softhsm2.conf"), join(dir, "tokens")),
  };
  await ensureToken(token, await readPinFile(await ensurePinFile(join(dir, "so.pin"))));
  const label = loadMasterKeyLabel(1);
  // The token's master key is generated there, as provisioning does; the cards' keys come out as personalisation takes them.
  const purses = Array.from({ length: CARDS }, () => randomBytes(8));
  const tokenCardKeys = await withToken(token, (s) => {
    s.generateMasterKey(label);
    return purses.map((p) => s.cardKey(label, p));
  });
  const softMaster = randomBytes(16);
  const tokenCards = purses.map((p, i) => cardFor(tokenCardKeys[i]!, p, 1));
  const softCards = purses.map((p) => cardFor(diversifyCardKey(softMaster, p), p, 1));

  const softPath = join(dir, "soft-hsm.json");
  await SoftwareHsm.write(softPath, { format: 1, hsmId: HSM_ID, loadKeys: { "1": softMaster.toString("hex") }, counter: 0 });
  const tokenPath = join(dir, "pkcs11-hsm.json");
  const file: Pkcs11HsmFile = { format: 1, kind: "pkcs11", hsmId: HSM_ID, ...token, loadKeys: { "1": label }, counter: 0 };
  await writeFile(tokenPath, JSON.stringify(file), { mode: 0o600 });
  const soft: HostSecurityModule = await SoftwareHsm.open(softPath);
  const hsm = await Pkcs11Hsm.open(tokenPath);
  const t = await Pkcs11Token.open(token);
  try {
    const sign = (m: HostSecurityModule, cards: Card[]) => (i: number) => m.issueLoad(cards[i % CARDS]!.authorised, 2, cards[i % CARDS]!.init);
    const paths = [
      await timed("software module: issueLoad (S1, counter on disk, S2)", n, sign(soft, softCards)),
      await timed("PKCS#11, SoftHSM2: issueLoad (S1, counter on disk, S2)", n, sign(hsm, tokenCards)),
    ];
    // The cryptography alone: S1 checked under the card key, S2 made under the session key, no counter written.
    const session = (c: Card, counter: number) => ({
      cardCounter: c.init.counter,
      securityModuleId: Buffer.from(HSM_ID, "hex"),
      securityModuleCounter: counter,
      challenge: c.init.challenge,
    });
    paths.push(
      await timed("software: S1 check and S2 only", n, (i) => {
        const c = softCards[i % CARDS]!;
        const key = diversifyCardKey(softMaster, c.init.purseId);
        if (!macEqual(loadS1(key, c.authorised, c.init), c.init.s1)) throw new Error("S1 does not verify");
        return loadS2(deriveSessionKey(key, session(c, i)), c.init, loadFields(c.authorised, HSM_ID, i));
      }),
      await timed("PKCS#11, SoftHSM2: S1 check and S2 only", n, (i) => {
        const c = tokenCards[i % CARDS]!;
        const { s1, ...response } = c.init;
        return t.run((s) => {
          if (!macEqual(s.cardMac(label, c.init.purseId, s1Message(c.authorised, response)), s1)) throw new Error("S1 does not verify");
          return s.sessionMac(label, c.init.purseId, session(c, i), s2Message(c.init, loadFields(c.authorised, HSM_ID, i)));
        });
      }),
    );
    return { cores: availableParallelism(), cpu: cpus()[0]?.model.trim() ?? "unknown", signings: n, paths };
  } finally {
    t.close();
    hsm.close();
  }
}

export function renderHsm(r: HsmReport): string {
  const base = r.paths[0]?.perSecond ?? NaN;
  return [
    `### S2 signings per second, one at a time (${r.signings} each; ${r.cores} cores, ${r.cpu})`,
    "",
    markdown(
      ["path", "signings/s", "median ms", "p99 ms", "vs software issueLoad"],
      r.paths.map((p) => [p.path, p.perSecond.toFixed(0), p.medianMs.toFixed(3), p.p99Ms.toFixed(3), `${(p.perSecond / base).toFixed(2)}×`]),
    ),
    "",
  ].join("\n");
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const { values } = parseArgs({ options: { signings: { type: "string" }, help: { type: "boolean", short: "h" } }, strict: true });
  if (values.help) {
    process.stdout.write(
      `Usage: node --import tsx bench/hsm.ts [--signings N (default ${HSM_DEFAULTS.signings})]\n\n` +
        "S2 signings per second of the load server's security module: PKCS#11 on SoftHSM2 against the\nsoftware module, and the cryptography of each alone. Markdown on stdout.\n",
    );
  } else {
    handleInterrupts();
    try {
      process.stdout.write(renderHsm(await measureHsm({ signings: values.signings === undefined ? HSM_DEFAULTS.signings : Number(values.signings) })));
    } catch (e) {
      process.stderr.write(`bench/hsm: ${(e as Error).message}\n`);
      process.exitCode = 1;
    }
  }
}
