// AES-CMAC as specified by RFC 4493 (NIST SP 800-38B), from @noble/ciphers
// (audited). Node's crypto has no CMAC. test/unit/crypto.test.ts checks it
// against the RFC's vectors.

import { cmac } from "@noble/ciphers/aes.js";

/** AES-128-CMAC of a message: the full 16-byte tag. */
export function aesCmac(key: Uint8Array, message: Uint8Array): Buffer {
  // The card protocols use AES-128 only; a key of another size is a mistake, not AES-192/256.
  if (key.length !== 16) throw new RangeError(`AES-128 key must be 16 bytes, got ${key.length}`);
  return Buffer.from(cmac(message, key));
}

/** The 8-byte truncated AES-CMAC every card-protocol signature uses (see docs/protocol.md, "Keys"). */
export function mac8(key: Uint8Array, message: Uint8Array): Buffer {
  return aesCmac(key, message).subarray(0, 8);
}
