// Collecting loyalty points an enrolled merchant granted the card
// (docs/loyalty.md, "Earning points"): the load protocol of FIG. 18 with the
// programme in place of the currency and the programme's benefits server in
// place of the load server. The card's INITIALIZE FOR LOAD for exactly the
// grant (S1) goes to the programme's security module, which signs the LOAD
// command (S2); the card credits its points purse and its answer (S3) goes
// back to be confirmed. A collection cut short after the card credited
// itself is finished from the card's own log on the next call.

import { Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ErrorReason, type PointsGrant, type PointsPurse } from "../gen/netpurse/card/v1/card.js";
import type { BenefitsServiceDefinition } from "../gen/netpurse/benefits/v1/benefits.js";
import type { PurchaseStep } from "../gen/netpurse/cardholder/v1/cardholder.js";
import { SW, swHex } from "../lib/apdu/apdu.js";
import { DEFAULT_DEADLINE_MS } from "../lib/grpc/client.js";
import { invalidField, NetpurseError, passOn } from "../lib/grpc/errors.js";
import { requireHostPort, requireName, requireTransactionId } from "../lib/ids.js";
import { formatMoney, isProgrammeCode, money } from "../lib/money.js";
import { LoadResponse, LoadResult, type LoadInitCommand } from "../lib/protocol/load.js";
import { LogKind } from "../lib/protocol/purse.js";
import type { PurseReader } from "./card/purse-reader.js";
import { pointsPurse } from "./card/purse-state.js";
import { retrying } from "./calls.js";

export type BenefitsClient = Client<typeof BenefitsServiceDefinition, DeadlineOptions>;

/** What the daemon's journal keeps of a grant's collection (client/daemon/journal.ts). */
export interface GrantJournal {
  grantRow(grantId: string): Promise<{ state: string; card_counter: number | null; load_response: Buffer | null } | undefined>;
  /** Before the card sees the LOAD. */
  grantLoadSent(grantId: string, cardCounter: number): Promise<void>;
  /** The card's answer to the LOAD. */
  grantAnswered(grantId: string, loadResponse: Buffer): Promise<void>;
}

export interface PointsContext {
  reader: PurseReader;
  benefits(address: string, siteId: string): BenefitsClient;
  journal?: GrantJournal;
  /** Per-call deadline towards the benefits server, ms. */
  callDeadlineMs?: number;
}

const MAX_POINTS = 0xffffffff;

const refused = (text: string) => new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_INVALID_FIELD, text);

/** The grant's fields, checked before the card is touched. */
function checkGrant(g: PointsGrant | undefined): LoadInitCommand & { purseId: string; siteAddress: string } {
  if (!g) throw invalidField("grant", "missing");
  const grantId = requireTransactionId(g.grantId, "grant.grant_id");
  if (!isProgrammeCode(g.programme)) throw invalidField("grant.programme", "must be a programme code 1000..65535");
  const p = g.points;
  if (!p || p.currency !== g.programme || p.exponent !== 0 || p.amountMinor < 1n || p.amountMinor > BigInt(MAX_POINTS)) {
    throw invalidField("grant.points", `must be 1..${MAX_POINTS} points of programme ${g.programme} (exponent 0)`);
  }
  if (g.purseId?.value.length !== 8) throw invalidField("grant.purse_id", "must be 8 bytes");
  requireName(g.siteId, "grant.site_id", 16);
  requireHostPort(g.siteAddress, "grant.site_address");
  if (!g.grantedAt) throw invalidField("grant.granted_at", "missing");
  return {
    amount: Number(p.amountMinor),
    currency: g.programme,
    bankId: g.siteId,
    dateTime: Math.floor(g.grantedAt.getTime() / 1000),
    transactionRef: grantId,
    purseId: Buffer.from(g.purseId.value).toString("hex"),
    siteAddress: g.siteAddress,
  };
}

/** Whether a grant's fields are well formed (a receipt's grant is kept only then). */
export function isGrantWellFormed(g: PointsGrant): boolean {
  try {
    checkGrant(g);
    return true;
  } catch {
    return false;
  }
}

/** The money purse of the card in the reader, which must be the grant's card. */
async function purseOfGrant(g: { purseId: string }, reader: PurseReader) {
  await reader.connect();
  const purse = await reader.readPurse();
  if (purse.purseId.toString("hex") !== g.purseId)
    throw refused(`the grant is for card ${g.purseId}, the card in the reader is ${purse.purseId.toString("hex")}`);
  return purse;
}

