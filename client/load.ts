// The client module's load (FIG. 17, 18A-C): ask the bank for a load offer
// (the bank holds the funds), package the card's INITIALIZE FOR LOAD into
// one load request for the load server (the patent's "emulating security
// module commands"), hand the LOAD command to the card, and carry the load
// server's sealed confirmation to the bank. A negative result from the card
// is answered at once with the card's zero-value S1, so that only a card
// that proves it was not loaded gets the bank's hold released. Every step is
// journaled first: a load whose confirmation could not be delivered is
// finished later from the card's own log (the pending deposit).

import { randomUUID } from "node:crypto";
import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { HoldState, LoadOffer, type BankServiceDefinition } from "../gen/netpurse/bank/v1/bank.js";
import { ErrorReason, type Money } from "../gen/netpurse/card/v1/card.js";
import type { PurchaseStep } from "../gen/netpurse/cardholder/v1/cardholder.js";
import { LoadOutcome, LoadState, SettledLoad, type LoadServiceDefinition } from "../gen/netpurse/load/v1/load.js";
import { swHex, SW } from "../lib/apdu/apdu.js";
import { invalidField, NetpurseError, passOn } from "../lib/grpc/errors.js";
import { hexOf, txnId } from "../lib/ids.js";
import { formatMoney, MAX_CARD_AMOUNT } from "../lib/money.js";
import { LoadResponse, LoadResult, type LoadInitCommand } from "../lib/protocol/load.js";
import { LogKind, LogRecord } from "../lib/protocol/purse.js";
import type { PurseReader } from "./card/purse-reader.js";
import { isFinal, retrying } from "./calls.js";
import { purseState } from "./card/purse-state.js";

export type BankClient = Client<typeof BankServiceDefinition, DeadlineOptions>;
export type LoadClient = Client<typeof LoadServiceDefinition, DeadlineOptions>;

/** Where a load stands on the client's side, as its journal records it. */
export type ClientLoadState = "STARTED" | "OFFERED" | "REQUESTED" | "LOAD_SENT" | "CARD_ANSWERED" | "SETTLED" | "DONE" | "FAILED";

/** A load as the journal holds it. */
export interface LoadRecord {
  transactionId: string;
  bankAddress: string;
  accountId: string;
  amount: Money;
  state: ClientLoadState;
  /** The card the load is for, hex: recovery waits for this card. */
  purseId: string;
  offer?: LoadOffer;
  /** The card's counter when it answered INITIALIZE FOR LOAD: a zero-value proof is only worth asking while it has not moved. */
  cardCounter?: number;
  /** The load server's reference for a zero-value INITIALIZE FOR LOAD, given with the LOAD command. */
  proofReference?: string;
  loadResponse?: Buffer;
  settled?: SettledLoad;
}

