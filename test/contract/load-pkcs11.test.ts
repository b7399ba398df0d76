// The load server on a PKCS#11 token (SoftHSM2, docs/hsm.md): the real
// bank, load server and clearing on loopback over TLS, with the load master
// key of version 2 generated in the token and held nowhere else, and cards
// personalised at that version. Each case is checked where a cardholder, a
// bank and the operator would check it: the card's balance, the account,
// the load server's record, clearing's outbox, settlement and quarantine.
// When the token is out of reach, nothing is signed, nothing is recorded and
// the caller is told UNAVAILABLE (SECURITY_MODULE_UNAVAILABLE); the server
// serves again as soon as it is back. Skipped, loudly, without SoftHSM2 or
// pkcs11js.

import { expect } from "chai";
import { readFile, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { HoldState, type LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadState } from "../../gen/netpurse/load/v1/load.js";
import { LoadCommand, LoadResult } from "../../lib/protocol/load.js";
import type { Pkcs11HsmFile } from "../../services/load/pkcs11-hsm.js";
import { failure } from "../support/card-client.js";
import { account, flipByte, freshCardholder, LOADED, loadRequest, NOT_LOADED, offerFor } from "../support/load.js";
import { asNetwork, startLoadClearing, type LoadClearing } from "../support/load-clearing.js";
import { waitFor } from "../support/network.js";
import { provisionTokenIn, requirePkcs11 } from "../support/softhsm.js";

const UNAVAILABLE = { code: "UNAVAILABLE", reason: "SECURITY_MODULE_UNAVAILABLE" };

describe("contract: the load server and clearing with the load master key in a PKCS#11 token (SoftHSM2)", function () {
  this.timeout(60_000);
  let fx: LoadClearing;
  let tokens: string;
  let pinFile: string;
  let hsmPath: string;

  before(async function () {
    await requirePkcs11(this);
    fx = await startLoadClearing();
    const p = await provisionTokenIn(fx.data, 2);
    tokens = p.tokens;
    pinFile = p.token.pinFile!;
    hsmPath = join(fx.paths.load, "hsm.json");
    // Clearing and the load server read their keys at start: now they find the token.
    await fx.stopClearing();
    await fx.startClearing();
    await fx.restartLoad();
  });
  after(async () => fx?.close());

  const cardholder = () => freshCardholder(asNetwork(fx));
  type Holder = Awaited<ReturnType<typeof cardholder>>;
  const idOf = (offer: LoadOffer) => offer.transactionId!.value;
  const hsmFile = async () => JSON.parse(await readFile(hsmPath, "utf8")) as Pkcs11HsmFile;
  const quarantined = async (id: string) =>
    (await fx.clients.clearing.listQuarantined({ pageSize: 500, pageToken: "" })).entries.some(
      (e) => e.entry?.$case === "load" && e.entry.value.load?.transactionId?.value === id,
    );

  /** Runs `f` with the token's folder moved away (as if the token were pulled out), and puts it back whatever happens. */
  async function withoutToken<T>(f: () => Promise<T>): Promise<T> {
    await rename(tokens, `${tokens}-away`);
    try {
      return await f();
    } finally {
      await rename(`${tokens}-away`, tokens);
    }
  }

  async function complete(offer: LoadOffer, raw: Buffer) {
    return fx.clients.load.completeLoad({ transactionId: offer.transactionId, loadResponse: raw, zeroValueInitializeResponse: Buffer.alloc(0) });
  }

  /** Offer, load request, the card's LOAD, CompleteLoad and the bank's ConfirmLoad. */
  async function wholeLoad(h: Holder, amountMinor: number) {
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, amountMinor);
    const { request } = await loadRequest(h.reader, offer);
    const issued = await fx.clients.load.processLoadRequest(request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    const done = await complete(offer, answer.raw);
    const bank = await fx.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
    return { offer, issued, answer, done, bank, id: idOf(offer) };
  }

  it("a card of the token-held key version loads end to end: card credited, bank debited once, clearing posts the load", async () => {
    const issuerKeys = JSON.parse(await readFile(join(fx.paths.issuer, "keys.json"), "utf8")) as { master: { load: Record<string, string> } };
    expect(issuerKeys.master.load).to.not.have.property("2");
    const h = await cardholder();
    expect((await h.reader.readPurse()).keyVersion).to.equal(2);
    const before = await fx.settlement();
    const counter = (await hsmFile()).counter;

    const { answer, done, bank, issued, id } = await wholeLoad(h, 1_750);
    expect(issued.hsmCounter).to.equal(counter + 1);
    expect(Buffer.from(issued.hsmId).toString("hex")).to.equal((await hsmFile()).hsmId);
    expect((await hsmFile()).counter).to.equal(counter + 1);
    expect(answer.parsed).to.deep.include({ result: LoadResult.LOADED, balance: 1_750 });
    expect(done.load!.outcome).to.equal(LOADED);
    expect(bank.holdState).to.equal(HoldState.HOLD_STATE_POSTED);
    expect((await h.reader.readPurse()).balance).to.equal(1_750);
    expect(await account(asNetwork(fx), h.accountId)).to.deep.include({ balance: 100_000 - 1_750, available: 100_000 - 1_750 });

    expect(await fx.reported(id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0, refused_at: null });
    const after = await fx.settlement();
    expect(after.loads - before.loads).to.equal(1);
    expect(await quarantined(id)).to.equal(false);
  });

  it("refuses a wrong S1 as the software module does: PERMISSION_DENIED, BAD_SIGNATURE, settled NOT_LOADED, the hold released", async () => {
    const h = await cardholder();
    const counter = (await hsmFile()).counter;
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, 900);
    const { request } = await loadRequest(h.reader, offer, { patchInit: (raw) => flipByte(raw, -1) });
    expect(await failure(fx.clients.load.processLoadRequest(request))).to.deep.include({ code: "PERMISSION_DENIED", reason: "BAD_SIGNATURE" });
    expect((await hsmFile()).counter, "no counter used for a refused load").to.equal(counter);
    const done = await complete(offer, Buffer.alloc(0));
    expect(done.load!.outcome).to.equal(NOT_LOADED);
    const bank = await fx.clients.bank.confirmLoad({ transactionId: offer.transactionId, confirmation: done.load!.confirmation });
    expect(bank.holdState).to.equal(HoldState.HOLD_STATE_RELEASED);
    expect((await h.reader.readPurse()).balance).to.equal(0);
    expect(await account(asNetwork(fx), h.accountId)).to.deep.include({ balance: 100_000, available: 100_000 });
  });

  it("token gone: the load request is UNAVAILABLE, nothing is recorded or counted, the server keeps serving; token back: the same request loads", async () => {
    const h = await cardholder();
    const counter = (await hsmFile()).counter;
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, 600);
    const { request } = await loadRequest(h.reader, offer);
    await withoutToken(async () => {
      for (let i = 0; i < 2; i++) {
        const e = await failure(fx.clients.load.processLoadRequest(request));
        expect(e).to.deep.include(UNAVAILABLE);
        expect(e.details).to.contain("nothing was recorded");
      }
      // Still serving: the load is unknown to it, as nothing was recorded.
      expect(await failure(fx.clients.load.getLoad({ transactionId: offer.transactionId }))).to.deep.include({ code: "NOT_FOUND" });
      expect((await hsmFile()).counter).to.equal(counter);
    });
    const issued = await fx.clients.load.processLoadRequest(request);
    expect(issued.hsmCounter).to.equal(counter + 1);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    expect((await complete(offer, answer.raw)).load!.outcome).to.equal(LOADED);
    expect((await h.reader.readPurse()).balance).to.equal(600);
  });

  it("token gone when the card's answer comes: UNAVAILABLE and the load stays PENDING (no S3 refused); token back: settled LOADED", async () => {
    const h = await cardholder();
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, 450);
    const { request } = await loadRequest(h.reader, offer);
    const issued = await fx.clients.load.processLoadRequest(request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    expect(LoadCommand.decode(Buffer.from(issued.loadCommand)).amount).to.equal(450);
    await withoutToken(async () => {
      expect(await failure(complete(offer, answer.raw))).to.deep.include(UNAVAILABLE);
      expect((await fx.clients.load.getLoad({ transactionId: offer.transactionId })).state).to.equal(LoadState.LOAD_STATE_PENDING);
    });
    const done = await complete(offer, answer.raw);
    expect(done.load!.outcome).to.equal(LOADED);
    expect(done.load!.transactionId?.value).to.equal(idOf(offer));
  });

  it("clearing without the token: the settled load waits in the load server's outbox, nothing quarantined; token back: POSTED once", async () => {
    const h = await cardholder();
    await fx.stopClearing();
    const { id } = await wholeLoad(h, 800);
    await withoutToken(async () => {
      await fx.startClearing();
      // Clearing itself answers now, and cannot check the load's S1 and S3 without the token.
      const refusedByClearing = async () =>
        /^UNAVAILABLE SECURITY_MODULE_UNAVAILABLE: the security module is unavailable/.test((await fx.report(id))?.last_error ?? "");
      await waitFor(refusedByClearing, 10_000, "clearing's answer without the token");
      const attempts = (await fx.report(id))!.attempts;
      await waitFor(async () => (await fx.report(id))!.attempts > attempts && (await refusedByClearing()), 10_000, "another attempt");
      expect(await fx.report(id)).to.deep.include({ reported_at: null, clearing_status: null, refused_at: null });
      expect(await quarantined(id)).to.equal(false);
    });
    expect(await fx.reported(id)).to.deep.include({ clearing_status: "POSTED", duplicate: 0, refused_at: null });
    expect(await quarantined(id)).to.equal(false);
  });

  it("a wrong PIN: the load server starts and answers UNAVAILABLE without the PIN in it; the right PIN back in the file: served, no restart", async () => {
    const right = (await readFile(pinFile, "utf8")).trim();
    const wrong = "0000-wrong-pin-0000";
    const h = await cardholder();
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, 300);
    const { request } = await loadRequest(h.reader, offer);
    await writeFile(pinFile, `${wrong}\n`);
    try {
      await fx.restartLoad();
      const e = await failure(fx.clients.load.processLoadRequest(request));
      expect(e).to.deep.include(UNAVAILABLE);
      expect(e.details).to.match(/PIN/);
      for (const secret of [right, wrong]) expect(e.details).to.not.contain(secret);
    } finally {
      await writeFile(pinFile, `${right}\n`);
    }
    const issued = await fx.clients.load.processLoadRequest(request);
    const answer = await h.reader.load(Buffer.from(issued.loadCommand));
    expect((await complete(offer, answer.raw)).load!.outcome).to.equal(LOADED);
  });

  it("a module that does not load: the load server starts and answers UNAVAILABLE; with its module back it loads", async () => {
    const good = await hsmFile();
    const h = await cardholder();
    const offer = await offerFor(asNetwork(fx), h.reader, h.accountId, 200);
    const { request } = await loadRequest(h.reader, offer);
    await writeFile(hsmPath, JSON.stringify({ ...good, module: join(fx.data, "gone", "libsofthsm2.so") }));
    try {
      await fx.restartLoad();
      const e = await failure(fx.clients.load.processLoadRequest(request));
      expect(e).to.deep.include(UNAVAILABLE);
      expect(e.details).to.contain("cannot load the PKCS#11 module");
    } finally {
      await writeFile(hsmPath, JSON.stringify(good));
    }
    await fx.restartLoad();
    const issued = await fx.clients.load.processLoadRequest(request);
    expect(issued.hsmCounter).to.equal(good.counter + 1);
  });
});
