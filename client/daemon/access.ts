// Who may use the client daemon: its cardholder, and no one else on the
// machine. By default it serves on a Unix socket in a folder only the
// cardholder may enter (mode 0700), so the kernel turns every other user
// away before a byte is read. A TCP listener on loopback is opt-in; every
// call on it must carry a token kept in a file only the cardholder may read
// (mode 0600), since any local process can open a loopback port.

import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { lstatSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { Status, type CallContext, type ServerMiddleware, type ServerMiddlewareCall } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { bearerTokenOf } from "../../lib/grpc/server.js";
import type { Logger } from "../../lib/log.js";

/** Where the daemon whose folder is `dir` (DATA/client) keeps its socket and its token. */
export function daemonPaths(dir: string) {
  return {
    /** The Unix socket, in a folder of its own (mode 0700). */
    socket: join(dir, "run", "daemon.sock"),
    /** The token every call over TCP must carry (mode 0600), made when the daemon first listens on TCP. */
    token: join(dir, "daemon.token"),
  };
}

const uid = () => process.getuid?.() ?? 0;
const mode = (m: number) => `0${(m & 0o777).toString(8)}`;

/**
 * Checks every folder above `folder` up to the root, as OpenSSH checks the
 * path to its keys: each must be the caller's or root's, and writable by no
 * one else unless it is root's with the sticky bit (as /tmp is). Otherwise
 * whoever may write there could rename the socket's folder away and put a
 * socket of their own in its place, and be answered by the cardholder's
 * programs: their bank tokens, their approvals.
 */
export function checkFoldersAbove(folder: string): void {
  for (let dir = dirname(resolve(folder)); ; dir = dirname(dir)) {
    const st = statSync(dir);
    if (st.uid !== uid() && st.uid !== 0) {
      throw new Error(
        `${dir}, a folder above the daemon's socket, belongs to uid ${st.uid}: its owner could put a socket of their own in place of the daemon's. Keep the data folder (--data) in folders of your own`,
      );
    }
    const shared = st.mode & 0o022;
    const sticky = st.uid === 0 && (st.mode & 0o1000) !== 0;
    if (shared && !sticky) {
      throw new Error(
        `${dir}, a folder above the daemon's socket, is mode ${mode(st.mode)}: other users could put a socket of their own in place of the daemon's. Run 'chmod go-w ${dir}', or keep the data folder (--data) elsewhere`,
      );
    }
    if (dirname(dir) === dir) return;
  }
}

/**
 * What a program of the cardholder's checks before it speaks to the daemon
 * at `socket`: the socket and its folder are the caller's own and closed to
 * others, and so is the path to them, so the answer comes from the
 * cardholder's daemon and no one else's.
 */
export function checkDaemonSocket(socket: string): void {
  const folder = dirname(socket);
  checkFoldersAbove(folder);
  for (const [path, what] of [
    [folder, "the daemon's socket folder"],
    [socket, "the daemon's socket"],
  ] as const) {
    let st;
    try {
      st = lstatSync(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
      throw new Error(`no client daemon at ${socket}: start it ('netpurse daemon', or 'npm start'), or name its socket with --daemon unix:PATH`, {
        cause: e,
      });
    }
    if (st.uid !== uid()) throw new Error(`${path}, ${what}, belongs to uid ${st.uid}, not to you: it is not your daemon; refusing to speak to it`);
    if (path === folder && (st.mode & 0o077 || !st.isDirectory())) {
      throw new Error(
        `${path}, ${what}, is ${st.isDirectory() ? `mode ${mode(st.mode)}` : "not a folder"}: others could have put the socket there; refusing to speak to it`,
      );
    }
  }
}

/**
 * Makes the folder of the daemon's socket, mode 0700, or checks the one
 * there: a folder of the cardholder's own that no one else may enter. One
 * that others may enter, or that belongs to someone else, is refused: whoever
 * reaches the socket can pay with the card.
 */
export function ensureSocketFolder(folder: string): void {
  mkdirSync(dirname(folder), { recursive: true, mode: 0o700 });
  checkFoldersAbove(folder);
  try {
    mkdirSync(folder, { mode: 0o700 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
  }
  const st = lstatSync(folder);
  if (!st.isDirectory()) {
    throw new Error(
      `${folder} is ${st.isSymbolicLink() ? "a symbolic link" : "not a folder"}: the daemon's socket must sit in a folder of its own. Remove it and start again; the daemon makes the folder, mode 0700`,
    );
  }
  if (st.uid !== uid()) {
    throw new Error(
      `${folder} belongs to uid ${st.uid}, not to you (uid ${uid()}): its owner could reach the card through the daemon's socket. Remove it (as its owner or root) and start again; the daemon makes it anew, mode 0700`,
    );
  }
  if (st.mode & 0o077) {
    throw new Error(
      `${folder} is mode ${mode(st.mode)}: other users of this machine could reach the card through the daemon's socket in it. Run 'chmod 700 ${folder}' (or remove the folder) and start again`,
    );
  }
}

/** A token: what the daemon makes (32 random bytes, base64url), or any 32 to 256 such characters. */
const TOKEN = /^[A-Za-z0-9_-]{32,256}$/;

/** The daemon's token from `file`, made (mode 0600) if there is none yet. */
export function ensureDaemonToken(file: string): string {
  mkdirSync(dirname(file), { recursive: true });
  const token = randomBytes(32).toString("base64url");
  try {
    // "wx": made here or not at all, so two daemons starting at once cannot each write a different token.
    writeFileSync(file, `${token}\n`, { flag: "wx", mode: 0o600 });
    return token;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "EEXIST") throw e;
  }
  return readDaemonToken(file);
}

/** The daemon's token from `file`, which must be the caller's own and readable by no one else. */
export function readDaemonToken(file: string): string {
  let st;
  try {
    st = lstatSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    throw new Error(`no token file ${file}: the daemon makes it when started with --listen-tcp; start it so, or name the file with --daemon-token`, {
      cause: e,
    });
  }
  const renew = `remove it, and the daemon makes a new token at its next start with --listen-tcp`;
  if (!st.isFile()) throw new Error(`${file} is not a file; ${renew}`);
  if (st.uid !== uid()) throw new Error(`${file} belongs to uid ${st.uid}, not to you (uid ${uid()}); ${renew}`);
  if (st.mode & 0o077) {
    throw new Error(`${file} is mode ${mode(st.mode)}: other users of this machine could read the token. Its token may be known: ${renew}`);
  }
  if (st.size > 1024) throw new Error(`${file} is ${st.size} bytes, too long for a token; ${renew}`);
  const token = readFileSync(file, "utf8").trim();
  if (!TOKEN.test(token)) throw new Error(`${file} holds no token (32 to 256 letters, digits, '-' or '_'); ${renew}`);
  return token;
}

const digest = (s: string) => createHash("sha256").update(s).digest();

/**
 * Every call over the daemon's TCP listener must carry `authorization:
 * Bearer TOKEN` with the daemon's token: UNAUTHENTICATED (reason
 * UNAUTHENTICATED) otherwise, logged without what the caller sent.
 */
export function tokenGuard(token: string, log: Logger): ServerMiddleware {
  const expected = digest(token);
  return async function* <Req, Res>(call: ServerMiddlewareCall<Req, Res>, context: CallContext) {
    const header = context.metadata.get("authorization");
    const given = bearerTokenOf(context);
    // Digests of equal length, so that the comparison takes the same time whatever the caller sent.
    if (given === undefined || !timingSafeEqual(digest(given), expected)) {
      log.warn("refused a call over TCP without the daemon's token", {
        method: call.method.path,
        peer: context.peer,
        authorization: header === undefined ? "none" : "wrong",
      });
      throw new NetpurseError(
        Status.UNAUTHENTICATED,
        ErrorReason.ERROR_REASON_UNAUTHENTICATED,
        `${call.method.path} over TCP needs the daemon's token: send 'authorization: Bearer TOKEN' with the token of the daemon's token file (DATA/client/daemon.token unless started with --token; 'netpurse --daemon HOST:PORT' reads it), or use the daemon's Unix socket`,
      );
    }
    return yield* call.next(call.request, context);
  };
}
