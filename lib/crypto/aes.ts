import { createCipheriv, timingSafeEqual } from "node:crypto";

/** One AES-128 block encryption (ECB, no padding): the primitive of CMAC and of key diversification. */
export function aesEncryptBlock(key: Uint8Array, block: Uint8Array): Buffer {
  if (key.length !== 16) throw new RangeError(`AES-128 key must be 16 bytes, got ${key.length}`);
  if (block.length !== 16) throw new RangeError(`AES block must be 16 bytes, got ${block.length}`);
  const cipher = createCipheriv("aes-128-ecb", key, null);
  cipher.setAutoPadding(false);
  return Buffer.concat([cipher.update(block), cipher.final()]);
}

/** Compares two MACs in constant time; different lengths compare unequal. */
export function macEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.length > 0 && timingSafeEqual(a, b);
}
