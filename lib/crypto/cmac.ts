import { aesEncryptBlock } from "./aes.js";

// AES-CMAC as specified by RFC 4493 (NIST SP 800-38B). Node's crypto has no
// CMAC, so it is built here on one-block AES; test/unit/crypto.test.ts checks
// it against the RFC's vectors.

const RB = 0x87;

/** Doubles a 128-bit value in GF(2^128): shift left by one, xor Rb when the top bit fell out. */
function double(block: Buffer): Buffer {
  const out = Buffer.alloc(16);
  let carry = 0;
  for (let i = 15; i >= 0; i--) {
    const b = block[i]!;
    out[i] = ((b << 1) | carry) & 0xff;
    carry = b >> 7;
  }
  if (carry) out[15] = out[15]! ^ RB;
  return out;
}

/** The two CMAC subkeys K1 and K2 for a key. */
export function cmacSubkeys(key: Uint8Array): [Buffer, Buffer] {
  const l = aesEncryptBlock(key, Buffer.alloc(16));
  const k1 = double(l);
  return [k1, double(k1)];
}

/** AES-CMAC of a message: the full 16-byte tag. */
export function aesCmac(key: Uint8Array, message: Uint8Array): Buffer {
  const [k1, k2] = cmacSubkeys(key);
  const blocks = Math.max(1, Math.ceil(message.length / 16));
  const complete = message.length > 0 && message.length % 16 === 0;
  const last = Buffer.alloc(16);
  const tail = message.subarray((blocks - 1) * 16);
  tail.forEach((b, i) => (last[i] = b));
  if (complete) {
    for (let i = 0; i < 16; i++) last[i] = last[i]! ^ k1[i]!;
  } else {
    last[tail.length] = 0x80;
    for (let i = 0; i < 16; i++) last[i] = last[i]! ^ k2[i]!;
  }
  let x: Buffer = Buffer.alloc(16);
  const y = Buffer.alloc(16);
  for (let b = 0; b < blocks - 1; b++) {
    for (let i = 0; i < 16; i++) y[i] = x[i]! ^ message[b * 16 + i]!;
    x = aesEncryptBlock(key, y);
  }
  for (let i = 0; i < 16; i++) y[i] = x[i]! ^ last[i]!;
  return aesEncryptBlock(key, y);
}

/** The 8-byte truncated AES-CMAC every card-protocol signature uses (DESIGN.md §3). */
export function mac8(key: Uint8Array, message: Uint8Array): Buffer {
  return aesCmac(key, message).subarray(0, 8);
}
