// The card's cryptogram in its INITIALIZE FOR PURCHASE response
// (docs/apdu.md, INITIALIZE FOR PURCHASE): it verifies under the card key the
// issuer's derivation gives for the card's purse id and key version, and under
// nothing else — not another purse's key, not another key version's, not with
// one bit of the response changed. The PSAM checks it before anything else it
// decides on, and a response that fails it opens no session: nothing signed,
// no counter used, no open debit.

import { expect } from "chai";
import { randomBytes, randomUUID } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { decodeResponse, encodeCommand, SW } from "../../lib/apdu/apdu.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { macEqual } from "../../lib/crypto/aes.js";
import { diversifyCardKey } from "../../lib/crypto/keys.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { DrawAmountCommand, PSAM_AID, PSAM_CLA, PsamIns } from "../../lib/protocol/psam.js";
import {
  InitializeForPurchaseResponse,
  PURCHASE_CRYPTOGRAM_TAG,
  PurchaseCryptogramInput,
  PurseStatusByte,
  purchaseCryptogram,
} from "../../lib/protocol/purse.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { alteredInit, madeUpInit, resignedInit } from "../support/card-client.js";
import { EUR, makeCard, makeIssuer, makePsam, swOf, tempDir } from "../support/fixtures.js";

/** The issuer's purchase master key of a key version, as its keys file holds it. */
async function purchaseMaster(dir: string, version: number): Promise<Buffer> {
  const keys = JSON.parse(await readFile(Issuer.keysPath(join(dir, "issuer")), "utf8")) as { master: { purchase: Record<string, string> } };
  const hex = keys.master.purchase[String(version)];
  if (!hex) throw new Error(`no purchase master key of version ${version}`);
  return Buffer.from(hex, "hex");
}

const verifies = (key: Uint8Array, raw: Buffer): boolean => {
  const { cryptogram, ...fields } = InitializeForPurchaseResponse.decode(raw);
  return macEqual(purchaseCryptogram(key, fields), cryptogram);
};

