// Random bytes for the many short values a purchase makes (AES-GCM nonces,
// tokens, challenges): drawn from a block filled by the CSPRNG at once, as
// Node does for randomUUID, rather than one call into OpenSSL for each
// dozen bytes. Every byte is handed out once.

import { randomBytes } from "node:crypto";

const BLOCK = 4096;
/** Longer requests go to the CSPRNG directly. */
const POOLED_UP_TO = 64;

let block = Buffer.alloc(0);
let used = 0;

/** `n` fresh random bytes (a copy the caller owns). */
export function freshBytes(n: number): Buffer {
  if (n > POOLED_UP_TO) return randomBytes(n);
  if (used + n > block.length) {
    block = randomBytes(BLOCK);
    used = 0;
  }
  const out = Buffer.from(block.subarray(used, used + n));
  block.fill(0, used, used + n); // nothing handed out stays behind in the block
  used += n;
  return out;
}
