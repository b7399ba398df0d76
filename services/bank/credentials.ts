// The account holder's credentials at the demo bank: passwords kept only as
// salted scrypt hashes (memory-hard, so guessing costs an attacker memory as
// well as time), and access tokens kept only as their SHA-256 (a token is 32
// random bytes, so a fast hash is enough; a copy of bank.db acts for no one).

import { createHash, randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from "node:crypto";

/** scrypt's cost: N = 2^ln, block size r, parallelism p. */
export interface ScryptCost {
  ln: number;
  r: number;
  p: number;
}

/**
 * The cost of every password set by the bank's tools: N = 2^15, r = 8, p = 3,
 * one of OWASP's equivalent scrypt settings (32 MiB and about 0.3 s per hash
 * on one core). Memory rather than time: 32 MiB at once, not 128, so that the
 * four hashes the thread pool runs at once stay within reason.
 */
export const PASSWORD_COST: ScryptCost = { ln: 15, r: 8, p: 3 };

/** Above these, a stored hash is refused rather than computed: a hash string must not make the bank spend minutes or gigabytes. */
const MAX_COST: ScryptCost = { ln: 20, r: 16, p: 16 };

const KEY_BYTES = 32;
const SALT_BYTES = 16;

/** Passwords are 8..1024 bytes when set; a login may send 1..1024 (a shorter one simply does not match). */
export const MIN_PASSWORD_BYTES = 8;
export const MAX_PASSWORD_BYTES = 1024;

function derive(password: string, salt: Buffer, cost: ScryptCost): Promise<Buffer> {
  const N = 2 ** cost.ln;
  const options: ScryptOptions = { N, r: cost.r, p: cost.p, maxmem: 128 * N * cost.r * 2 };
  return new Promise((resolve, reject) => scrypt(password.normalize("NFC"), salt, KEY_BYTES, options, (e, key) => (e ? reject(e) : resolve(key))));
}

/** Why a password cannot be set, or undefined when it can. */
export function passwordProblem(password: string): string | undefined {
  const bytes = Buffer.byteLength(password, "utf8");
  if (bytes < MIN_PASSWORD_BYTES) return `a password needs at least ${MIN_PASSWORD_BYTES} characters`;
  if (bytes > MAX_PASSWORD_BYTES) return `a password may have at most ${MAX_PASSWORD_BYTES} bytes`;
  return undefined;
}

/** The stored form of a password: `$scrypt$ln=15,r=8,p=3$<salt>$<hash>` (PHC string format, base64 without padding). */
export async function hashPassword(password: string, cost: ScryptCost = PASSWORD_COST): Promise<string> {
  const salt = randomBytes(SALT_BYTES);
  const key = await derive(password, salt, cost);
  return `$scrypt$ln=${cost.ln},r=${cost.r},p=${cost.p}$${salt.toString("base64").replace(/=+$/, "")}$${key.toString("base64").replace(/=+$/, "")}`;
}

function parse(stored: string): { cost: ScryptCost; salt: Buffer; key: Buffer } | undefined {
  const m = /^\$scrypt\$ln=(\d+),r=(\d+),p=(\d+)\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$/.exec(stored);
  const [, ln, r, p, salt, hash] = m ?? [];
  if (!ln || !r || !p || !salt || !hash) return undefined;
  const cost = { ln: Number(ln), r: Number(r), p: Number(p) };
  if (cost.ln < 1 || cost.r < 1 || cost.p < 1 || cost.ln > MAX_COST.ln || cost.r > MAX_COST.r || cost.p > MAX_COST.p) return undefined;
  const key = Buffer.from(hash, "base64");
  return key.length === KEY_BYTES ? { cost, salt: Buffer.from(salt, "base64"), key } : undefined;
}

/** A hash of a password nobody knows, checked when an account has none, so that a login takes as long whether the account exists or not. */
let decoy: Promise<string> | undefined;

/**
 * Whether `password` is the one `stored` was made from, compared in constant
 * time. Without a stored hash (no such account, or no password set yet) it
 * still spends one hash's time, and answers false.
 */
export async function verifyPassword(password: string, stored: string | undefined): Promise<boolean> {
  const parsed = stored === undefined ? undefined : parse(stored);
  if (!parsed) {
    decoy ??= hashPassword(randomBytes(16).toString("hex"));
    const d = parse(await decoy);
    if (d) await derive(password, d.salt, d.cost);
    return false;
  }
  return timingSafeEqual(await derive(password, parsed.salt, parsed.cost), parsed.key);
}

/** A fresh access token: 32 random bytes, base64url. */
export const newAccessToken = () => randomBytes(32).toString("base64url");

/** What the bank keeps of an access token. */
export const accessTokenHash = (token: string) => createHash("sha256").update(token, "utf8").digest("hex");

/** The shape of a token this bank issues; anything else is refused before any lookup. */
export const ACCESS_TOKEN_SHAPE = /^[A-Za-z0-9_-]{43}$/;
