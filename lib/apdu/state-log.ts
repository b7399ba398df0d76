// The software card's and software PSAM's state on disk: a snapshot (the
// state as pretty JSON, the file format they always had) and beside it a log
// (`<path>.log`) of what each save changed, one checksummed line per save.
// A command that changes the state costs one small append and one fdatasync,
// not a rewrite of everything: the PSAM's snapshot is ~235 KB.
//
// Opening reads the snapshot and replays the records after the snapshot's
// sequence number. A last record that does not check out was being written
// when the process died and was never acknowledged (its sync had not
// returned): it is dropped. A bad record with another after it is damage,
// and the file is refused. Once the log has grown as large as the snapshot
// (and at least stateLogLimits.compactMinBytes), the state is written whole again
// (atomically, carrying the last sequence number) and the log emptied; a
// crash between the two leaves records the snapshot already holds, which
// replay skips.
//
// Two processes must not run the same file at once (not supported before the
// log either, when the last to write won): a save that finds the log changed by another process is refused.
// Within one process, opening a file again shares the open log.

import * as fs from "node:fs";
import { open, readFile, stat } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { promisify } from "node:util";
import { crc32 } from "node:zlib";
import { writeFileAtomic } from "../files.js";
import { Mutex } from "../mutex.js";
import { countFsync } from "../stats.js";

const openFd = promisify(fs.open);
const closeFd = promisify(fs.close);
const writeFd = promisify(fs.write);
const fdatasync = promisify(fs.fdatasync);
const fsyncFd = promisify(fs.fsync);
const ftruncate = promisify(fs.ftruncate);
const fchmod = promisify(fs.fchmod);

/** The log's name beside a state file. */
export const logPathOf = (path: string): string => `${path}.log`;

/** The snapshot's field naming the last log record it holds (absent: none, as in files from before the log). */
export const SNAPSHOT_SEQ_FIELD = "stateLogSeq";

/**
 * When to write a new snapshot: once the log holds as many bytes as the
 * snapshot, and at least `compactMinBytes`. Each logged byte then costs at
 * most one byte of snapshot rewriting later (a PSAM logs about 1 KB per
 * purchase, so its 235-305 KB snapshot is rewritten about once every 300
 * purchases), and opening reads at most twice what it read before the log. Tests lower it to reach compaction quickly.
 */
export const stateLogLimits = { compactMinBytes: 64 * 1024 };

/** One top-level field's change: a new value, its removal, or (an array) indices removed and elements added before and after the rest. */
export type FieldChange = { set: string; v: unknown } | { del: string } | { splice: string; rm?: number[]; pre?: unknown[]; add?: unknown[] };

interface LogRecord {
  seq: number;
  c: FieldChange[];
}

type Fields = Record<string, unknown>;

/** A state log that cannot be read: damaged or not a log of this file. */
export class StateLogError extends Error {}

/**
 * What changed from `prev` to `next`, field by field. The applications
 * update immutably, so an array element that did not change is the same
 * object: an array that lost some elements and gained others at either end
 * is sent as that splice; any other change as the field's whole value.
 */
export function diffState(prev: object, next: object): FieldChange[] {
  const a = prev as Fields;
  const b = next as Fields;
  const changes: FieldChange[] = [];
  for (const k of new Set([...Object.keys(a), ...Object.keys(b)])) {
    const was = a[k];
    const now = b[k];
    if (was === now) continue;
    if (now === undefined) changes.push({ del: k });
    else if (Array.isArray(was) && Array.isArray(now)) {
      const splice = arraySplice(was, now);
      if (splice === "same") continue;
      changes.push(splice ? { splice: k, ...splice } : { set: k, v: now });
    } else changes.push({ set: k, v: now });
  }
  return changes;
}

