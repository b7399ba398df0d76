// The issuer's word on which terminal host holds which PSAM: a file the
// issuer exports (netpurse-issuer export-psam-registry) and the concentrator
// reads at start and when it changes. A terminal may announce only the
// PSAMs provisioned for it, so a host that is not the issuer's cannot slip
// made-up PSAMs into the pool.

import { readFile } from "node:fs/promises";
import { unwatchFile, watchFile } from "node:fs";
import type { Logger } from "../../lib/log.js";

export interface PsamRegistryFile {
  /** One entry per PSAM the issuer provisioned. */
  psams: { psamId: string; terminalId: string }[];
}

/** PSAM id (hex) -> the terminal it was provisioned for. */
export async function readPsamRegistry(path: string): Promise<Map<string, string>> {
  let file: PsamRegistryFile;
  try {
    file = JSON.parse(await readFile(path, "utf8")) as PsamRegistryFile;
  } catch (e) {
    throw new Error(`cannot read the PSAM registry ${path} (${(e as Error).message}): export it with 'netpurse-issuer export-psam-registry --out ${path}'`, {
      cause: e,
    });
  }
  const map = new Map<string, string>();
  for (const p of file.psams ?? []) {
    if (!/^[0-9a-f]{8}$/.test(p.psamId) || typeof p.terminalId !== "string") throw new Error(`${path}: not a PSAM registry entry: ${JSON.stringify(p)}`);
    map.set(p.psamId, p.terminalId);
  }
  return map;
}

/** A registry that follows its file: a new export takes effect within seconds, for new announcements. */
export class WatchedPsamRegistry implements ReadonlyMap<string, string> {
  private map: Map<string, string>;

  private constructor(
    private readonly path: string,
    initial: Map<string, string>,
    log: Logger,
  ) {
    this.map = initial;
    watchFile(path, { interval: 1_000, persistent: false }, () => {
      readPsamRegistry(path).then(
        (m) => {
          this.map = m;
          log.info("PSAM registry reloaded", { psams: m.size });
        },
        (e: unknown) => log.warn("PSAM registry changed but does not read; keeping the previous one", { error: (e as Error).message }),
      );
    });
  }

  static async open(path: string, log: Logger): Promise<WatchedPsamRegistry> {
    return new WatchedPsamRegistry(path, await readPsamRegistry(path), log);
  }

  stop(): void {
    unwatchFile(this.path);
  }

  get size() {
    return this.map.size;
  }
  get(k: string) {
    return this.map.get(k);
  }
  has(k: string) {
    return this.map.has(k);
  }
  forEach(fn: (v: string, k: string, m: ReadonlyMap<string, string>) => void) {
    this.map.forEach((v, k) => fn(v, k, this));
  }
  entries() {
    return this.map.entries();
  }
  keys() {
    return this.map.keys();
  }
  values() {
    return this.map.values();
  }
  [Symbol.iterator]() {
    return this.map[Symbol.iterator]();
  }
}
