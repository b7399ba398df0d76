// List pagination as AIP-158 has it: page_size with a default and a
// maximum (larger values taken as the maximum, negative refused), and an
// opaque page_token that names the list, the request it belongs to (the
// scope: an account, a card) and where the next page starts.
//
// Token: base64url (no padding) of the JSON {v, l, s, p} (version, list,
// scope, position) followed by the first 8 bytes of its SHA-256. The check
// value makes a garbled or hand-edited token fail to decode; the list and
// scope inside make a token of another list or request fail. It is not a
// secret and not a security boundary: a client can read its own position
// from it, and nothing here authenticates the caller (issue #10).

import { createHash } from "node:crypto";
import { invalidField } from "./errors.js";

const VERSION = 1;
const CHECK_BYTES = 8;

export interface PageSizeRule {
  /** Taken when page_size is 0. */
  fallback: number;
  /** The most a page holds; larger page_size values are taken as this. */
  max: number;
}

/** The page size to use for a request's page_size, by the rule; negative is INVALID_ARGUMENT naming page_size. */
export function pageSize(requested: number, rule: PageSizeRule): number {
  if (!Number.isInteger(requested) || requested < 0) throw invalidField("page_size", `must be 0 (the default, ${rule.fallback}) or more, got ${requested}`);
  return requested === 0 ? rule.fallback : Math.min(requested, rule.max);
}

const check = (payload: Buffer) => createHash("sha256").update("netpurse page token\0").update(payload).digest().subarray(0, CHECK_BYTES);

/** The next_page_token for `position` in `list` of `scope`. */
export function pageToken(list: string, scope: string, position: unknown): string {
  const payload = Buffer.from(JSON.stringify({ v: VERSION, l: list, s: scope, p: position }), "utf8");
  return Buffer.concat([payload, check(payload)]).toString("base64url");
}

const undecodable = (why: string) =>
  invalidField("page_token", `does not decode (${why}): pass the next_page_token of the previous page unchanged, or none for the first page`);

/**
 * The position a request's page_token names; undefined for the empty token
 * (the first page). INVALID_ARGUMENT naming page_token when the token does
 * not decode, or was made for another list or scope.
 */
export function pagePosition<P>(token: string, list: string, scope: string, isPosition: (p: unknown) => p is P): P | undefined {
  if (token === "") return undefined;
  if (!/^[A-Za-z0-9_-]+$/.test(token)) throw undecodable("not base64url");
  const raw = Buffer.from(token, "base64url");
  if (raw.toString("base64url") !== token || raw.length <= CHECK_BYTES) throw undecodable("not a page token");
  const payload = raw.subarray(0, raw.length - CHECK_BYTES);
  if (!check(payload).equals(raw.subarray(raw.length - CHECK_BYTES))) throw undecodable("its check value does not match: garbled or altered");
  let t: unknown;
  try {
    t = JSON.parse(payload.toString("utf8"));
  } catch {
    throw undecodable("not a page token");
  }
  if (typeof t !== "object" || t === null) throw undecodable("not a page token");
  const { v, l, s, p } = t as Record<string, unknown>;
  if (v !== VERSION || typeof l !== "string" || typeof s !== "string") throw undecodable("unknown version");
  if (l !== list || s !== scope) throw invalidField("page_token", `was made for the ${l} of ${s}, not for the ${list} of ${scope}`);
  if (!isPosition(p)) throw undecodable("no valid position");
  return p;
}

/** A positive integer that fits a JavaScript number exactly. */
export const isPositiveInt = (x: unknown): x is number => typeof x === "number" && Number.isSafeInteger(x) && x > 0;