/** The client's log of each load step, so that nothing the card was credited with is lost. */
export interface LoadJournal {
  loadStarted(r: { transactionId: string; bankAddress: string; accountId: string; amount: Money; purseId: string }): Promise<void>;
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

export interface LoadContext {
  reader: PurseReader;
  bank(address: string): BankClient;
  load(address: string): LoadClient;
  journal?: LoadJournal;
  callDeadlineMs?: number;
}

export interface LoadResult {
  transactionId: string;
  outcome: LoadOutcome;
  holdState: HoldState;
  steps: PurchaseStep[];
}

/** How many of the card's newest log records go with each load request, so pending loads settle from them. */
const CARD_LOG_SENT = 8;

type Step = (name: string, detail: string) => void;

const outcomeName = (o: LoadOutcome) =>
  o === LoadOutcome.LOAD_OUTCOME_LOADED ? "loaded" : o === LoadOutcome.LOAD_OUTCOME_NOT_LOADED ? "not loaded" : "pending";

/** The INITIALIZE FOR LOAD command an offer stands for; `amount` 0 makes the zero-value request of the negative result handling. */
export function loadInitCommand(offer: LoadOffer, amount = Number(offer.amount!.amountMinor)): LoadInitCommand {
  return {
    amount,
    currency: offer.amount!.currency,
    bankId: offer.bankId,
    dateTime: Math.floor(offer.offeredAt!.getTime() / 1000),
    transactionRef: offer.transactionId!.value,
  };
}

/** Loads `amount` onto the card from `accountId` at the bank. */
export async function loadCard(p: { bankAddress: string; accountId: string; amount: Money }, ctx: LoadContext): Promise<LoadResult> {
  const a = p.amount;
  if (a.amountMinor <= 0n || a.amountMinor > BigInt(MAX_CARD_AMOUNT)) throw invalidField("amount.amount_minor", `must be 1..${MAX_CARD_AMOUNT}`);
  const steps: PurchaseStep[] = [];
  const step: Step = (name, detail) => steps.push({ name, detail });
  const deadline = ctx.callDeadlineMs ?? 15_000;
  const shown = formatMoney(a);

  // Step 872: the card's balance and room, read before the bank is asked.
  await ctx.reader.connect();
  const purse = await ctx.reader.readPurse();
  step(
    "card",
    `purse ${purse.purseId.toString("hex")}: balance ${formatMoney({ amountMinor: purse.balance, currency: purse.currency, exponent: purse.exponent })} of at most ${formatMoney({ amountMinor: purse.maxBalance, currency: purse.currency, exponent: purse.exponent })}`,
  );

  const id = randomUUID();
  await ctx.journal?.loadStarted({ transactionId: id, bankAddress: p.bankAddress, accountId: p.accountId, amount: a, purseId: purse.purseId.toString("hex") });
  let offer: LoadOffer;
  try {
    const r = await retrying(() =>
      ctx.bank(p.bankAddress).createLoadOffer({ transactionId: txnId(id), accountId: p.accountId, amount: a, purse: purseState(purse) }, { deadline }),
    );
    offer = r.offer!;
  } catch (e) {
    if (isFinal(e)) await ctx.journal?.loadFailed(id, (e as Error).message);
    passOn(e, "the bank made no load offer");
  }
  await ctx.journal?.loadOffered(id, offer);
  step("load offer", `bank ${offer.bankId} holds ${shown} on account ${p.accountId} for transaction ${id}; load server ${offer.loadServerAddress}`);
  const rec: LoadRecord = {
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
async function runLoad(rec: LoadRecord, ctx: LoadContext, step: Step): Promise<{ outcome: LoadOutcome; holdState: HoldState }> {
  const offer = rec.offer!;
  const id = rec.transactionId;
  const deadline = ctx.callDeadlineMs ?? 15_000;
  const server = ctx.load(offer.loadServerAddress);

  await ctx.reader.connect();
  const cardLog = await ctx.reader.readLogRaw(CARD_LOG_SENT);
  const init = await ctx.reader.initializeForLoad(loadInitCommand(offer));
  step(
    "load request",
    `INITIALIZE FOR LOAD answered with S1 ${init.parsed.s1.toString("hex")} (card counter ${init.parsed.counter}); sent with ${cardLog.length} log records to ${offer.loadServerAddress}`,
  );
  await ctx.journal?.loadRequested(id, init.parsed.counter);
  rec = { ...rec, state: "REQUESTED", cardCounter: init.parsed.counter };
  let issued;
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
        { deadline },
      ),
    );
  } catch (e) {
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
      if (isFinal(abandonError)) await ctx.journal?.loadFailed(id, (e as Error).message);
      passOn(e, "the load server refused the load request");
    }
    await settleAndConfirm(rec, ctx, step, ended);
    passOn(e, "the load server refused the load request (the bank's hold is released)");
  }
  await forwardSettled(issued.settled, ctx);
  step("LOAD command", `security module ${hexOf(issued.hsmId)} signed it (S2, counter ${issued.hsmCounter})`);

  const proofReference = issued.proofReference?.value ?? "";
  await ctx.journal?.loadSent(id, proofReference);
  rec = { ...rec, state: "LOAD_SENT", proofReference };
  const answer = await ctx.reader.load(Buffer.from(issued.loadCommand));
  if (answer.sw !== SW.OK) {
    step("card", `the card refused the LOAD command (SW ${swHex(answer.sw)})`);
    return proveNotLoaded(rec, ctx, step, Buffer.alloc(0));
  }
  await ctx.journal?.loadAnswered(id, answer.raw);
  const a = answer.parsed!;
  if (a.result !== LoadResult.LOADED) {
    step("card", `the card answered a negative result (code ${a.result}); negative result handling`);
    return proveNotLoaded(rec, ctx, step, answer.raw);
  }
  step(
    "card credit",
    `card credited: balance ${formatMoney({ amountMinor: a.balance, currency: offer.amount!.currency, exponent: offer.amount!.exponent })}, counter ${a.counter}, S3 ${a.s3.toString("hex")}`,
  );
  let settled: SettledLoad;
  try {
    settled = (
      await retrying(() =>
        server.completeLoad({ transactionId: offer.transactionId, loadResponse: answer.raw, zeroValueInitializeResponse: Buffer.alloc(0) }, { deadline }),
      )
    ).load!;
  } catch (e) {
    if (isFinal(e)) passOn(e, "the load server did not accept the card's answer; the load stays pending until the card's history proves it");
    passOn(
      e,
      "the card is loaded; the load server could not be told, so the load is pending and will be confirmed at the card's next transaction or 'netpurse card sync'",
    );
  }
  return settleAndConfirm(rec, ctx, step, settled);
}

