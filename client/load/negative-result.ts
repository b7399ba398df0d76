// Negative result handling on the client's side (docs/load.md): when the
// card answers LOAD with a negative result, refuses it, or its answer is
// lost, nothing is taken on the client's word. The card is asked at once for
// a zero-value INITIALIZE FOR LOAD with the original load's elements and the
// proof reference the load server made with the LOAD command; its fresh S1
// goes to the load server, which decides. Only a card that proves it was not
// loaded gets the bank's hold released.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { NetpurseError } from "../../lib/grpc/errors.js";
import { retrying } from "../calls.js";
import { settleAndConfirm, settledIn, type Settlement } from "./confirmation.js";
import type { LoadContext, Step } from "./load.js";
import { loadInitCommand } from "./offer.js";
import type { RequestedLoad } from "./record.js";

/**
 * The zero-value INITIALIZE FOR LOAD with the original elements, at once, and
 * the card's fresh S1 (with its answer to LOAD, if any) to the load server,
 * which settles the load; then the confirmation to the bank.
 */
export async function proveNotLoaded(rec: RequestedLoad, ctx: LoadContext, step: Step, loadResponse: Buffer): Promise<Settlement> {
  const offer = rec.offer;
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  // The reference exists only since the LOAD command does: no proof of an unloaded card can be made before it.
  const journaled = rec.state === "REQUESTED" ? "" : rec.proofReference;
  // The load server shows the reference only to the holder of the load's offer: its sealed authorisation is the proof.
  const holder = { bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization };
  const asked = () => ctx.load(offer.loadServerAddress).getLoad({ transactionId: offer.transactionId, ...holder }, { deadline });
  const reference = journaled || (await retrying(asked)).proofReference?.value;
  if (!reference)
    throw new NetpurseError(
      Status.FAILED_PRECONDITION,
      ErrorReason.ERROR_REASON_WRONG_STATE,
      `load ${rec.transactionId} has no LOAD command to prove anything against`,
    );
  const zero = await ctx.reader.initializeForLoad({ ...loadInitCommand(offer, 0), transactionRef: reference });
  step("zero-value load", `the card's zero-value S1 ${zero.parsed.s1.toString("hex")} (counter ${zero.parsed.counter}) goes to the load server as its proof`);
  const r = await retrying(() =>
    ctx.load(offer.loadServerAddress).completeLoad({ transactionId: offer.transactionId, loadResponse, zeroValueInitializeResponse: zero.raw }, { deadline }),
  );
  return settleAndConfirm(rec, ctx, step, settledIn(r, "CompleteLoad"));
}
