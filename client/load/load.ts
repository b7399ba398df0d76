// The client module's load (FIG. 17, 18A-C): ask the bank for a load offer
// (the bank holds the funds), package the card's INITIALIZE FOR LOAD into
// one load request for the load server (the patent's "emulating security
// module commands"), hand the LOAD command to the card, and carry the load
// server's sealed confirmation to the bank. A negative result from the card
// goes to the negative result handling (negative-result.ts); a load cut
// short is finished by the recovery (recovery.ts). Every step is journaled
// first (record.ts).

import { randomUUID } from "node:crypto";
import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type { BankServiceDefinition, HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import type { Money } from "../../gen/netpurse/card/v1/card.js";
import type { PurchaseStep } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import type { LoadOutcome, LoadServiceDefinition, ProcessLoadRequestResponse, SettledLoad } from "../../gen/netpurse/load/v1/load.js";
import { swHex, SW } from "../../lib/apdu/apdu.js";
import { bearer, DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { passOn } from "../../lib/grpc/errors.js";
import { hexOf, requireCardAmount, txnId } from "../../lib/ids.js";
import { formatMoney } from "../../lib/money.js";
import { LoadResult } from "../../lib/protocol/load.js";
import type { PurseReader } from "../card/purse-reader.js";
import { purseState } from "../card/purse-state.js";
import { isFinal, retrying } from "../calls.js";
import { answerLacks, forwardSettled, settleAndConfirm, settledIn, type Settlement } from "./confirmation.js";
import { proveNotLoaded } from "./negative-result.js";
import { checkedOffer, loadInitCommand, type BankOffer } from "./offer.js";
import type { LoadIn, LoadJournal } from "./record.js";

export type BankClient = Client<typeof BankServiceDefinition, DeadlineOptions>;
export type LoadClient = Client<typeof LoadServiceDefinition, DeadlineOptions>;

export interface LoadContext {
  reader: PurseReader;
  bank(address: string): BankClient;
  /** The account holder's access token for that bank and account, if one is at hand (only CreateLoadOffer needs one). */
  bankToken?(address: string, accountId: string): string | undefined;
  load(address: string): LoadClient;
  journal?: LoadJournal;
  callDeadlineMs?: number;
}

export interface LoadSummary {
  transactionId: string;
  outcome: LoadOutcome;
  holdState: HoldState;
  steps: PurchaseStep[];
}

/** Reports one step of a load to the cardholder. */
export type Step = (name: string, detail: string) => void;

/** How many of the card's newest log records go with each load request, so pending loads settle from them. */
const CARD_LOG_SENT = 8;

/**
 * Whether the bank's refusal of CreateLoadOffer ends the load: a final
 * answer, or a refusal made before any hold (no valid access token, the
 * account's cap on holds). A hold an earlier attempt of the same request may
 * have made is released by the bank's own sweep, as nothing can reach the
 * card without the offer.
 */
export const offerRefused = (e: unknown) =>
  isFinal(e) || (e instanceof ClientError && (e.code === Status.UNAUTHENTICATED || e.code === Status.RESOURCE_EXHAUSTED));

/**
 * Loads `amount` onto the card from `accountId` at the bank, as the account holder whose access token is `accessToken`;
 * under `transactionId` if given (the caller then knows which journal row to look at when it fails), else a new one.
 */
export async function loadCard(
  p: { bankAddress: string; accountId: string; amount: Money; accessToken: string; transactionId?: string; requestId?: string },
  ctx: LoadContext,
): Promise<LoadSummary> {
  const a = requireCardAmount(p.amount, "amount");
  const steps: PurchaseStep[] = [];
  const step: Step = (name, detail) => steps.push({ name, detail });
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  const shown = formatMoney(a);

  // Step 872: the card's balance and room, read before the bank is asked.
  await ctx.reader.connect();
  const purse = await ctx.reader.readPurse();
  step(
    "card",
    `purse ${purse.purseId.toString("hex")}: balance ${formatMoney({ amountMinor: purse.balance, currency: purse.currency, exponent: purse.exponent })} of at most ${formatMoney({ amountMinor: purse.maxBalance, currency: purse.currency, exponent: purse.exponent })}`,
  );

  const id = p.transactionId ?? randomUUID();
  await ctx.journal?.loadStarted({
    transactionId: id,
    bankAddress: p.bankAddress,
    accountId: p.accountId,
    amount: a,
    purseId: purse.purseId.toString("hex"),
    ...(p.requestId ? { requestId: p.requestId } : {}),
  });
  let offer: BankOffer;
  try {
    const r = await retrying(() =>
      ctx
        .bank(p.bankAddress)
        .createLoadOffer(
          { transactionId: txnId(id), accountId: p.accountId, amount: a, purse: purseState(purse) },
          { deadline, metadata: bearer(p.accessToken) },
        ),
    );
    offer = checkedOffer(r.offer, answerLacks("the bank's answer to CreateLoadOffer"));
  } catch (e) {
    if (offerRefused(e)) await ctx.journal?.loadFailed(id, (e as Error).message);
    passOn(e, "the bank made no load offer");
  }
  await ctx.journal?.loadOffered(id, offer);
  step("load offer", `bank ${offer.bankId} holds ${shown} on account ${p.accountId} for transaction ${id}; load server ${offer.loadServerAddress}`);
  const rec: LoadIn<"OFFERED"> = {
    transactionId: id,
    bankAddress: p.bankAddress,
    accountId: p.accountId,
    amount: a,
    purseId: purse.purseId.toString("hex"),
    state: "OFFERED",
    offer,
  };
  return { transactionId: id, ...(await runLoad(rec, ctx, step)), steps };
}

/** From an offer on: the card, the load server, the card again, then the bank. */
export async function runLoad(rec: LoadIn<"OFFERED">, ctx: LoadContext, step: Step): Promise<Settlement> {
  const offer = rec.offer;
  const server = ctx.load(offer.loadServerAddress);
  await ctx.reader.connect();
  const cardLog = await ctx.reader.readLogRaw(CARD_LOG_SENT);
  const init = await ctx.reader.initializeForLoad(loadInitCommand(offer));
  step(
    "load request",
    `INITIALIZE FOR LOAD answered with S1 ${init.parsed.s1.toString("hex")} (card counter ${init.parsed.counter}); sent with ${cardLog.length} log records to ${offer.loadServerAddress}`,
  );
  await ctx.journal?.loadRequested(rec.transactionId, init.parsed.counter);
  const requested: LoadIn<"REQUESTED"> = { ...rec, state: "REQUESTED", cardCounter: init.parsed.counter };
  let issued: ProcessLoadRequestResponse;
  try {
    issued = await retrying(() =>
      server.processLoadRequest(
        {
          transactionId: offer.transactionId,
          bankId: offer.bankId,
          keyNonce: offer.keyNonce,
          authorization: offer.authorization,
          initializeResponse: init.raw,
          cardLog,
        },
        { deadline: ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS },
      ),
    );
  } catch (e) {
    return requestNotTaken(e, requested, ctx, step);
  }
  await forwardSettled(issued.settled, ctx);
  step("LOAD command", `security module ${hexOf(issued.hsmId)} signed it (S2, counter ${issued.hsmCounter})`);

  const proofReference = issued.proofReference?.value ?? "";
  await ctx.journal?.loadSent(rec.transactionId, proofReference);
  return loadOnCard({ ...requested, state: "LOAD_SENT", proofReference }, Buffer.from(issued.loadCommand), ctx, step);
}

/** The load request did not get through, or the load server refused it: ends the load where that is known to be safe. */
async function requestNotTaken(e: unknown, rec: LoadIn<"REQUESTED">, ctx: LoadContext, step: Step): Promise<Settlement> {
  if (!isFinal(e))
    passOn(e, "the load request did not get through; the funds stay held and the load is finished at the card's next transaction or 'netpurse card sync'");
  if (e instanceof ClientError && e.code === Status.ALREADY_EXISTS) {
    // An earlier attempt reached the load server but its command never reached us, so never the card: prove it.
    return proveNotLoaded(rec, ctx, step, Buffer.alloc(0));
  }
  // Refused before any LOAD command (the security module, a broken seal, another card): the load is over, and its confirmation frees the bank's hold.
  let ended: SettledLoad;
  try {
    ended = await endWithoutCommand(rec, ctx);
  } catch (abandonError) {
    // The load server will not even record the load (an unknown bank, say). No LOAD command exists, so the
    // card need not prove anything: the load ends here, and the bank's own sweep deals with its hold.
    if (isFinal(abandonError)) await ctx.journal?.loadFailed(rec.transactionId, (e as Error).message);
    passOn(e, "the load server refused the load request");
  }
  await settleAndConfirm(rec, ctx, step, ended);
  passOn(e, "the load server refused the load request (the bank's hold is released)");
}

/** The LOAD command to the card, and the card's answer (S3) to the load server. */
async function loadOnCard(rec: LoadIn<"LOAD_SENT">, loadCommand: Buffer, ctx: LoadContext, step: Step): Promise<Settlement> {
  const offer = rec.offer;
  const server = ctx.load(offer.loadServerAddress);
  const answer = await ctx.reader.load(loadCommand);
  const a = answer.parsed;
  if (answer.sw !== SW.OK || !a) {
    step("card", `the card refused the LOAD command (SW ${swHex(answer.sw)})`);
    return proveNotLoaded(rec, ctx, step, Buffer.alloc(0));
  }
  await ctx.journal?.loadAnswered(rec.transactionId, answer.raw);
  if (a.result !== LoadResult.LOADED) {
    step("card", `the card answered a negative result (code ${a.result}); negative result handling`);
    return proveNotLoaded(rec, ctx, step, answer.raw);
  }
  step(
    "card credit",
    `card credited: balance ${formatMoney({ amountMinor: a.balance, currency: offer.amount.currency, exponent: offer.amount.exponent })}, counter ${a.counter}, S3 ${a.s3.toString("hex")}`,
  );
  let settled: SettledLoad;
  try {
    const r = await retrying(() =>
      server.completeLoad(
        { transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) },
        { deadline: ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS },
      ),
    );
    settled = settledIn(r, "CompleteLoad");
  } catch (e) {
    if (isFinal(e)) passOn(e, "the load server did not accept the card's answer; the load stays pending until the card's history proves it");
    passOn(
      e,
      "the card is loaded; the load server could not be told, so the load is pending and will be confirmed at the card's next transaction or 'netpurse card sync'",
    );
  }
  return settleAndConfirm(rec, ctx, step, settled);
}

/** The settlement of a load that never got a LOAD command: the load server's own (refused), or made now (abandoned). */
async function endWithoutCommand(rec: LoadIn<"REQUESTED">, ctx: LoadContext): Promise<SettledLoad> {
  const offer = rec.offer;
  const server = ctx.load(offer.loadServerAddress);
  const r = await retrying(() =>
    server.abandonLoad(
      { transactionId: offer.transactionId, bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization },
      { deadline: ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS },
    ),
  );
  return settledIn(r, "AbandonLoad");
}