/** `next` as `prev` with indices removed and elements added at either end, if it is that; "same" if nothing changed. */
function arraySplice(prev: unknown[], next: unknown[]): { rm?: number[]; pre?: unknown[]; add?: unknown[] } | "same" | undefined {
  const inNext = new Set(next);
  const rm: number[] = [];
  const kept: unknown[] = [];
  prev.forEach((x, i) => (inNext.has(x) ? kept.push(x) : rm.push(i)));
  if (kept.length === 0) return undefined;
  const start = next.indexOf(kept[0]);
  if (start + kept.length > next.length) return undefined;
  for (let j = 0; j < kept.length; j++) if (next[start + j] !== kept[j]) return undefined;
  const pre = next.slice(0, start);
  const add = next.slice(start + kept.length);
  if (rm.length === 0 && pre.length === 0 && add.length === 0) return "same";
  return { ...(rm.length ? { rm } : {}), ...(pre.length ? { pre } : {}), ...(add.length ? { add } : {}) };
}

/** Applies one record's changes (a new object; `state` is not touched). */
function applyChanges(state: Fields, changes: FieldChange[]): Fields {
  const out = { ...state };
  for (const c of changes) {
    if ("set" in c) out[c.set] = c.v;
    else if ("del" in c) delete out[c.del];
    else {
      const cur: unknown = out[c.splice];
      const { rm = [], pre = [], add = [] } = c;
      if (!Array.isArray(cur) || !Array.isArray(rm) || !Array.isArray(pre) || !Array.isArray(add)) {
        throw new StateLogError(`splice of ${c.splice}: not lists`);
      }
      const list = cur as unknown[];
      if (rm.some((i, n) => !Number.isInteger(i) || i < 0 || i >= list.length || i <= (rm[n - 1] ?? -1))) {
        throw new StateLogError(`splice of ${c.splice} removes indices ${JSON.stringify(rm)} from a list of ${list.length}`);
      }
      const gone = new Set(rm);
      out[c.splice] = [...pre, ...list.filter((_, i) => !gone.has(i)), ...add];
    }
  }
  return out;
}

const hex8 = (n: number) => n.toString(16).padStart(8, "0");

/** One record as a line: the CRC-32 of its JSON, a space, the JSON. */
function recordLine(r: LogRecord): Buffer {
  const json = Buffer.from(JSON.stringify(r));
  return Buffer.concat([Buffer.from(`${hex8(crc32(json))} `), json, Buffer.from("\n")]);
}

/** A line's record, or undefined when its checksum does not match (torn or damaged). Throws on a record whose checksum matches but which is not one. */
function parseLine(line: Buffer): LogRecord | undefined {
  if (line.length < 10 || line[8] !== 0x20) return undefined;
  const json = line.subarray(9);
  if (line.subarray(0, 8).toString("latin1") !== hex8(crc32(json))) return undefined;
  let r: unknown;
  try {
    r = JSON.parse(json.toString("utf8"));
  } catch {
    throw new StateLogError("a record's checksum matches but it is not JSON");
  }
  const rec = r as Partial<LogRecord>;
  if (typeof r !== "object" || r === null || !Number.isSafeInteger(rec.seq) || (rec.seq as number) < 1 || !Array.isArray(rec.c)) {
    throw new StateLogError("a record's checksum matches but it is not a state log record");
  }
  return rec as LogRecord;
}

/** The log's records and how many of its bytes they take; a torn last line is left out. */
function parseLog(buf: Buffer, logPath: string): { records: LogRecord[]; validBytes: number } {
  const records: LogRecord[] = [];
  let pos = 0;
  let line = 0;
  while (pos < buf.length) {
    line++;
    const nl = buf.indexOf(0x0a, pos);
    const end = nl === -1 ? buf.length : nl;
    let rec: LogRecord | undefined;
    try {
      rec = nl === -1 ? undefined : parseLine(buf.subarray(pos, end));
    } catch (e) {
      throw new StateLogError(`${logPath}: record on line ${line}: ${(e as Error).message}`, { cause: e });
    }
    if (!rec) {
      // Only the last record can be torn: it was never acknowledged. One with more after it is damage.
      if (nl === -1 || nl + 1 === buf.length) break;
      throw new StateLogError(`${logPath}: record on line ${line} is damaged (its checksum does not match) and is not the last: the log is corrupt`);
    }
    const prev = records.at(-1);
    if (prev && rec.seq !== prev.seq + 1) {
      throw new StateLogError(`${logPath}: record on line ${line} has sequence number ${rec.seq} after ${prev.seq}: the log is corrupt`);
    }
    records.push(rec);
    pos = nl + 1;
  }
  return { records, validBytes: pos };
}

