// The recovery of open loads after a crash or an outage (the client's, a
// server's or the network's): each load the journal holds open is finished
// from the state it was left in, and while one may still need the card's
// zero-value proof, no other load moves the card's counter.

import { ClientError, Status } from "nice-grpc";
import { HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadOutcome, LoadState } from "../../gen/netpurse/load/v1/load.js";
import { bearer, DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { txnId } from "../../lib/ids.js";
import { LoadResponse, LoadResult } from "../../lib/protocol/load.js";
import { LogKind, LogRecord } from "../../lib/protocol/purse.js";
import { purseState } from "../card/purse-state.js";
import { isFinal, retrying } from "../calls.js";
import { answerLacks, outcomeName, settleAndConfirm, settledIn, type Settlement } from "./confirmation.js";
import { offerRefused, runLoad, type LoadContext, type Step } from "./load.js";
import { proveNotLoaded } from "./negative-result.js";
import { checkedOffer } from "./offer.js";
import type { LoadIn, LoadJournal, LoadRecord, OpenLoadState, RequestedLoad } from "./record.js";

/** What became of one open load when the client tried to finish it. */
export interface Resumed {
  transactionId: string;
  outcome: LoadOutcome;
  holdState: HoldState;
  detail: string;
}

/**
 * Finishes every open load from where its journal stands: the card's
 * history confirms a credit the load server never heard of (the pending
 * deposit), a card that never took the LOAD proves it with its zero-value
 * S1, and settled loads are delivered to their banks. Run before each card
 * transaction, at start, periodically, and on SyncCard.
 */
export async function resumeLoads(ctx: LoadContext & { journal: LoadJournal }): Promise<Resumed[]> {
  // Loads the card may still have to prove it did not take go first: any other load moves the card's counter.
  const open = (await ctx.journal.openLoads()).sort((a, b) => RESUME_ORDER[a.state] - RESUME_ORDER[b.state]);
  const out: Resumed[] = [];
  for (const rec of open) {
    const unspecified = { transactionId: rec.transactionId, outcome: LoadOutcome.LOAD_OUTCOME_UNSPECIFIED, holdState: HoldState.HOLD_STATE_UNSPECIFIED };
    if ((rec.state === "STARTED" || rec.state === "OFFERED") && (await ctx.journal.openLoads()).some(needsCardUnchanged)) {
      out.push({ ...unspecified, detail: "waits: another load must be proven on the card first" });
      continue;
    }
    try {
      // Read afresh for each load: finishing the one before may have changed the card.
      await ctx.reader.connect();
      const purse = await ctx.reader.readPurse();
      if (purse.purseId.toString("hex") !== rec.purseId) {
        out.push({ ...unspecified, detail: `waits for card ${rec.purseId}` });
        continue;
      }
      const done = await resumeLoad(rec, ctx, purse.counter, await ctx.reader.readLogRaw());
      out.push(
        done
          ? { transactionId: rec.transactionId, ...done, detail: `${outcomeName(done.outcome)}; the bank has the confirmation` }
          : { ...unspecified, detail: "still pending: the card's history does not show it yet" },
      );
    } catch (e) {
      // Only a load that never reached the card's LOAD command may end without a settlement.
      if (isFinal(e) && (rec.state === "STARTED" || rec.state === "OFFERED")) await ctx.journal.loadFailed(rec.transactionId, (e as Error).message);
      out.push({ ...unspecified, detail: (e as Error).message });
    }
  }
  return out;
}

const RESUME_ORDER: Record<OpenLoadState, number> = { REQUESTED: 0, LOAD_SENT: 0, CARD_ANSWERED: 0, SETTLED: 1, STARTED: 2, OFFERED: 2 };

/**
 * Whether an open load needs the card unchanged: a LOAD command may exist
 * that the card did not take (or it said it did not), and only its
 * zero-value S1 over the same counter can prove that. Until it is settled
 * the card must not make another transaction, or the proof is lost and the
 * load counts as made.
 */
export function needsCardUnchanged(rec: LoadRecord): boolean {
  if (rec.state === "REQUESTED" || rec.state === "LOAD_SENT") return true;
  if (rec.state !== "CARD_ANSWERED") return false;
  return rec.loadResponse.length !== LoadResponse.size || LoadResponse.decode(rec.loadResponse).result !== LoadResult.LOADED;
}

/** Where the load's journal stands decides how it goes on; undefined while it stays pending. */
async function resumeLoad(rec: LoadRecord, ctx: LoadContext, cardCounter: number, history: Buffer[]): Promise<Settlement | undefined> {
  const quiet: Step = () => {};
  switch (rec.state) {
    case "SETTLED":
      return settleAndConfirm(rec, ctx, quiet, rec.settled);
    case "STARTED":
      return runLoad(await offerAgain(rec, ctx), ctx, quiet);
    case "OFFERED":
      return runLoad(rec, ctx, quiet);
    default:
      return resumeRequested(rec, ctx, cardCounter, history);
  }
}

/**
 * The bank may hold the funds for an offer that never reached us: asking
 * again with the same transaction id gets that same offer. That takes the
 * account holder's access token. Without one at hand (the daemon keeps them
 * in memory only, so after a restart), or when the bank refuses it (expired),
 * the load ends here: without the offer nothing can reach the card, and the
 * bank releases a hold nobody came back for with its own sweep.
 */
async function offerAgain(rec: LoadIn<"STARTED">, ctx: LoadContext): Promise<LoadIn<"OFFERED">> {
  const token = ctx.bankToken?.(rec.bankAddress, rec.accountId);
  if (!token) {
    const why =
      "the bank's offer never arrived, and no access token to ask for it again is at hand; nothing reached the card, and the bank releases any hold it made once it is stale: load again";
    await ctx.journal?.loadFailed(rec.transactionId, why);
    throw new NetpurseError(Status.UNAUTHENTICATED, ErrorReason.ERROR_REASON_UNAUTHENTICATED, why);
  }
  const purse = await ctx.reader.readPurse();
  let r;
  try {
    r = await retrying(() =>
      ctx
        .bank(rec.bankAddress)
        .createLoadOffer(
          { transactionId: txnId(rec.transactionId), accountId: rec.accountId, amount: rec.amount, purse: purseState(purse) },
          { deadline: ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS, metadata: bearer(token) },
        ),
    );
  } catch (e) {
    if (offerRefused(e)) await ctx.journal?.loadFailed(rec.transactionId, (e as Error).message);
    throw e;
  }
  const offer = checkedOffer(r.offer, answerLacks("the bank's answer to CreateLoadOffer"));
  await ctx.journal?.loadOffered(rec.transactionId, offer);
  return { ...rec, state: "OFFERED", offer };
}

/** A load from its request on: the load server, the journaled card answer, the card's history or its zero-value S1 settle it. */
async function resumeRequested(rec: RequestedLoad, ctx: LoadContext, cardCounter: number, history: Buffer[]): Promise<Settlement | undefined> {
  const quiet: Step = () => {};
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  const offer = rec.offer;
  const server = ctx.load(offer.loadServerAddress);
  const noResponse = Buffer.alloc(0);

  if (rec.state === "REQUESTED") {
    // Did the load request get through? Without a LOAD command the load can simply be made again.
    const known = await retrying(() => server.getLoad({ transactionId: offer.transactionId }, { deadline })).catch((e: unknown) => {
      if (e instanceof ClientError && e.code === Status.NOT_FOUND) return undefined;
      throw e;
    });
    if (!known) return runLoad({ ...rec, state: "OFFERED" }, ctx, quiet);
    if (known.state === LoadState.LOAD_STATE_SETTLED) {
      const r = await server.completeLoad(
        { transactionId: offer.transactionId, loadResponse: noResponse, zeroValueInitializeResponse: noResponse },
        { deadline },
      );
      return settleAndConfirm(rec, ctx, quiet, settledIn(r, "CompleteLoad"));
    }
  }

  const loadResponse = rec.state === "CARD_ANSWERED" ? rec.loadResponse : undefined;
  const answered = loadResponse?.length === LoadResponse.size ? LoadResponse.decode(loadResponse) : undefined;
  if (loadResponse && answered?.result === LoadResult.LOADED) {
    // The card's own answer is journaled: it proves the credit, however long ago (its log keeps only 32 records).
    const r = await retrying(() =>
      server.completeLoad({ transactionId: offer.transactionId, loadResponse, zeroValueInitializeResponse: noResponse }, { deadline }),
    );
    return settleAndConfirm(rec, ctx, quiet, settledIn(r, "CompleteLoad"));
  }
  if (history.some((raw) => isCreditFor(raw, rec.transactionId))) {
    // The pending deposit: the card's own log carries the credit and its S3.
    const r = await retrying(() => server.reportCardHistory({ purseId: offer.purseId, cardLog: history }, { deadline }));
    const settled = r.settled.find((s) => s.transactionId?.value === rec.transactionId);
    return settled ? settleAndConfirm(rec, ctx, quiet, settled) : undefined;
  }
  // No credit in the card's log: if the card has not moved since INITIALIZE FOR LOAD, its zero-value S1 proves it was not loaded.
  if (cardCounter === rec.cardCounter) return proveNotLoaded(rec, ctx, quiet, loadResponse ?? noResponse);
  return undefined;
}

/** Whether a raw card log record is the credit of this load. */
function isCreditFor(raw: Buffer, transactionId: string): boolean {
  const { kind, transactionRef } = LogRecord.decode(raw);
  return kind === LogKind.LOAD && transactionRef === transactionId;
}
