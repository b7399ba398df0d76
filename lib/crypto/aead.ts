import { createCipheriv, createDecipheriv, hkdfSync } from "node:crypto";
import { freshBytes } from "./random.js";

/** AES-256-GCM with a fresh 12-byte nonce; the 16-byte tag follows the ciphertext. */
export function sealAesGcm(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): { iv: Buffer; ciphertext: Buffer } {
  if (key.length !== 32) throw new RangeError("AES-256-GCM needs a 32-byte key");
  const iv = freshBytes(12);
  const c = createCipheriv("aes-256-gcm", key, iv);
  c.setAAD(aad);
  const body = Buffer.concat([c.update(plaintext), c.final()]);
  return { iv, ciphertext: Buffer.concat([body, c.getAuthTag()]) };
}

/** Opens what sealAesGcm made; undefined when the key, the associated data or any bit is wrong. */
export function openAesGcm(key: Uint8Array, iv: Uint8Array, ciphertext: Uint8Array, aad: Uint8Array): Buffer | undefined {
  if (key.length !== 32 || iv.length !== 12 || ciphertext.length < 16) return undefined;
  const d = createDecipheriv("aes-256-gcm", key, iv);
  d.setAAD(aad);
  d.setAuthTag(ciphertext.subarray(ciphertext.length - 16));
  try {
    return Buffer.concat([d.update(ciphertext.subarray(0, ciphertext.length - 16)), d.final()]);
  } catch {
    return undefined;
  }
}

/** HKDF-SHA-256 (RFC 5869) into a 32-byte key. */
export function hkdf32(ikm: Uint8Array, salt: Uint8Array, info: Uint8Array): Buffer {
  return Buffer.from(hkdfSync("sha256", ikm, salt, info, 32));
}