async function readOrEmpty(path: string): Promise<Buffer | undefined> {
  try {
    return await readFile(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw e;
  }
}

interface Loaded<S> {
  state: S;
  seq: number;
  snapshotBytes: number;
  /** The snapshot's inode: writing it again (compaction, writeState) makes a new one. */
  snapshotIno: number;
  /** The log as read: undefined if there is none. */
  log: Buffer | undefined;
  validBytes: number;
  /** Whether the log holds records the snapshot has already (a compaction ended before emptying it). */
  onlyOld: boolean;
}

/** The state: the snapshot with the log's later records applied. */
async function loadState<S extends object>(path: string): Promise<Loaded<S>> {
  const fh = await open(path, "r");
  let text: string;
  let snapshotIno: number;
  try {
    snapshotIno = (await fh.stat()).ino;
    text = await fh.readFile("utf8");
  } finally {
    await fh.close();
  }
  const parsed = JSON.parse(text) as Fields;
  const { [SNAPSHOT_SEQ_FIELD]: snapSeq = 0, ...snapshot } = parsed;
  if (!Number.isSafeInteger(snapSeq) || (snapSeq as number) < 0) throw new StateLogError(`${path}: ${SNAPSHOT_SEQ_FIELD} is not a sequence number`);
  const logPath = logPathOf(path);
  const log = await readOrEmpty(logPath);
  const { records, validBytes } = log ? parseLog(log, logPath) : { records: [], validBytes: 0 };
  let state: Fields = snapshot;
  let seq = snapSeq as number;
  for (const r of records) {
    if (r.seq <= seq) continue;
    if (r.seq !== seq + 1) {
      throw new StateLogError(
        `${logPath}: the records after ${seq}, which ${path} holds, start at ${r.seq}: the log is not this file's or records are missing`,
      );
    }
    try {
      state = applyChanges(state, r.c);
    } catch (e) {
      throw new StateLogError(`${logPath}: record ${r.seq}: ${(e as Error).message}`, { cause: e });
    }
    seq = r.seq;
  }
  const onlyOld = records.length > 0 && (records.at(-1)?.seq ?? 0) <= (snapSeq as number);
  return { state: state as S, seq, snapshotBytes: Buffer.byteLength(text), snapshotIno, log, validBytes, onlyOld };
}

/** Reads a state file as its application would open it, writing nothing (audits, tools, tests). */
export async function readState<S extends object>(path: string): Promise<S> {
  // The application may compact while we read (a new snapshot, then an emptied log): read again until the snapshot
  // read is still the file's, so the log read after it belongs to it.
  for (let attempt = 1; ; attempt++) {
    const l = await loadState<S>(path);
    const now = await stat(path).catch(() => undefined);
    if (now?.ino === l.snapshotIno || attempt === 5) return l.state;
  }
}

/** The snapshot's text: the state, and the last record it holds. */
const snapshotText = (state: object, seq: number) => JSON.stringify(seq > 0 ? { ...state, [SNAPSHOT_SEQ_FIELD]: seq } : state, null, 2) + "\n";

async function syncDir(path: string): Promise<void> {
  const d = await openFd(dirname(path), "r");
  try {
    await fsyncFd(d);
    countFsync();
  } finally {
    await closeFd(d);
  }
}

/**
 * Writes a state file whole (personalisation, provisioning, an issuer's
 * change while the application is stopped), mode 0600. Any log beside it
 * from an earlier state is superseded: the snapshot carries the number of
 * its last record (replay skips up to it), then the log is emptied. If this process has
 * the file open, the state is saved through that open log instead, so that
 * every application on it goes on from the state written.
 */
export async function writeState(path: string, state: object): Promise<void> {
  const live = liveLog<object>(path);
  if (live) return live.run(() => live.save(state));
  const logPath = logPathOf(path);
  const log = await readOrEmpty(logPath);
  let seq = 0;
  if (log) {
    for (let pos = 0; pos < log.length;) {
      const nl = log.indexOf(0x0a, pos);
      if (nl === -1) break;
      const rec = (() => {
        try {
          return parseLine(log.subarray(pos, nl));
        } catch {
          return undefined;
        }
      })();
      if (rec) seq = Math.max(seq, rec.seq);
      pos = nl + 1;
    }
  }
  await writeFileAtomic(path, snapshotText(state, seq), { private: true });
  if (log && log.length > 0) {
    const fd = await openFd(logPath, "r+");
    try {
      await ftruncate(fd, 0);
      await fdatasync(fd);
      countFsync();
    } finally {
      await closeFd(fd);
    }
  }
}

// A StateLog nobody closed gives its descriptor back when it is collected.
const descriptors = new FinalizationRegistry<number>((fd) => fs.close(fd, () => undefined));

/**
 * The state files this process has open, by absolute path: a second open of
 * one (tests open a card the client daemon holds too) shares the first's
 * log, its state and its one-command-at-a-time lock, so that neither
 * application overwrites what the other saved, nor do their records collide.
 */
const openLogs = new Map<string, WeakRef<StateLog<object>>>();

/** Opens under way, by absolute path: the next open of the file waits for this one. */
const opening = new Map<string, Promise<void>>();

/**
 * Files whose save failed in this process, and why: the page cache may hold
 * a record the disk does not, so opening them again here could append after
 * it; only a new process reads what the disk truly holds.
 */
const brokenPaths = new Map<string, Error>();

/** This process's open log of a file, if it is still the file's: one another process changed since is given up. */
function liveLog<S extends object>(path: string): StateLog<S> | undefined {
  const key = resolve(path);
  const live = openLogs.get(key)?.deref() as StateLog<S> | undefined;
  if (!live) return undefined;
  if (live.isCurrent()) return live;
  openLogs.delete(key);
  return undefined;
}

/** An application's state, open for saving: the log opened once for appending. */
export class StateLog<S extends object> {
  private readonly mutex = new Mutex();
  /** Applications holding it open. */
  private holders = 1;
  private closed = false;
  private failed: Error | undefined;
  /** Log size at which the next compaction is due. */
  private compactAt: number;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    private current: S,
    private seq: number,
    private logBytes: number,
    snapshotBytes: number,
    private snapshotIno: number,
  ) {
    this.compactAt = Math.max(stateLogLimits.compactMinBytes, snapshotBytes);
    descriptors.register(this, fd, this);
  }

  /**
   * Opens a state file for saving. `accept` sees the state first and may
   * refuse it (throw) before anything is written. Drops a torn last record,
   * and finishes a compaction a crash interrupted. A file this process has
   * open already gives the same StateLog (close it once per open).
   */
  static async open<S extends object>(path: string, accept?: (state: S) => void): Promise<StateLog<S>> {
    const key = resolve(path);
    const broken = brokenPaths.get(key);
    if (broken) {
      throw new StateLogError(
        `${path}: a save to its state log failed in this process (${broken.message}); what reached the disk is known only after a restart: restart the process`,
        { cause: broken },
      );
    }
    // Opens of one file in this process take turns: a second would otherwise cut records the first has saved meanwhile.
    const before = opening.get(key) ?? Promise.resolve();
    let done!: () => void;
    const mine = new Promise<void>((r) => (done = r));
    const turn = before.then(() => mine);
    opening.set(key, turn);
    await before;
    try {
      return await StateLog.openNow<S>(path, key, accept);
    } finally {
      done();
      if (opening.get(key) === turn) opening.delete(key);
    }
  }

  private static async openNow<S extends object>(path: string, key: string, accept?: (state: S) => void): Promise<StateLog<S>> {
    const live = liveLog<S>(path);
    if (live) {
      accept?.(live.state);
      live.holders++;
      return live;
    }
    const l = await loadState<S>(path);
    accept?.(l.state);
    const logPath = logPathOf(path);
    const fd = await openFd(logPath, fs.constants.O_WRONLY | fs.constants.O_APPEND | fs.constants.O_CREAT, 0o600);
    let log: StateLog<S>;
    try {
      await fchmod(fd, 0o600); // the umask may have narrowed it, or the log be older than this rule
      let logBytes = l.validBytes;
      const keep = l.onlyOld ? 0 : l.validBytes;
      if (l.log && l.log.length > keep) {
        await ftruncate(fd, keep);
        await fdatasync(fd);
        countFsync();
        logBytes = keep;
      }
      // The log's name is in the folder before any record in it is acknowledged.
      if (!l.log) await syncDir(logPath);
      log = new StateLog<S>(path, fd, l.state, l.seq, logBytes, l.snapshotBytes, l.snapshotIno);
    } catch (e) {
      await closeFd(fd);
      throw e;
    }
    openLogs.set(key, new WeakRef(log));
    return log;
  }

  /** The state as last saved. */
  get state(): S {
    return this.current;
  }

  /** Runs one command at a time, for every application sharing this log. */
  run<T>(task: () => Promise<T>): Promise<T> {
    return this.mutex.run(task);
  }

  /**
   * Makes `next` the state, durably: one record appended, one fdatasync.
   * One save at a time: callers sharing the log save within run().
   */
  async save(next: S): Promise<void> {
    if (this.closed) throw new Error(`${this.path}: its state log is closed`);
    if (this.failed)
      throw new Error(`${this.path}: a write to its state log failed (${this.failed.message}); restart the process, which reads what the disk holds`, {
        cause: this.failed,
      });
    const changes = diffState(this.current, next);
    if (changes.length === 0) {
      this.current = next;
      return;
    }
    // Another process's record or snapshot would collide with this one's: refuse rather than damage the file.
    if (!this.isCurrent()) {
      this.failed = new StateLogError(`${this.path} was changed by another process since it was opened here: two processes must not run the same card or PSAM`);
      throw this.failed;
    }
    const line = recordLine({ seq: this.seq + 1, c: changes });
    try {
      for (let off = 0; off < line.length;) off += (await writeFd(this.fd, line, off, line.length - off)).bytesWritten;
      await fdatasync(this.fd);
      countFsync();
    } catch (e) {
      // What reached the disk is unknown: no record may follow it, in this process, until it starts again.
      this.failed = e as Error;
      brokenPaths.set(resolve(this.path), this.failed);
      throw e;
    }
    this.seq++;
    this.current = next;
    this.logBytes += line.length;
    if (this.logBytes >= this.compactAt) await this.compact();
  }

  /**
   * Writes the state whole with its sequence number, then empties the log.
   * The saved record is durable already: a failure here loses nothing (the
   * log stays valid), so it is tried again after as many bytes more.
   */
  private async compact(): Promise<void> {
    const text = snapshotText(this.current, this.seq);
    try {
      await writeFileAtomic(this.path, text, { private: true });
    } catch {
      // Whether or not the new snapshot took the old one's place, the log still holds every record (those the
      // snapshot holds are skipped on replay): tried again after as many bytes more.
      this.snapshotIno = fs.statSync(this.path).ino;
      this.compactAt = this.logBytes + Math.max(stateLogLimits.compactMinBytes, Buffer.byteLength(text));
      return;
    }
    this.snapshotIno = fs.statSync(this.path).ino;
    try {
      await ftruncate(this.fd, 0);
      await fdatasync(this.fd);
      countFsync();
    } catch (e) {
      // What the log holds on disk is unknown: as for a failed save, no record may follow until the process restarts.
      this.failed = e as Error;
      brokenPaths.set(resolve(this.path), this.failed);
      return;
    }
    this.logBytes = 0;
    this.compactAt = Math.max(stateLogLimits.compactMinBytes, Buffer.byteLength(text));
  }

  /**
   * Whether the files are still as this log left them: the log as long as
   * it wrote it, the snapshot the one it read or wrote. Two stat calls, no
   * reading.
   */
  isCurrent(): boolean {
    if (this.closed || this.failed) return false;
    try {
      return fs.fstatSync(this.fd).size === this.logBytes && fs.statSync(this.path).ino === this.snapshotIno;
    } catch {
      return false;
    }
  }

  /** Closes this holder's use of the log; the file closes with its last holder. */
  async close(): Promise<void> {
    if (this.closed || --this.holders > 0) return;
    this.closed = true;
    const key = resolve(this.path);
    if (openLogs.get(key)?.deref() === (this as StateLog<object>)) openLogs.delete(key);
    descriptors.unregister(this);
    await closeFd(this.fd);
  }
}
