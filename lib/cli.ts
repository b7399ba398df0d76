// Small helpers shared by netpurse's command-line tools: --help on every
// command, clear errors, no stack traces for mistakes a user can fix.

import { parseArgs, type ParseArgsConfig } from "node:util";
import { Status } from "nice-grpc";
import { join } from "node:path";
import { dataDir } from "./config.js";
import { reasonName, reasonOf } from "./grpc/errors.js";
import type { Kind } from "./pki/identity.js";
import { pkiDirOf, Security, type ChannelSecurity } from "./pki/security.js";

export class UsageError extends Error {}

export interface Command {
  name: string;
  summary: string;
  usage: string;
  options: NonNullable<ParseArgsConfig["options"]>;
  run(values: Record<string, string | boolean | (string | boolean)[] | undefined>, positionals: string[]): Promise<void>;
}

function helpText(program: string, c: Command): string {
  return `Usage: ${program} ${c.name} ${c.usage}\n\n${c.summary}\n`;
}

/**
 * Ends the tool quietly when its reader stops reading (`netpurse card | head -1`): exit status 141,
 * 128 + SIGPIPE, as the shell reports for any program a closed pipe ends, so that `set -o pipefail`
 * scripts still see that the output was cut short. Whatever the tool asked a service to do goes on there.
 */
function endOnClosedStdout(): void {
  process.stdout.on("error", (e: NodeJS.ErrnoException) => {
    if (e.code === "EPIPE") process.exit(141);
    throw e;
  });
}

/** Runs one of several subcommands; `--help` works at both levels. */
export async function runCommands(program: string, description: string, commands: Command[], argv = process.argv.slice(2)): Promise<void> {
  endOnClosedStdout();
  const [name, ...rest] = argv;
  const list = () =>
    `${description}\n\nUsage: ${program} <command> [options]\n\nCommands:\n` +
    commands.map((c) => `  ${c.name.padEnd(20)} ${c.summary.split("\n")[0]}`).join("\n") +
    `\n\nRun '${program} <command> --help' for a command's options.\n`;
  if (!name || name === "--help" || name === "-h" || name === "help") {
    process.stdout.write(list());
    return;
  }
  const c = commands.find((x) => x.name === name);
  if (!c) {
    process.stderr.write(`${program}: unknown command '${name}'\n\n${list()}`);
    process.exitCode = 2;
    return;
  }
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(helpText(program, c));
    return;
  }
  try {
    const { values, positionals } = parseArgs({ args: rest, options: c.options, allowPositionals: true, strict: true });
    await c.run(values, positionals);
  } catch (e) {
    const err = e as Error & { code?: unknown };
    if (e instanceof UsageError || (typeof err.code === "string" && err.code.startsWith("ERR_PARSE_ARGS"))) {
      process.stderr.write(`${program} ${c.name}: ${err.message}\n\n${helpText(program, c)}`);
      process.exitCode = 2;
      return;
    }
    // A mistake or an unreachable service: say what happened, no stack trace.
    process.stderr.write(`${program} ${c.name}: ${describeError(e)}\n`);
    if (process.env.NETPURSE_DEBUG) process.stderr.write(`${(e as Error).stack}\n`);
    process.exitCode = 1;
  }
}

/** One line for a person: gRPC errors with their code and reason. */
export function describeError(e: unknown): string {
  const err = e as { code?: Status; details?: string; message?: string };
  if (typeof err.code === "number" && typeof err.details === "string") {
    const r = reasonOf(e);
    const reason = r ? ` [${reasonName(r)}]` : "";
    const hint =
      err.code === Status.UNAVAILABLE && /No connection|ECONNREFUSED|connect/i.test(err.details)
        ? " (is the service running? start the network with 'npm start'. A network started with --insecure needs --insecure here too; one with TLS, not)"
        : "";
    return `${Status[err.code]}${reason}: ${err.details}${hint}`;
  }
  return err.message ?? String(e);
}

/** Reads a string option or a default. */
export function str(v: unknown, fallback?: string): string {
  if (typeof v === "string") return v;
  if (fallback !== undefined) return fallback;
  throw new UsageError("missing a required option");
}

export function int(v: unknown, fallback: number, name: string): number {
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n)) throw new UsageError(`--${name} must be an integer, got ${JSON.stringify(v)}`);
  return n;
}

/** Options of a command that reaches a server: where the installation's certificates are, or --insecure. */
export const CONNECT_OPTIONS = { data: { type: "string" }, ca: { type: "string" }, insecure: { type: "boolean" } } as const;
export const CONNECT_USAGE = "[--ca FILE (default DATA/pki/ca.crt)] [--insecure]";

/** A channel's security for a public endpoint: the server must prove `kind` with a certificate of the installation's CA. */
export async function publicChannel(v: Record<string, unknown>, kind: Kind): Promise<ChannelSecurity> {
  if (v.insecure === true) return { insecure: true };
  const ca = str(v.ca, join(pkiDirOf(dataDir(v.data as string | undefined)), "ca.crt"));
  return (await Security.forCardholder(ca)).channel({ kind });
}

/** A channel's security as an operator inside the operator's network: mutual TLS with the operator's certificate (DATA/pki/operator/ID). */
export async function operatorChannel(v: Record<string, unknown>, kind: Kind): Promise<ChannelSecurity> {
  if (v.insecure === true) return { insecure: true };
  const pki = typeof v.pki === "string" ? v.pki : pkiDirOf(dataDir(v.data as string | undefined));
  return (await Security.forService(pki, { kind: "operator", id: str(v.as, "operator") })).channel({ kind });
}
