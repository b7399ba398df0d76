// A load as the client's journal holds it, by state: each state says which
// fields a load has from then on (the bank's offer from OFFERED, the card's
// counter from REQUESTED, the proof reference from LOAD_SENT, the card's
// answer at CARD_ANSWERED, the load server's settlement at SETTLED). The
// journal checks its rows against this when it reads them, so the load code
// never guesses at a field.

import type { LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import type { Money } from "../../gen/netpurse/card/v1/card.js";
import type { SettledLoad } from "../../gen/netpurse/load/v1/load.js";
import type { BankOffer } from "./offer.js";

/** Where a load stands on the client's side, as its journal records it. */
export type ClientLoadState = "STARTED" | "OFFERED" | "REQUESTED" | "LOAD_SENT" | "CARD_ANSWERED" | "SETTLED" | "DONE" | "FAILED";

/** What every load has from its start. */
interface LoadBase {
  transactionId: string;
  bankAddress: string;
  accountId: string;
  amount: Money;
  /** The card the load is for, hex: recovery waits for this card. */
  purseId: string;
}

/** From the bank's offer on: the bank holds the funds. */
interface Offered {
  offer: BankOffer;
}

/** From the load request on: a LOAD command may exist, made for this card counter. */
interface Requested extends Offered {
  /** The card's counter when it answered INITIALIZE FOR LOAD: a zero-value proof is only worth asking while it has not moved. */
  cardCounter: number;
}

/** From the LOAD command on: the card may be credited. */
interface Sent extends Requested {
  /** The load server's reference for a zero-value INITIALIZE FOR LOAD, given with the LOAD command; empty when none was given (GetLoad tells it). */
  proofReference: string;
}

/** At CARD_ANSWERED: what the card said. */
interface Answered extends Sent {
  /** The card's answer to LOAD, which may be a negative result. */
  loadResponse: Buffer;
}

/** An open load (not yet DONE or FAILED) as the journal holds it. */
export type LoadRecord = LoadBase &
  (
    | { state: "STARTED" }
    | (Offered & { state: "OFFERED" })
    | (Requested & { state: "REQUESTED" })
    | (Sent & { state: "LOAD_SENT" })
    | (Answered & { state: "CARD_ANSWERED" })
    | { state: "SETTLED"; settled: SettledLoad }
  );

/** The states of an open load. */
export type OpenLoadState = LoadRecord["state"];

/** An open load in state `S`. */
export type LoadIn<S extends OpenLoadState> = Extract<LoadRecord, { state: S }>;

/** A load from its request on, until settled: only the card (its zero-value S1 or its history) or the load server can end it. */
export type RequestedLoad = Extract<LoadRecord, Requested>;

/** The client's log of each load step, so that nothing the card was credited with is lost. */
export interface LoadJournal {
  /** The first step, with the caller's request id if it gave one (a retry under it finds this load). */
  loadStarted(r: { transactionId: string; bankAddress: string; accountId: string; amount: Money; purseId: string; requestId?: string }): Promise<void>;
  loadOffered(id: string, offer: LoadOffer): Promise<void>;
  /** Written before the load request leaves: from here on a LOAD command may exist, made for this card counter. */
  loadRequested(id: string, cardCounter: number): Promise<void>;
  /** Written before the card sees LOAD: from here on, the card may be credited. */
  loadSent(id: string, proofReference: string): Promise<void>;
  loadAnswered(id: string, loadResponse: Buffer): Promise<void>;
  loadSettled(id: string, settled: SettledLoad): Promise<void>;
  loadDone(id: string): Promise<void>;
  loadFailed(id: string, why: string): Promise<void>;
  /** Loads not yet DONE or FAILED, oldest first. */
  openLoads(): Promise<LoadRecord[]>;
}