/**
 * Negative result handling on the client's side: a zero-value INITIALIZE FOR
 * LOAD with the original elements, at once, and the card's fresh S1 to the
 * load server, which decides.
 */
async function proveNotLoaded(rec: LoadRecord, ctx: LoadContext, step: Step, loadResponse: Buffer): Promise<{ outcome: LoadOutcome; holdState: HoldState }> {
  const offer = rec.offer!;
  const deadline = ctx.callDeadlineMs ?? 15_000;
  // The reference exists only since the LOAD command does: no proof of an unloaded card can be made before it.
  const reference =
    rec.proofReference ||
    (await retrying(() => ctx.load(offer.loadServerAddress).getLoad({ transactionId: offer.transactionId }, { deadline }))).proofReference?.value;
  if (!reference)
    throw new NetpurseError(
      Status.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_WRONG_STATE,
      `load ${rec.transactionId} has no LOAD command to prove anything against`,
    );
  const zero = await ctx.reader.initializeForLoad({ ...loadInitCommand(offer, 0), transactionRef: reference });
  step("zero-value load", `the card's zero-value S1 ${zero.parsed.s1.toString("hex")} (counter ${zero.parsed.counter}) goes to the load server as its proof`);
  const r = await retrying(() =>
    ctx
      .load(offer.loadServerAddress)
      .completeLoad({ transactionId: offer.transactionId, loadResponse, zeroValueInitializeResponse: zero.raw }, { deadline: ctx.callDeadlineMs ?? 15_000 }),
  );
  return settleAndConfirm(rec, ctx, step, r.load!);
}

/** The settlement of a load that never got a LOAD command: the load server's own (refused), or made now (abandoned). */
async function endWithoutCommand(rec: LoadRecord, ctx: LoadContext): Promise<SettledLoad> {
  const offer = rec.offer!;
  const server = ctx.load(offer.loadServerAddress);
  const deadline = ctx.callDeadlineMs ?? 15_000;
  const r = await retrying(() =>
    server.abandonLoad(
      { transactionId: offer.transactionId, bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization },
      { deadline },
    ),
  );
  return r.load!;
}

/** Step 891: the sealed confirmation to the bank. */
async function settleAndConfirm(rec: LoadRecord, ctx: LoadContext, step: Step, settled: SettledLoad): Promise<{ outcome: LoadOutcome; holdState: HoldState }> {
  await ctx.journal?.loadSettled(rec.transactionId, settled);
  step("confirmation", `the load server settled the load: ${outcomeName(settled.outcome)}; its confirmation, sealed for the bank, goes on unopened`);
  const holdState = await confirmAtBank(rec.bankAddress, settled, ctx);
  await ctx.journal?.loadDone(rec.transactionId);
  step(
    "bank",
    holdState === HoldState.HOLD_STATE_POSTED
      ? "the bank verified the confirmation and debited the account"
      : "the bank verified the confirmation and released the hold",
  );
  return { outcome: settled.outcome, holdState };
}

async function confirmAtBank(bankAddress: string, settled: SettledLoad, ctx: LoadContext): Promise<HoldState> {
  try {
    const r = await retrying(() =>
      ctx
        .bank(bankAddress)
        .confirmLoad({ transactionId: settled.transactionId, confirmation: settled.confirmation }, { deadline: ctx.callDeadlineMs ?? 15_000 }),
    );
    return r.holdState;
  } catch (e) {
    passOn(e, "the bank did not take the load server's confirmation (it is journaled and will be sent again)");
  }
}

/** Confirmations of earlier loads that came back with a load request: each goes to its bank. */
async function forwardSettled(settled: SettledLoad[], ctx: LoadContext): Promise<void> {
  if (!settled.length || !ctx.journal) return;
  const open = new Map((await ctx.journal.openLoads()).map((r) => [r.transactionId, r]));
  for (const s of settled) {
    const rec = open.get(s.transactionId?.value ?? "");
    if (!rec) continue;
    await ctx.journal.loadSettled(rec.transactionId, s);
    await confirmAtBank(rec.bankAddress, s, ctx).then(
      () => ctx.journal!.loadDone(rec.transactionId),
      () => undefined, // left SETTLED: delivered again later
    );
  }
}

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

