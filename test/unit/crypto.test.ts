import { expect } from "chai";
import { aesCmac, mac8 } from "../../lib/crypto/cmac.js";
import { deriveSessionKey, diversificationBlock, diversifyCardKey } from "../../lib/crypto/keys.js";
import { aesEncryptBlock } from "../../lib/crypto/aes.js";
import { hkdf32 } from "../../lib/crypto/aead.js";
import { transactionKey, transactionKeyInfo } from "../../lib/protocol/encryption-layer.js";
import { freshBytes } from "../../lib/crypto/random.js";

const hex = (s: string) => Buffer.from(s.replace(/\s+/g, ""), "hex");

describe("AES-CMAC (RFC 4493 test vectors)", () => {
  const K = hex("2b7e1516 28aed2a6 abf71588 09cf4f3c");
  const M = hex(
    "6bc1bee2 2e409f96 e93d7e11 7393172a ae2d8a57 1e03ac9c 9eb76fac 45af8e51 30c81c46 a35ce411 e5fbc119 1a0a52ef f69f2445 df4f9b17 ad2b417b e66c3710",
  );

  const cases: [number, string][] = [
    [0, "bb1d6929e95937287fa37d129b756746"],
    [16, "070a16b46b4d4144f79bdd9dd04a287c"],
    [40, "dfa66747de9ae63030ca32611497c827"],
    [64, "51f0bebf7e3b9d92fc49741779363cfe"],
  ];
  for (const [len, tag] of cases) {
    it(`example with a ${len}-byte message`, () => {
      expect(aesCmac(K, M.subarray(0, len)).toString("hex")).to.equal(tag);
    });
  }

  it("truncates to 8 bytes for card signatures", () => {
    expect(mac8(K, M.subarray(0, 16)).toString("hex")).to.equal("070a16b46b4d4144");
  });

  it("refuses keys that are not 16 bytes", () => {
    expect(() => aesCmac(Buffer.alloc(15), Buffer.alloc(0))).to.throw(RangeError);
  });
});

describe("key diversification", () => {
  const mk = hex("000102030405060708090a0b0c0d0e0f");
  const purse = hex("0123456789abcdef");

  it("builds the block from the purse id and its complement", () => {
    expect(diversificationBlock(purse).toString("hex")).to.equal("0123456789abcdeffedcba9876543210");
  });

  it("is one AES block encryption under the master key (what CKM_AES_ECB_ENCRYPT_DATA computes)", () => {
    expect(diversifyCardKey(mk, purse).equals(aesEncryptBlock(mk, hex("0123456789abcdeffedcba9876543210")))).to.equal(true);
  });

  it("gives different cards different keys", () => {
    expect(diversifyCardKey(mk, purse).equals(diversifyCardKey(mk, hex("0123456789abcdee")))).to.equal(false);
  });

  it("derives a session key that changes with every input", () => {
    const base = { cardCounter: 7, securityModuleId: hex("a1b2c3d4"), securityModuleCounter: 42, challenge: hex("1122334455667788") };
    const k = diversifyCardKey(mk, purse);
    const sk = deriveSessionKey(k, base);
    expect(sk).to.have.length(16);
    expect(deriveSessionKey(k, { ...base, cardCounter: 8 }).equals(sk)).to.equal(false);
    expect(deriveSessionKey(k, { ...base, securityModuleId: hex("a1b2c3d5") }).equals(sk)).to.equal(false);
    expect(deriveSessionKey(k, { ...base, securityModuleCounter: 43 }).equals(sk)).to.equal(false);
    expect(deriveSessionKey(k, { ...base, challenge: hex("1122334555667788") }).equals(sk)).to.equal(false);
  });
});

describe("transaction keys, kept for a purchase's later steps", () => {
  const id = "0b7c8f2e-1d3a-4c5b-9e6f-7a8b9c0d1e2f";
  const nonce = Buffer.alloc(16, 7);
  const fresh = (key: Buffer, party: string, n: Buffer) => hkdf32(key, n, transactionKeyInfo(party, id));

  it("gives the same key as a fresh derivation, and another for another shared key, party or nonce", () => {
    const a = Buffer.alloc(32, 1);
    const b = Buffer.alloc(32, 2);
    const first = transactionKey(a, "shop", id, nonce);
    expect(transactionKey(a, "shop", id, nonce)).to.deep.equal(first);
    expect(first).to.deep.equal(fresh(a, "shop", nonce));
    expect(transactionKey(b, "shop", id, nonce))
      .to.deep.equal(fresh(b, "shop", nonce))
      .and.not.deep.equal(first);
    expect(transactionKey(a, "other-shop", id, nonce))
      .to.deep.equal(fresh(a, "other-shop", nonce))
      .and.not.deep.equal(first);
    const n2 = Buffer.alloc(16, 8);
    expect(transactionKey(a, "shop", id, n2))
      .to.deep.equal(fresh(a, "shop", n2))
      .and.not.deep.equal(first);
  });

  it("hands out copies: a caller that overwrites its key does not change the next caller's", () => {
    const k = Buffer.alloc(32, 3);
    transactionKey(k, "shop", id, nonce).fill(0);
    expect(transactionKey(k, "shop", id, nonce)).to.deep.equal(fresh(k, "shop", nonce));
  });
});

describe("fresh random bytes for nonces and tokens", () => {
  it("hands out each byte once: 20,000 nonces all differ, and a caller's change does not reach the next", () => {
    const seen = new Set<string>();
    for (let i = 0; i < 20_000; i++) {
      const b = freshBytes(12);
      expect(b).to.have.length(12);
      seen.add(b.toString("hex"));
      b.fill(0);
    }
    expect(seen.size).to.equal(20_000);
  });

  it("spreads its bytes evenly (no byte value more than 1.5 times as frequent as expected over 256 KiB)", () => {
    const counts = new Array<number>(256).fill(0);
    for (let i = 0; i < 8_192; i++) for (const v of freshBytes(32)) counts[v]!++;
    const expected = (8_192 * 32) / 256;
    expect(Math.max(...counts)).to.be.below(1.5 * expected);
    expect(Math.min(...counts)).to.be.above(0.5 * expected);
  });

  it("gives longer requests their own bytes from the CSPRNG", () => {
    const a = freshBytes(100);
    const b = freshBytes(100);
    expect(a).to.have.length(100);
    expect(a.equals(b)).to.equal(false);
  });
});