describe("the card's cryptogram in INITIALIZE FOR PURCHASE", () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let issuer: Issuer;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
  });
  afterEach(async () => {
    await issuer.close();
    await cleanup();
  });

  async function card(o: Parameters<typeof makeCard>[2] = {}, by: Issuer = issuer) {
    const path = await makeCard(by, dir, o);
    const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(path)));
    const atr = await reader.connect();
    return { path, reader, atr };
  }

  async function psam(name = "psam") {
    const soft = await SoftwarePsam.open(await makePsam(issuer, dir, { name }));
    const driver = new PsamDriver(new InProcessTransport(soft));
    await driver.connect();
    return { soft, driver };
  }

  const draw = () => ({ amount: 100, currency: EUR, transactionRef: randomUUID(), merchantId: "shop-1" });

  it("is the CMAC under K_card = AES-ECB(MK_purchase[v], D(purse id)) over the tag P and every field before it", async () => {
    const c = await card();
    const init = await c.reader.initializeForPurchase();
    expect(init.raw).to.have.length(47);
    expect(InitializeForPurchaseResponse.offset("cryptogram")).to.equal(39);
    const key = diversifyCardKey(await purchaseMaster(dir, 1), init.parsed.purseId);
    expect(verifies(key, init.raw)).to.equal(true);
    // Exactly the documented input: the tag, then the response's first 39 bytes.
    const input = PurchaseCryptogramInput.encode({ tag: PURCHASE_CRYPTOGRAM_TAG, ...init.parsed });
    expect(input.equals(Buffer.concat([Buffer.from("P"), init.raw.subarray(0, 39)]))).to.equal(true);
    // The tag is its own: no other MAC of the card protocols starts with it.
    expect(["D", "C", "1", "2", "3", "R", "B", "I", "V", "X"]).to.not.include(PURCHASE_CRYPTOGRAM_TAG);
    // A fresh challenge each time, so a fresh cryptogram.
    const again = await c.reader.initializeForPurchase();
    expect(again.parsed.cryptogram.equals(init.parsed.cryptogram)).to.equal(false);
    expect(verifies(key, again.raw)).to.equal(true);
  });

  it("does not verify under another purse's key, nor with another purse id in the response", async () => {
    const c = await card({ purseId: "0102030405060708" });
    const init = await c.reader.initializeForPurchase();
    const master = await purchaseMaster(dir, 1);
    const other = Buffer.from("0102030405060709", "hex");
    expect(verifies(diversifyCardKey(master, other), init.raw)).to.equal(false);
    // The same answer claiming the other purse: the PSAM derives the other purse's key, which does not verify it.
    expect(verifies(diversifyCardKey(master, other), alteredInit(init.raw, { purseId: other }))).to.equal(false);
  });

  it("does not verify under another key version's key, nor with another key version in the response", async () => {
    await Issuer.createKeys(join(dir, "issuer"), 2);
    const c = await card({ keyVersion: 1 });
    const init = await c.reader.initializeForPurchase();
    const v2 = diversifyCardKey(await purchaseMaster(dir, 2), init.parsed.purseId);
    expect(verifies(v2, init.raw)).to.equal(false);
    // At a PSAM holding both versions (provisioned after version 2 exists), the answer claiming version 2 is refused.
    const both = await Issuer.open(join(dir, "issuer"));
    try {
      const soft = await SoftwarePsam.open(await makePsam(both, dir, { name: "both" }));
      expect(soft.keyVersions).to.include.members([1, 2]);
      const driver = new PsamDriver(new InProcessTransport(soft));
      await driver.connect();
      const claim2 = alteredInit(init.raw, { keyVersion: 2 });
      expect(await swOf(driver.issueDebitCommand({ cardAtr: c.atr, initializeResponse: claim2, draw: draw(), returnExpectedSignature: false }))).to.equal(
        SW.SECURITY_STATUS_NOT_SATISFIED,
      );
      // And a genuine version-2 card passes at the same PSAM.
      const c2 = await card({ keyVersion: 2, name: "v2" }, both);
      const init2 = await c2.reader.initializeForPurchase();
      expect(verifies(v2, init2.raw)).to.equal(false); // another purse: another key
      const issued = await driver.issueDebitCommand({ cardAtr: c2.atr, initializeResponse: init2.raw, draw: draw(), returnExpectedSignature: false });
      expect(issued.psamCounter).to.equal(1);
    } finally {
      await both.close();
    }
  });

  it("does not verify with any one bit of the response flipped", async () => {
    const c = await card();
    const init = await c.reader.initializeForPurchase();
    const key = diversifyCardKey(await purchaseMaster(dir, 1), init.parsed.purseId);
    let checked = 0;
    for (let bit = 0; bit < init.raw.length * 8; bit++) {
      const flipped = Buffer.from(init.raw);
      flipped[bit >> 3] = flipped.readUInt8(bit >> 3) ^ (0x80 >> (bit & 7));
      let ok: boolean;
      try {
        ok = verifies(key, flipped);
      } catch (e) {
        if (!(e instanceof LayoutError)) throw e;
        continue; // not even a response (a BCD date that is no date): refused before any MAC
      }
      expect(ok, `bit ${bit}`).to.equal(false);
      checked++;
    }
    expect(checked).to.be.greaterThan(340);
  });

  it("the PSAM refuses a made-up or altered response with 6982 before its other checks, and opens no session: nothing signed", async () => {
    const c = await card();
    const p = await psam();
    const init = await c.reader.initializeForPurchase();
    const refused: [string, Buffer][] = [
      ["made up (random purse id)", madeUpInit()],
      ["made up, expired", madeUpInit({ expiry: "2020-01-31" })],
      ["made up, another currency", madeUpInit({ currency: 840 })],
      ["made up, blocked", madeUpInit({ status: PurseStatusByte.BLOCKED })],
      ["balance raised", alteredInit(init.raw, { balance: init.parsed.balance + 1 })],
      ["expiry extended", alteredInit(init.raw, { expiry: "2199-12-31" })],
      ["counter changed", alteredInit(init.raw, { counter: init.parsed.counter + 1 })],
      ["challenge changed", alteredInit(init.raw, { challenge: randomBytes(8) })],
      ["purse id changed", alteredInit(init.raw, { purseId: randomBytes(8) })],
      ["cryptogram flipped", (() => InitializeForPurchaseResponse.encode({ ...init.parsed, cryptogram: flip(init.parsed.cryptogram) }))()],
      ["expired, signed with another key", resignedInit(randomBytes(16), init.raw, { expiry: "2020-01-31" })],
    ];
    for (const [what, raw] of refused) {
      expect(await swOf(p.driver.issueDebitCommand({ cardAtr: c.atr, initializeResponse: raw, draw: draw(), returnExpectedSignature: false })), what).to.equal(
        SW.SECURITY_STATUS_NOT_SATISFIED,
      );
    }
    // After a refused INITIALIZE, DRAW AMOUNT finds no card: the PSAM signs nothing.
    const raw = async (cla: number, ins: number, data: Buffer, p1 = 0) =>
      decodeResponse(await p.soft.process(encodeCommand({ cla, ins, p1, p2: 0, data, le: 256 }))).sw;
    expect(await raw(0x00, 0xa4, PSAM_AID, 0x04)).to.equal(SW.OK);
    expect(await raw(PSAM_CLA, PsamIns.CARD_RESET, c.atr)).to.equal(SW.OK);
    expect(await raw(PSAM_CLA, PsamIns.INITIALIZE, madeUpInit())).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await raw(PSAM_CLA, PsamIns.DRAW_AMOUNT, DrawAmountCommand.encode(draw()))).to.equal(SW.CONDITIONS_NOT_SATISFIED);
    // A genuine response, then a refused one in the same card session: the refused one ends what the genuine one opened.
    expect(await raw(PSAM_CLA, PsamIns.CARD_RESET, c.atr)).to.equal(SW.OK);
    expect(await raw(PSAM_CLA, PsamIns.INITIALIZE, init.raw)).to.equal(SW.OK);
    expect(await raw(PSAM_CLA, PsamIns.INITIALIZE, alteredInit(init.raw, { balance: 1_000_000 }))).to.equal(SW.SECURITY_STATUS_NOT_SATISFIED);
    expect(await raw(PSAM_CLA, PsamIns.DRAW_AMOUNT, DrawAmountCommand.encode(draw()))).to.equal(SW.CONDITIONS_NOT_SATISFIED);

    await p.driver.connect();
    const st = await p.driver.readStatus();
    expect(st.psamCounter).to.equal(0);
    expect(st.pendingCount).to.equal(0);
    // The genuine response still passes.
    const issued = await p.driver.issueDebitCommand({ cardAtr: c.atr, initializeResponse: init.raw, draw: draw(), returnExpectedSignature: false });
    expect(issued.psamCounter).to.equal(1);
  });
});

function flip(b: Buffer): Buffer {
  const c = Buffer.from(b);
  c.writeUInt8(c.readUInt8(0) ^ 0x01, 0);
  return c;
}
