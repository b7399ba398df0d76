// netpurse's PC/SC transport (lib/pcsc) against emulated readers on the real
// stack: which reader it takes, what it says when there is no card, and that
// taking the reader again after an idle release keeps the card's session
// (a purchase waiting on the network must not lose its card session).
// Skipped loudly where PC/SC cannot be set up (test/support/pcsc.ts).

import { expect } from "chai";
import { readFile } from "node:fs/promises";
import { ApduError, SW } from "../../lib/apdu/apdu.js";
import { createLogger } from "../../lib/log.js";
import { PcscReaders } from "../../lib/pcsc/readers.js";
import { CardUnreachable, PcscTransport } from "../../lib/pcsc/transport.js";
import { PURSE_AID } from "../../lib/protocol/purse.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { startEmulatorProcess, type EmulatorProcess } from "../../services/emulator/emulator-process.js";
import { makeCard, makeIssuer, makePsam, tempDir } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";
import { pcscUnavailable, skipLoudly } from "../support/pcsc.js";

describe("PC/SC transport: the reader it takes, no card, and an idle release that keeps the session", function () {
  this.timeout(60_000);
  let emulator: EmulatorProcess;
  let readers: PcscReaders;
  let cleanup: () => Promise<void>;
  let card1: string, card2: string, psam: string;
  let purse2: string;
  const open: PcscTransport[] = [];
  const transport = (...a: ConstructorParameters<typeof PcscTransport> extends [unknown, ...infer R] ? R : never) => {
    const t = new PcscTransport(readers, ...a);
    open.push(t);
    return t;
  };

  before(async function () {
    const reason = await pcscUnavailable({ binding: true, opensc: false });
    if (reason) skipLoudly(this, reason);
    const t = await tempDir("netpurse-pcsc-transport-");
    cleanup = t.cleanup;
    const issuer = await makeIssuer(t.dir);
    try {
      // A PSAM first in name order, then two cards: the purse is looked for by SELECT, not by position.
      const psamFile = await makePsam(issuer, t.dir, { name: "p" });
      const c1 = await makeCard(issuer, t.dir, { name: "one", value: 100 });
      const c2 = await makeCard(issuer, t.dir, { name: "two", value: 200 });
      emulator = await startEmulatorProcess({ dir: t.dir, cards: [c1, c2], psams: [psamFile], pcscd: true });
      purse2 = (JSON.parse(await readFile(c2, "utf8")) as { purseId: string }).purseId;
    } finally {
      await issuer.close();
    }
    [card1, card2] = emulator.readers.filter((r) => r.kind === "card").map((r) => r.name) as [string, string];
    psam = emulator.readers.find((r) => r.kind === "PSAM")!.name;
    readers = await PcscReaders.open({ log: createLogger("pcsc-test") });
  });
  after(async () => {
    for (const t of open) await t.close();
    await readers?.close();
    await emulator?.close();
    await cleanup?.();
  });

  it("takes the first reader whose card answers SELECT of the purse application, and the next one when that card is taken out", async () => {
    const t = transport({ holding: PURSE_AID }, { waitForCardMs: 0 });
    await new PurseReader(t).connect();
    expect(t.readerName).to.equal(card1);
    await t.close();
    await emulator.control.remove(card1);
    await waitFor(() => readers.view(card1)?.present === false, 10_000, "card 1 seen out");
    const again = transport({ holding: PURSE_AID }, { waitForCardMs: 0 });
    const reader = new PurseReader(again);
    await reader.connect();
    expect(again.readerName).to.equal(card2);
    expect((await reader.readPurse()).purseId.toString("hex")).to.equal(purse2);
    await again.close();
    await emulator.control.insert(card1);
    await emulator.control.whenReady(card1);
    await waitFor(() => readers.view(card1)?.present === true, 10_000, "card 1 seen back");
  });

  it("a named reader without a card, a reader that does not exist, a PSAM where a purse is wanted: CardUnreachable or the card's refusal, each saying what to do", async () => {
    await emulator.control.remove(card2);
    await waitFor(() => readers.view(card2)?.present === false, 10_000, "card 2 seen out");
    const empty = await new PurseReader(transport({ name: card2 })).connect().catch((e: unknown) => e);
    expect(empty).to.be.instanceOf(CardUnreachable);
    expect((empty as Error).message).to.equal(`no card in reader "${card2}"; insert the card and try again`);
    const missing = await new PurseReader(transport({ name: "no such reader 00 00" })).connect().catch((e: unknown) => e);
    expect(missing).to.be.instanceOf(CardUnreachable);
    expect((missing as Error).message)
      .to.contain(`reader "no such reader 00 00" is not connected (readers: `)
      .and.contain(card1);
    const wrong = await new PurseReader(transport({ name: psam })).connect().catch((e: unknown) => e);
    expect(wrong).to.be.instanceOf(ApduError);
    expect((wrong as ApduError).sw).to.equal(SW.FILE_NOT_FOUND);
    await emulator.control.insert(card2);
    await emulator.control.whenReady(card2);
  });

  it("waits for a card up to waitForCardMs and takes it when it comes", async () => {
    await emulator.control.remove(card2);
    await waitFor(() => readers.view(card2)?.present === false, 10_000, "card 2 seen out");
    const t = transport({ name: card2 }, { waitForCardMs: 15_000 });
    const connecting = new PurseReader(t).connect();
    await new Promise((r) => setTimeout(r, 300));
    await emulator.control.insert(card2);
    expect((await connecting).length).to.be.greaterThan(0); // the ATR
  });

  it("after an idle release the reader is taken again without a reset: the card keeps its selected application", async () => {
    const t = transport({ name: card1 }, { releaseAfterMs: 50 });
    const reader = new PurseReader(t);
    await reader.connect(); // reset + SELECT
    await new Promise((r) => setTimeout(r, 300)); // released meanwhile
    // READ PURSE works only with the purse application selected: no reset happened in between.
    expect((await reader.readPurse()).balance).to.equal(100);
    // A reset does forget the selection: the card refuses READ PURSE until SELECT again.
    await t.reset();
    const refused = await reader.readPurse().catch((e: unknown) => e);
    expect(refused).to.be.instanceOf(ApduError);
  });
});