/** Refuses a grant for another card than the one in the reader, before anything is kept or asked. */
export async function requireGrantForCard(grant: PointsGrant | undefined, reader: PurseReader): Promise<void> {
  await purseOfGrant(checkGrant(grant), reader);
}

export async function earnPoints(grant: PointsGrant | undefined, ctx: PointsContext): Promise<{ points: PointsPurse; steps: PurchaseStep[] }> {
  const g = checkGrant(grant);
  const steps: PurchaseStep[] = [];
  const step = (name: string, detail: string) => steps.push({ name, detail });
  const deadline = ctx.callDeadlineMs ?? DEFAULT_DEADLINE_MS;
  const shown = formatMoney(money(g.amount, g.currency, 0));
  const site = ctx.benefits(g.siteAddress, g.bankId);
  step("grant", `${g.bankId} granted ${shown} to card ${g.purseId} (grant ${g.transactionRef})`);

  const purse = await purseOfGrant(g, ctx.reader);
  const held = (await ctx.reader.readPointsPurses()).find((x) => x.currency === g.currency);
  if (!held) throw refused(`the card holds no points purse of programme ${g.currency}; the issuer personalises one (--points)`);

  const row = await ctx.journal?.grantRow(g.transactionRef);
  // Already on the card (an earlier call was cut short after the LOAD): the journal, or the card's own log, holds its S3.
  const logged = (await ctx.reader.readLog()).find((r) => r.kind === LogKind.POINTS_CREDIT && r.transactionRef === g.transactionRef);
  let loadResponse: Buffer;
  if (row?.state === "CARD_ANSWERED" && row.load_response) {
    loadResponse = row.load_response;
    step("journal", "the card's answer to this grant's LOAD is journaled; it goes to be confirmed");
  } else if (logged) {
    loadResponse = LoadResponse.encode({ result: LoadResult.LOADED, counter: logged.counter, balance: logged.balance, s3: logged.cardSignature });
    await ctx.journal?.grantAnswered(g.transactionRef, loadResponse);
    step("card log", `the card credited this grant already (counter ${logged.counter}); its signature S3 goes to be confirmed`);
  } else {
    // A LOAD sent before whose credit is not in the log: only an unmoved counter proves the card never took it.
    if (row?.state === "LOAD_SENT" && row.card_counter !== purse.counter) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_IN_DOUBT,
        `the card's counter moved from ${row.card_counter} to ${purse.counter} since this grant's LOAD, and its log no longer shows whether it took it`,
      );
    }
    const init = await ctx.reader.initializeForLoad(g);
    step(
      "card",
      `INITIALIZE FOR LOAD of ${shown}: points ${init.parsed.balance} of at most ${init.parsed.maxBalance}, counter ${init.parsed.counter}, S1 made`,
    );
    const issued = await retrying(() => site.issuePointsCredit({ grantId: { value: g.transactionRef }, initializeResponse: init.raw }, { deadline })).catch(
      (e) => passOn(e, "the programme's security module did not sign the credit"),
    );
    step("LOAD command", `the programme's security module verified S1 and signed the LOAD command (S2)`);
    await ctx.journal?.grantLoadSent(g.transactionRef, init.parsed.counter);
    const answer = await ctx.reader.load(Buffer.from(issued.loadCommand));
    if (answer.sw !== SW.OK) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_CARD_REFUSED,
        `the card refused the LOAD command (SW ${swHex(answer.sw)}); nothing was credited`,
      );
    }
    if (answer.parsed!.result !== LoadResult.LOADED) step("card", `the card did not credit the points (result ${answer.parsed!.result})`);
    else step("card", `card credited ${shown}: points ${answer.parsed!.balance}, counter ${answer.parsed!.counter}, S3 made`);
    loadResponse = answer.raw;
    await ctx.journal?.grantAnswered(g.transactionRef, loadResponse);
  }
  await retrying(() => site.confirmPointsCredit({ grantId: { value: g.transactionRef }, loadResponse }, { deadline })).catch((e) =>
    passOn(e, "the programme did not confirm the credit"),
  );
  step("confirmation", `the programme's security module verified S3: grant ${g.transactionRef} is credited`);
  const after = (await ctx.reader.readPointsPurses()).find((x) => x.currency === g.currency)!;
  return { points: pointsPurse(after), steps };
}
