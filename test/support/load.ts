// Loads driven step by step, for tests that must misbehave (forge S1, S2 or
// S3, lie about the card's result, replay LOAD, drop out after a step): a
// fresh card and bank account per test, and each step of the client module
// as a function of its own.

import { randomUUID } from "node:crypto";
import { SoftwareApplication } from "../../lib/apdu/software-application.js";
import type { CommandApdu, ResponseApdu } from "../../lib/apdu/apdu.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { purseState } from "../../client/card/purse-state.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { loadInitCommand } from "../../client/load/offer.js";
import { HoldState, type LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadOutcome, type SettledLoad } from "../../gen/netpurse/load/v1/load.js";
import { SqliteLoadJournal } from "../../client/daemon/journal.js";
import { txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { PurseIns } from "../../lib/protocol/purse.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { hashPassword, type ScryptCost } from "../../services/bank/credentials.js";
import type { Network } from "./network.js";
import { EUR, makeCard } from "./fixtures.js";

export { EUR };

/** A card the issuer blocks between INITIALIZE FOR LOAD and LOAD: its LOAD answer is a genuine negative result. */
class BlockedMidLoadCard extends SoftwareCard {
  static async openBlocking(path: string): Promise<BlockedMidLoadCard> {
    return new BlockedMidLoadCard(path, await SoftwareApplication.load<CardFile>(path, "card"));
  }

  protected override async dispatch(c: CommandApdu): Promise<ResponseApdu> {
    const r = await super.dispatch(c);
    if (c.ins === PurseIns.INITIALIZE_FOR_LOAD) this.state = { ...this.state, status: "blocked" };
    return r;
  }
}

let seq = 0;

/**
 * The scrypt cost of the test accounts' passwords: far below the bank's own
 * (PASSWORD_COST), so that a thousand accounts of the money invariant do not
 * take minutes. The cost is part of the stored hash, so the bank checks
 * these logins exactly as any other.
 */
export const TEST_PASSWORD_COST: ScryptCost = { ln: 10, r: 8, p: 1 };

/** Opens a bank account with a password, and logs in to it as its holder (the token is kept for `net.bankAs`). */
export async function openAccount(
  net: Network,
  o: { accountId: string; holder?: string; deposit?: number; password?: string },
): Promise<{ accountId: string; password: string; token: string }> {
  const password = o.password ?? `pw-${o.accountId}-${randomUUID()}`;
  await net.bank.store.open({
    accountId: o.accountId,
    holder: o.holder ?? `Holder of ${o.accountId}`,
    currency: EUR,
    exponent: 2,
    openingMinor: o.deposit ?? 100_000,
    passwordHash: await hashPassword(password, TEST_PASSWORD_COST),
  });
  return { accountId: o.accountId, password, token: await net.loginAs(o.accountId, password) };
}

/** A fresh card (empty unless told) and a fresh bank account for one test, its holder logged in (`token`). */
export async function freshCardholder(
  net: Network,
  o: { value?: number; maxBalance?: number; expiry?: string; deposit?: number; blockMidLoad?: boolean } = {},
): Promise<{ path: string; card: SoftwareCard; reader: PurseReader; accountId: string; password: string; token: string }> {
  const n = ++seq;
  const issuer = await Issuer.open(net.paths.issuer);
  let path: string;
  try {
    path = await makeCard(issuer, net.data, { name: `load-${n}`, value: o.value ?? 0, maxBalance: o.maxBalance ?? 50_000, expiry: o.expiry ?? "2031-12-31" });
  } finally {
    await issuer.close();
  }
  const { accountId, password, token } = await openAccount(net, { accountId: `acct-${n}`, holder: `Holder ${n}`, deposit: o.deposit ?? 100_000 });
  const card = o.blockMidLoad ? await BlockedMidLoadCard.openBlocking(path) : await SoftwareCard.open(path);
  const reader = new PurseReader(new InProcessTransport(card));
  await reader.connect();
  return { path, card, reader, accountId, password, token };
}

/** Step 872-874: the bank's offer for `amountMinor`, made from what the card says, asked by the account's holder. */
export async function offerFor(net: Network, reader: PurseReader, accountId: string, amountMinor: number, id = randomUUID()): Promise<LoadOffer> {
  const purse = purseState(await reader.readPurse());
  const r = await net.bankAs(accountId).createLoadOffer({ transactionId: txnId(id), accountId, amount: money(amountMinor, EUR, 2), purse });
  return r.offer!;
}

/** Step 876-878: INITIALIZE FOR LOAD and the load request, with an optional change to the card's answer. */
export async function loadRequest(
  reader: PurseReader,
  offer: LoadOffer,
  o: { patchInit?: (raw: Buffer) => Buffer; cardLog?: Buffer[]; askAmount?: number } = {},
) {
  const init = await reader.initializeForLoad(loadInitCommand(offer, o.askAmount));
  const raw = o.patchInit ? o.patchInit(Buffer.from(init.raw)) : init.raw;
  return {
    init,
    request: {
      transactionId: offer.transactionId,
      bankId: offer.bankId,
      keyNonce: offer.keyNonce,
      authorization: offer.authorization,
      initializeResponse: raw,
      cardLog: o.cardLog ?? [],
    },
  };
}

/** The negative result handling's zero-value INITIALIZE FOR LOAD: the original load's elements with the load server's proof reference. */
export function zeroValue(reader: PurseReader, offer: LoadOffer, issued: { proofReference?: { value: string } }) {
  return reader.initializeForLoad({ ...loadInitCommand(offer, 0), transactionRef: issued.proofReference!.value });
}

/** The account as the bank reports it, in minor units. */
export async function account(net: Network, accountId: string) {
  const a = await net.bankAs(accountId).getAccount({ accountId });
  return { balance: Number(a.balance!.amountMinor), available: Number(a.available!.amountMinor), holds: a.holds };
}

export async function holdOf(net: Network, accountId: string, offer: LoadOffer): Promise<HoldState> {
  const a = await net.bankAs(accountId).getAccount({ accountId });
  return a.holds.find((h) => h.transactionId?.value === offer.transactionId!.value)!.state;
}

export const LOADED = LoadOutcome.LOAD_OUTCOME_LOADED;
export const NOT_LOADED = LoadOutcome.LOAD_OUTCOME_NOT_LOADED;

/** A copy with one bit of byte `at` flipped (negative: from the end). */
export function flipByte(b: Uint8Array, at: number): Buffer {
  const out = Buffer.from(b);
  const i = at < 0 ? out.length + at : at;
  out[i]! ^= 0x01;
  return out;
}

/** The steps of the client's load journal, in order. */
export type LoadStep = "loadStarted" | "loadOffered" | "loadRequested" | "loadSent" | "loadAnswered" | "loadSettled";
export const LOAD_STEPS: LoadStep[] = ["loadStarted", "loadOffered", "loadRequested", "loadSent", "loadAnswered", "loadSettled"];

/** The client vanishing: thrown by CrashingLoadJournal right after a step was written. */
export class Crash extends Error {}

/** The client's load journal, which crashes the load once, right after the step `crashAfter` was written. */
export class CrashingLoadJournal extends SqliteLoadJournal {
  crashAfter: LoadStep | undefined;

  private crash(step: LoadStep) {
    if (this.crashAfter !== step) return;
    this.crashAfter = undefined;
    throw new Crash(`crashed after ${step}`);
  }
  override async loadStarted(r: Parameters<SqliteLoadJournal["loadStarted"]>[0]) {
    await super.loadStarted(r);
    this.crash("loadStarted");
  }
  override async loadOffered(id: string, offer: LoadOffer) {
    await super.loadOffered(id, offer);
    this.crash("loadOffered");
  }
  override async loadRequested(id: string, counter: number) {
    await super.loadRequested(id, counter);
    this.crash("loadRequested");
  }
  override async loadSent(id: string, reference: string) {
    await super.loadSent(id, reference);
    this.crash("loadSent");
  }
  override async loadAnswered(id: string, raw: Buffer) {
    await super.loadAnswered(id, raw);
    this.crash("loadAnswered");
  }
  override async loadSettled(id: string, settled: SettledLoad) {
    await super.loadSettled(id, settled);
    this.crash("loadSettled");
  }
}
