// Passwords for the command-line tools: typed on a terminal without echo,
// or, for scripts, from a file or an environment variable. Never taken as a
// command-line argument, which other users of the machine can read.

import { readFile } from "node:fs/promises";
import { UsageError } from "./cli.js";

/** The environment variable a script gives the bank account's password in. */
export const BANK_PASSWORD_ENV = "NETPURSE_BANK_PASSWORD";

/** Asks on the terminal without echoing what is typed; Ctrl-C cancels. */
export function askSecret(question: string): Promise<string> {
  const input = process.stdin;
  if (!input.isTTY) return Promise.reject(new UsageError("no terminal to ask the password on"));
  process.stderr.write(question);
  input.setRawMode(true);
  input.setEncoding("utf8");
  input.resume();
  return new Promise((resolve, reject) => {
    let typed = "";
    const finish = (e?: Error) => {
      input.off("data", onData);
      input.setRawMode(false);
      input.pause();
      process.stderr.write("\n");
      if (e) reject(e);
      else resolve(typed);
    };
    const onData = (chunk: string) => {
      for (const ch of chunk) {
        if (ch === "\r" || ch === "\n" || ch === "\u0004") return finish();
        if (ch === "\u0003") return finish(new UsageError("cancelled"));
        if (ch === "\u007f" || ch === "\b") typed = [...typed].slice(0, -1).join("");
        else if (ch >= " ") typed += ch;
      }
    };
    input.on("data", onData);
  });
}

/** The first line of a password file (a trailing newline is not part of the password). */
export async function readPasswordFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new UsageError(`cannot read the password file ${path}: ${(e as Error).message}`);
  }
  return text.split(/\r?\n/, 1)[0] ?? "";
}

/**
 * A password from, in order: `file` (--password-file), $NETPURSE_BANK_PASSWORD,
 * or the terminal (asked twice when `confirm`, as when setting one).
 */
export async function bankPassword(o: { file?: string; prompt: string; confirm?: boolean }): Promise<string> {
  if (o.file !== undefined) return readPasswordFile(o.file);
  const fromEnv = process.env[BANK_PASSWORD_ENV];
  if (fromEnv) return fromEnv;
  if (!process.stdin.isTTY)
    throw new UsageError(`no terminal to ask the bank password on: set ${BANK_PASSWORD_ENV} (or give --password-file FILE where the command takes it)`);
  const first = await askSecret(o.prompt);
  if (o.confirm && (await askSecret("the same again: ")) !== first) throw new UsageError("the two passwords differ; nothing was changed");
  return first;
}
