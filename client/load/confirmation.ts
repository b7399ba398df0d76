// Step 891: a load ends with the load server's settlement, whose
// confirmation, sealed for the bank, the client carries unopened to the bank,
// which posts or releases its hold. The normal load, the negative result
// handling and the recovery of open loads all end here.

import { Status } from "nice-grpc";
import { HoldState } from "../../gen/netpurse/bank/v1/bank.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { LoadOutcome, type SettledLoad } from "../../gen/netpurse/load/v1/load.js";
import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { NetpurseError, passOn } from "../../lib/grpc/errors.js";
import { retrying } from "../calls.js";
import type { LoadContext, Step } from "./load.js";

/** How a load ended: the load server's outcome, and what the bank did with its hold. */
export interface Settlement {
  outcome: LoadOutcome;
  holdState: HoldState;
}

export const outcomeName = (o: LoadOutcome) =>
  o === LoadOutcome.LOAD_OUTCOME_LOADED ? "loaded" : o === LoadOutcome.LOAD_OUTCOME_NOT_LOADED ? "not loaded" : "pending";

/** The error for a server's answer (`answer`) without a field the contract requires of it: the server's fault, never read with a guess. */
export const answerLacks = (answer: string) => (field: string) =>
  new NetpurseError(Status.INTERNAL, ErrorReason.ERROR_REASON_UNSPECIFIED, `${answer} has no ${field}`);

/** The settled load in the load server's answer to `call` (CompleteLoad, AbandonLoad). */
export function settledIn(r: { load: SettledLoad | undefined }, call: string): SettledLoad {
  if (!r.load) throw answerLacks(`the load server's answer to ${call}`)("load");
  return r.load;
}

/** The load server settled the load: journaled, then its sealed confirmation to the bank. */
export async function settleAndConfirm(
  rec: { transactionId: string; bankAddress: string },
  ctx: LoadContext,
  step: Step,
  settled: SettledLoad,
): Promise<Settlement> {
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
        .confirmLoad({ transactionId: settled.transactionId, confirmation: settled.confirmation }, { deadline: ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS }),
    );
    return r.holdState;
  } catch (e) {
    passOn(e, "the bank did not take the load server's confirmation (it is journaled and will be sent again)");
  }
}

/** Confirmations of earlier loads that came back with a load request: each goes to its bank. */
export async function forwardSettled(settled: SettledLoad[], ctx: LoadContext): Promise<void> {
  const journal = ctx.journal;
  if (!settled.length || !journal) return;
  const open = new Map((await journal.openLoads()).map((r) => [r.transactionId, r]));
  for (const s of settled) {
    const rec = open.get(s.transactionId?.value ?? "");
    if (!rec) continue;
    await journal.loadSettled(rec.transactionId, s);
    await confirmAtBank(rec.bankAddress, s, ctx).then(
      () => journal.loadDone(rec.transactionId),
      () => undefined, // left SETTLED: delivered again later
    );
  }
}
