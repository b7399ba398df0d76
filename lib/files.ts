import { mkdir, open, readFile, rename, chmod } from "node:fs/promises";
import { dirname, basename, join } from "node:path";
import { countFsync } from "./stats.js";

/**
 * Writes a file so that a crash leaves either the old or the new content:
 * write a temporary file beside it, fsync it, rename it over the old one,
 * fsync the directory. Private files (keys, cards) get mode 0600.
 */
export async function writeFileAtomic(path: string, content: string | Uint8Array, opts: { private?: boolean } = {}): Promise<void> {
  const dir = dirname(path);
  await mkdir(dir, { recursive: true, mode: opts.private ? 0o700 : 0o755 });
  const tmp = join(dir, `.${basename(path)}.${process.pid}.${Date.now()}.tmp`);
  const mode = opts.private ? 0o600 : 0o644;
  const fh = await open(tmp, "w", mode);
  try {
    await fh.writeFile(content);
    await fh.sync();
    countFsync();
  } finally {
    await fh.close();
  }
  await chmod(tmp, mode); // the umask may have narrowed or widened it
  await rename(tmp, path);
  const d = await open(dir, "r");
  try {
    await d.sync();
    countFsync();
  } finally {
    await d.close();
  }
}

export async function writeJsonAtomic(path: string, value: unknown, opts: { private?: boolean } = {}): Promise<void> {
  await writeFileAtomic(path, JSON.stringify(value, null, 2) + "\n", opts);
}

export async function readJson<T>(path: string): Promise<T> {
  return JSON.parse(await readFile(path, "utf8")) as T;
}
