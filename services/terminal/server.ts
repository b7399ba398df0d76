import { join } from "node:path";
import { readdir } from "node:fs/promises";
import { createLogger } from "../../lib/log.js";
import { PcscReaders } from "../../lib/pcsc/readers.js";
import type { Security } from "../../lib/pki/security.js";
import { openSqlite } from "../../lib/store/db.js";
import { TerminalHost, type TerminalHostOptions } from "./terminal-host.js";
import { TERMINAL_MIGRATIONS } from "./store.js";

export interface TerminalConfig {
  security: Security;
  terminalId: string;
  /** The concentrators: one address, or several separated by commas (attached to one at a time, the next when its stream ends). */
  concentrator: string;
  /** The host's folder: terminal.db and psams/*.psam.json. */
  dir: string;
  /** PSAMs in PC/SC readers whose names match this pattern (a regular expression), besides any PSAM files. */
  psamReaders?: string;
  window?: number;
  /** Close a PSAM's batch at this many records (default 200). */
  batchCloseAt?: number;
  /** Close a PSAM's non-empty batch once its first record is this old (default 1 h). */
  batchCloseAfterMs?: number;
  /** Clearing's address, where closed batches are sent; without it they wait in the host's outbox. */
  clearingAddress?: string;
  /** The batch submitter's deadline and retry timing. */
  submitter?: TerminalHostOptions["submitter"];
  answerDelayMs?: number;
}

/** The PSAM files in a terminal host's folder. */
async function psamFilesIn(dir: string): Promise<string[]> {
  const folder = join(dir, "psams");
  const names = await readdir(folder).catch(() => [] as string[]);
  return names
    .filter((n) => n.endsWith(".psam.json"))
    .sort()
    .map((n) => join(folder, n));
}

/** A reader-name pattern from the command line, refused with a clear message when it is not a regular expression. */
function readerPattern(text: string): RegExp {
  try {
    return new RegExp(text);
  } catch (e) {
    throw new Error(`--psam-readers: not a regular expression: ${(e as Error).message}`, { cause: e });
  }
}

/** Starts a terminal host in this process; it dials the concentrator and clearing (it serves no RPCs). */
export async function startTerminalHost(c: TerminalConfig) {
  const log = createLogger(`terminal ${c.terminalId}`);
  const psamFiles = c.psamReaders === undefined ? await psamFilesIn(c.dir) : [];
  if (psamFiles.length === 0 && c.psamReaders === undefined) {
    throw new Error(`no PSAMs in ${join(c.dir, "psams")}: provision some with 'netpurse-issuer provision-psam', or give --psam-readers PATTERN`);
  }
  const pattern = c.psamReaders === undefined ? undefined : readerPattern(c.psamReaders);
  const readers = pattern ? await PcscReaders.open({ log: log.child("pcsc") }) : undefined;
  const db = openSqlite(join(c.dir, "terminal.db"), TERMINAL_MIGRATIONS);
  const host = new TerminalHost({
    terminalId: c.terminalId,
    concentratorAddress: c.concentrator,
    security: c.security,
    psamFiles,
    ...(readers && pattern ? { psamReaders: { readers, pattern } } : {}),
    db,
    log,
    ...(c.window !== undefined ? { window: c.window } : {}),
    ...(c.batchCloseAt !== undefined ? { batchCloseAt: c.batchCloseAt } : {}),
    ...(c.batchCloseAfterMs !== undefined ? { batchCloseAfterMs: c.batchCloseAfterMs } : {}),
    ...(c.clearingAddress !== undefined ? { clearingAddress: c.clearingAddress } : {}),
    ...(c.submitter !== undefined ? { submitter: c.submitter } : {}),
    ...(c.answerDelayMs !== undefined ? { answerDelayMs: c.answerDelayMs } : {}),
  });
  await host.start();
  return {
    address: `${c.terminalId} -> ${c.concentrator}`,
    host,
    async close() {
      await host.close();
      await readers?.close();
      await db.close();
    },
  };
}