const RESUME_ORDER: Record<ClientLoadState, number> = { REQUESTED: 0, LOAD_SENT: 0, CARD_ANSWERED: 0, SETTLED: 1, STARTED: 2, OFFERED: 2, DONE: 3, FAILED: 3 };

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
  return rec.loadResponse?.length !== LoadResponse.size || LoadResponse.decode(rec.loadResponse).result !== LoadResult.LOADED;
}

async function resumeLoad(
  rec: LoadRecord,
  ctx: LoadContext,
  cardCounter: number,
  history: Buffer[],
): Promise<{ outcome: LoadOutcome; holdState: HoldState } | undefined> {
  const quiet: Step = () => {};
  const deadline = ctx.callDeadlineMs ?? 15_000;
  if (rec.state === "SETTLED") return settleAndConfirm(rec, ctx, quiet, rec.settled!);
  if (rec.state === "STARTED") {
    // The bank may hold the funds for an offer that never reached us: asking again with the same transaction id gets that same offer.
    const purse = await ctx.reader.readPurse();
    const r = await retrying(() =>
      ctx
        .bank(rec.bankAddress)
        .createLoadOffer({ transactionId: txnId(rec.transactionId), accountId: rec.accountId, amount: rec.amount, purse: purseState(purse) }, { deadline }),
    );
    await ctx.journal?.loadOffered(rec.transactionId, r.offer!);
    return runLoad({ ...rec, state: "OFFERED", offer: r.offer! }, ctx, quiet);
  }
  if (rec.state === "OFFERED") return runLoad(rec, ctx, quiet);
  const offer = rec.offer!;
  const server = ctx.load(offer.loadServerAddress);

  if (rec.state === "REQUESTED") {
    // Did the load request get through? Without a LOAD command the load can simply be made again.
    const known = await retrying(() => server.getLoad({ transactionId: offer.transactionId }, { deadline })).catch((e: unknown) => {
      if (e instanceof ClientError && e.code === Status.NOT_FOUND) return undefined;
      throw e;
    });
    if (!known) return runLoad({ ...rec, state: "OFFERED" }, ctx, quiet);
    if (known.state === LoadState.LOAD_STATE_SETTLED)
      return settleAndConfirm(
        rec,
        ctx,
        quiet,
        (
          await server.completeLoad(
            { transactionId: offer.transactionId, loadResponse: Buffer.alloc(0), zeroValueInitializeResponse: Buffer.alloc(0) },
            { deadline },
          )
        ).load!,
      );
  }

  const answered = rec.loadResponse?.length === LoadResponse.size ? LoadResponse.decode(rec.loadResponse) : undefined;
  if (answered?.result === LoadResult.LOADED) {
    // The card's own answer is journaled: it proves the credit, however long ago (its log keeps only 32 records).
    const r = await retrying(() =>
      server.completeLoad({ transactionId: offer.transactionId, loadResponse: rec.loadResponse!, zeroValueInitializeResponse: Buffer.alloc(0) }, { deadline }),
    );
    return settleAndConfirm(rec, ctx, quiet, r.load!);
  }
  if (history.some((raw) => isCreditFor(raw, rec.transactionId))) {
    // The pending deposit: the card's own log carries the credit and its S3.
    const r = await retrying(() => server.reportCardHistory({ purseId: offer.purseId, cardLog: history }, { deadline }));
    const settled = r.settled.find((s) => s.transactionId?.value === rec.transactionId);
    return settled ? settleAndConfirm(rec, ctx, quiet, settled) : undefined;
  }
  // No credit in the card's log: if the card has not moved since INITIALIZE FOR LOAD, its zero-value S1 proves it was not loaded.
  if (rec.cardCounter !== undefined && cardCounter === rec.cardCounter) return proveNotLoaded(rec, ctx, quiet, rec.loadResponse ?? Buffer.alloc(0));
  return undefined;
}

/** Whether a raw card log record is the credit of this load. */
function isCreditFor(raw: Buffer, transactionId: string): boolean {
  const { kind, transactionRef } = LogRecord.decode(raw);
  return kind === LogKind.LOAD && transactionRef === transactionId;
}
