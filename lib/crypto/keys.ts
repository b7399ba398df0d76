import { aesEncryptBlock } from "./aes.js";

/** The purposes that each have their own issuer master key (docs/protocol.md, "Keys"). */
export const KEY_PURPOSES = ["purchase", "load", "authentication"] as const;
export type KeyPurpose = (typeof KEY_PURPOSES)[number];

/**
 * The 16-byte diversification block of an 8-byte identifier: the identifier
 * followed by its complement, so that no two identifiers share a block half.
 */
export function diversificationBlock(id: Uint8Array): Buffer {
  if (id.length !== 8) throw new RangeError(`diversification needs an 8-byte identifier, got ${id.length}`);
  const block = Buffer.alloc(16);
  for (let i = 0; i < 8; i++) {
    block[i] = id[i]!;
    block[8 + i] = ~id[i]! & 0xff;
  }
  return block;
}

/**
 * A card's key for one purpose: K_card = AES-ECB(MK_purpose[version], D(purse id)).
 * A single-block encryption, so a PKCS#11 token gives the same key with
 * CKM_AES_ECB_ENCRYPT_DATA without releasing the master key.
 */
export function diversifyCardKey(masterKey: Uint8Array, purseId: Uint8Array): Buffer {
  return aesEncryptBlock(masterKey, diversificationBlock(purseId));
}

/** What both sides of one card session know once the security module has answered. */
export interface SessionData {
  cardCounter: number;
  securityModuleId: Uint8Array; // 4 bytes
  securityModuleCounter: number;
  challenge: Uint8Array; // 8 bytes
}

/**
 * The per-transaction session key: one AES block under the card key over
 * card counter (4) || security module id (4) || security module counter (4) ||
 * the first 4 bytes of the card challenge. The whole challenge is inside
 * every signature as well, so a command made for one session cannot verify
 * in another.
 */
export function deriveSessionKey(cardKey: Uint8Array, s: SessionData): Buffer {
  return aesEncryptBlock(cardKey, sessionBlock(s));
}

/** The block the session key encrypts under the card key; a PKCS#11 token derives from it as from the diversification block. */
export function sessionBlock(s: SessionData): Buffer {
  if (s.securityModuleId.length !== 4) throw new RangeError("security module id must be 4 bytes");
  if (s.challenge.length !== 8) throw new RangeError("card challenge must be 8 bytes");
  const block = Buffer.alloc(16);
  block.writeUInt32BE(s.cardCounter >>> 0, 0);
  Buffer.from(s.securityModuleId).copy(block, 4);
  block.writeUInt32BE(s.securityModuleCounter >>> 0, 8);
  Buffer.from(s.challenge).copy(block, 12, 0, 4);
  return block;
}
