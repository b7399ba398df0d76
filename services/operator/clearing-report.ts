// What the operator reads from clearing, made readable: the settlement
// day's positions and payouts (as a table and as CSV), a merchant's
// statement, a batch, what was not paid and why, and the audit with the
// cards at hand. The operator's commands and the main job share it.

import { existsSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import type { Money } from "../../gen/netpurse/card/v1/card.js";
import {
  BatchStatus,
  PartyKind,
  QuarantineReason,
  type Batch,
  type CardBalance,
  type ClearingServiceDefinition,
  type QuarantineEntry,
  type QuarantinedRecord,
  type RunAuditResponse,
  type Settlement,
  type StatementLine,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import type { CardFile } from "../../client/card/software-card.js";
import { csv } from "../../lib/csv.js";
import { readState } from "../../lib/apdu/state-log.js";
import { hexOf, purseId } from "../../lib/ids.js";
import { formatMinor, formatMoney, money } from "../../lib/money.js";
import { table } from "../../lib/table.js";
import { pointsRedeemedCsvRows, pointsRedeemedReport } from "../clearing/points-report.js";
import { Issuer } from "../issuer/issuer.js";

/** Clearing as the operator's tools call it, with deadlines. */
export type ClearingClient = Client<typeof ClearingServiceDefinition, DeadlineOptions>;

/** The largest page clearing serves: fewer round trips for the commands that read every page. */
export const PAGE_SIZE = 500;

/** Every item of a paged list: asks for the next page until clearing says there is none. */
export async function everyPage<T>(page: (token: string) => Promise<{ items: T[]; next: string }>): Promise<T[]> {
  const all: T[] = [];
  let token = "";
  do {
    const r = await page(token);
    all.push(...r.items);
    token = r.next;
  } while (token);
  return all;
}

/**
 * A settlement day whole: every page's merchants (the first page holds the
 * issuers, acquirers and banks too), in the order clearing gives one page:
 * positions by kind and party, payouts by payer and payee.
 */
export async function readSettlement(clearing: ClearingClient, day: string, deadlineMs: number): Promise<Settlement> {
  let whole: Settlement | undefined;
  let token = "";
  do {
    const r = await clearing.getSettlement({ day, pageSize: PAGE_SIZE, pageToken: token }, { deadline: deadlineMs });
    const s = r.settlement!;
    if (whole) {
      whole.positions.push(...s.positions);
      whole.payouts.push(...s.payouts);
    } else whole = s;
    token = r.nextPageToken;
  } while (token);
  whole.positions.sort((a, b) => a.kind - b.kind || a.partyId.localeCompare(b.partyId) || (a.net?.currency ?? 0) - (b.net?.currency ?? 0));
  whole.payouts.sort(
    (a, b) => a.payerKind - b.payerKind || a.payerId.localeCompare(b.payerId) || a.payeeKind - b.payeeKind || a.payeeId.localeCompare(b.payeeId),
  );
  return whole;
}

/** "1 purchase", "2 purchases". */
export const count = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

const enumName = (names: Record<number, string>, prefix: string, v: number) => (names[v] ?? String(v)).replace(prefix, "");

/** issuer, acquirer, merchant or bank. */
export const partyKindName = (k: PartyKind) => enumName(PartyKind, "PARTY_KIND_", k).toLowerCase();

/** A quarantine reason as the contract names it, e.g. BAD_CARD_SIGNATURE. */
export const reasonName = (r: QuarantineReason) => enumName(QuarantineReason, "QUARANTINE_REASON_", r);

const amount = (m: Money | undefined) => (m ? formatMoney(m) : "");

/** The day's positions and payouts for people: a heading, the positions table and the payouts table. */
export function settlementReport(s: Settlement): string {
  const state = s.closed ? `closed${s.closedAt ? ` at ${s.closedAt.toISOString()}` : ""}` : "open";
  const lines = [`settlement day ${s.day} (${state}): ${count(s.purchases, "purchase")}, ${count(s.loads, "load")}`, ""];
  lines.push(
    s.positions.length === 0
      ? "no positions: nothing was posted to this day"
      : table(
          ["party", "id", "receivable", "payable", "net", "transactions"],
          s.positions.map((p) => [partyKindName(p.kind), p.partyId, amount(p.receivable), amount(p.payable), amount(p.net), String(p.transactions)]),
        ),
  );
  lines.push("", "payouts:");
  lines.push(
    s.payouts.length === 0
      ? "none"
      : table(
          ["from", "to", "amount"],
          s.payouts.map((p) => [`${partyKindName(p.payerKind)} ${p.payerId}`, `${partyKindName(p.payeeKind)} ${p.payeeId}`, amount(p.amount)]),
        ),
  );
  // Points apart from money: never in a position, a payout or a money total.
  lines.push("", pointsRedeemedReport(s));
  return lines.join("\n");
}

const decimal = (m: Money | undefined) => (m ? formatMinor(m.amountMinor, m.exponent) : "");

/**
 * The day's positions and payouts as one CSV table (RFC 4180), one row
 * each: `record` says which. A position fills party, receivable, payable,
 * net and transactions; a payout fills party (the payer), counterparty
 * (the payee) and amount. Amounts are decimals in the currency's minor
 * units ("12.50"), the currency its ISO 4217 numeric code.
 */
export function settlementCsv(s: Settlement): string {
  const header = [
    "day",
    "record",
    "party_kind",
    "party_id",
    "counterparty_kind",
    "counterparty_id",
    "currency",
    "receivable",
    "payable",
    "net",
    "transactions",
    "amount",
    // Points have a column of their own: summing "amount" never mixes them with money.
    "points",
  ];
  const positions = s.positions.map((p) => [
    s.day,
    "position",
    partyKindName(p.kind),
    p.partyId,
    "",
    "",
    String((p.net ?? p.receivable ?? p.payable)?.currency ?? ""),
    decimal(p.receivable),
    decimal(p.payable),
    decimal(p.net),
    String(p.transactions),
    "",
    "",
  ]);
  const payouts = s.payouts.map((p) => [
    s.day,
    "payout",
    partyKindName(p.payerKind),
    p.payerId,
    partyKindName(p.payeeKind),
    p.payeeId,
    String(p.amount?.currency ?? ""),
    "",
    "",
    "",
    "",
    decimal(p.amount),
    "",
  ]);
  return csv(header, [...positions, ...payouts, ...pointsRedeemedCsvRows(s)]);
}

/** A merchant's statement for people: its lines, newest first, and its totals. */
export function statementReport(s: { merchantId: string; acquirerId: string; total: Money[]; purchases: number; day: string }, lines: StatementLine[]): string {
  const out = [`merchant ${s.merchantId}, paid through acquirer ${s.acquirerId}${s.day ? `, settlement day ${s.day}` : ", every day"}`, ""];
  out.push(
    lines.length === 0
      ? "no purchases posted"
      : table(
          ["posted at", "day", "transaction", "amount", "PSAM", "counter", "batch", "card"],
          lines.map((l) => [
            l.postedAt?.toISOString() ?? "",
            l.settlementDay,
            l.transactionId?.value ?? "",
            amount(l.amount),
            hexOf(l.psamId?.value),
            String(l.psamCounter),
            String(l.batchNumber),
            hexOf(l.purseId?.value),
          ]),
        ),
  );
  out.push("", `${count(s.purchases, "purchase")}, total ${s.total.length ? s.total.map(formatMoney).join(", ") : "0"}`);
  return out.join("\n");
}

/** A record's amount: the PSAM counts minor units and may not know the exponent (then 0), so such an amount is said in minor units. */
const recordAmount = (m: Money | undefined) => (m && m.exponent === 0 ? `${formatMoney(m)} (minor units)` : amount(m));

const recordDetail = (r: QuarantinedRecord) =>
  `PSAM ${hexOf(r.psamId?.value)} batch ${r.batchNumber} counter ${r.record?.psamCounter ?? "?"}: ${recordAmount(r.record?.amount)} to ${r.record?.merchantId?.value ?? "?"}, transaction ${r.record?.transactionId?.value ?? "?"}, card ${hexOf(r.record?.purseId?.value)}`;

/** One thing clearing did not pay, as a table row: when, what, why, and what it was. */
export function quarantineRow(e: QuarantineEntry): string[] {
  const x = e.entry;
  switch (x?.$case) {
    case "record":
      return [x.value.quarantinedAt?.toISOString() ?? "", "record", reasonName(x.value.reason), recordDetail(x.value)];
    case "rejectedBatch":
      return [
        x.value.receivedAt?.toISOString() ?? "",
        "batch",
        reasonName(x.value.rejectedBecause),
        `PSAM ${hexOf(x.value.psamId?.value)} batch ${x.value.batchNumber} from ${x.value.terminalId}: ${count(x.value.count, "record")}, ${amount(x.value.total)}, rejected`,
      ];
    case "conflictingBatch":
      return [
        x.value.receivedAt?.toISOString() ?? "",
        "batch",
        reasonName(x.value.rejectedBecause),
        `PSAM ${hexOf(x.value.psamId?.value)} batch ${x.value.batchNumber} from ${x.value.terminalId}: ${count(x.value.count, "record")}, ${amount(x.value.total)}, ` +
          "a second batch under a number already taken: its records were counted once each; the PSAM's batch key is known outside it",
      ];
    case "load": {
      const l = x.value.load;
      return [
        x.value.quarantinedAt?.toISOString() ?? "",
        "load",
        reasonName(x.value.reason),
        `transaction ${l?.transactionId?.value ?? "?"}: ${amount(l?.amount)} from bank ${l?.bankId ?? "?"} to card ${hexOf(l?.purseId?.value)}`,
      ];
    }
    default:
      return ["", "unknown", "", "an entry this version does not know"];
  }
}

/** What clearing did not pay, and why: a table, or a line saying there is nothing. */
export function quarantineReport(entries: QuarantineEntry[]): string {
  if (entries.length === 0) return "nothing quarantined";
  return `${entries.length} quarantined:\n${table(["when", "what", "reason", "detail"], entries.map(quarantineRow))}`;
}

/** Every quarantined entry, every page. */
export async function listQuarantined(clearing: ClearingClient, deadlineMs: number): Promise<QuarantineEntry[]> {
  return everyPage(async (pageToken) => {
    const r = await clearing.listQuarantined({ pageSize: PAGE_SIZE, pageToken }, { deadline: deadlineMs });
    return { items: r.entries, next: r.nextPageToken };
  });
}

/** A batch's status for people, and its quarantined records. */
export function batchReport(b: Batch, quarantined: QuarantinedRecord[]): string {
  const status = enumName(BatchStatus, "BATCH_STATUS_", b.status);
  const lines = [
    `PSAM ${hexOf(b.psamId?.value)} batch ${b.batchNumber}: ${status}${b.status === BatchStatus.BATCH_STATUS_REJECTED ? ` (${reasonName(b.rejectedBecause)})` : ""}`,
    `  ${count(b.count, "record")}, total ${amount(b.total)}; ${b.posted} posted, ${b.quarantined} quarantined`,
    `  sent by ${b.terminalId || "?"}, received ${b.receivedAt?.toISOString() ?? "?"}, sent again ${b.resubmissions} times, settlement day ${b.settlementDay || "-"}`,
  ];
  if (quarantined.length) {
    lines.push(
      "",
      table(
        ["counter", "reason", "detail"],
        quarantined.map((r) => [String(r.record?.psamCounter ?? ""), reasonName(r.reason), recordDetail(r)]),
      ),
    );
  }
  return lines.join("\n");
}

/** A card at hand, as the audit reads it. */
export interface CardAtHand {
  file: string;
  purseId: string;
  balance: Money;
  /** What the issuer put on it at personalisation. */
  openingValue: Money;
}

/** The software card files under a folder (DATA/cards): every *.card.json. */
export async function cardFilesIn(dir: string): Promise<string[]> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === "ENOENT") return [];
    throw e;
  }
  return names
    .filter((n) => n.endsWith(".card.json"))
    .sort()
    .map((n) => join(dir, n));
}

/**
 * Reads each card's balance from its file and the log of changes beside it,
 * without opening the card (no command runs, nothing is written), and its
 * opening value from the issuer's records (its credits at personalisation).
 */
export async function readCardsAtHand(files: string[], issuerDir: string): Promise<CardAtHand[]> {
  if (files.length === 0) return [];
  if (!existsSync(Issuer.keysPath(issuerDir))) {
    throw new Error(`no issuer records in ${issuerDir}: the audit takes each card's opening value from them (give --data DIR of the installation)`);
  }
  const issuer = await Issuer.open(issuerDir);
  try {
    const cards: CardAtHand[] = [];
    for (const file of files) {
      let card: CardFile;
      try {
        card = await readState<CardFile>(file);
      } catch (e) {
        throw new Error(`cannot read card ${file}: ${(e as Error).message}`, { cause: e });
      }
      if (card.format !== 1 || !/^[0-9a-f]{16}$/.test(card.purseId) || !Number.isSafeInteger(card.balance)) {
        throw new Error(`${file}: not a software card file`);
      }
      const opening = await issuer.openingValue(card.purseId);
      if (!opening) throw new Error(`card ${card.purseId} (${file}) was not personalised by the issuer in ${issuerDir}`);
      cards.push({
        file,
        purseId: card.purseId,
        balance: money(card.balance, card.currency, card.exponent),
        openingValue: money(opening.amountMinor, opening.currency, opening.exponent),
      });
    }
    return cards;
  } finally {
    await issuer.close();
  }
}

/** The cards as RunAudit takes them. */
export const auditCards = (cards: CardAtHand[]): CardBalance[] =>
  cards.map((c) => ({ purseId: purseId(c.purseId), balance: c.balance, openingValue: c.openingValue }));

/** The audit for people: the cards read, each check with ok or FAILED and its detail, and the verdict. */
export function auditReport(cards: CardAtHand[], r: RunAuditResponse): string {
  const lines: string[] = [];
  for (const c of cards) lines.push(`card ${c.purseId} (${c.file}): balance ${formatMoney(c.balance)}, opening value ${formatMoney(c.openingValue)}`);
  if (cards.length) lines.push("");
  const width = Math.max(0, ...r.checks.map((c) => c.name.length));
  for (const c of r.checks) lines.push(`${c.ok ? "ok    " : "FAILED"}  ${c.name.padEnd(width)}  ${c.detail}`);
  lines.push(
    "",
    `${r.ok ? "audit clean" : "AUDIT FAILED"}: ${r.checks.filter((c) => c.ok).length} of ${r.checks.length} checks hold; ${r.transactions} transactions posted, ${r.quarantined} quarantined`,
  );
  return lines.join("\n");
}

/**
 * Runs the audit with the cards at hand and reads what was not paid: the
 * report to print (the checks, then every quarantined entry) and whether
 * every check holds.
 */
export async function audit(clearing: ClearingClient, cards: CardAtHand[], deadlineMs: number): Promise<{ ok: boolean; report: string }> {
  const r = await clearing.runAudit({ cards: auditCards(cards) }, { deadline: deadlineMs });
  const quarantined = await listQuarantined(clearing, deadlineMs);
  const lines = [auditReport(cards, r), "", quarantineReport(quarantined)];
  const legacy = recordedBeforeClearing(quarantined);
  if (!r.ok && legacy > 0) {
    lines.push(
      "",
      `${legacy} of the quarantined records were written by PSAMs before batch records carried the card's session (a data folder`,
      "from before clearing): clearing cannot check the card's signature on them, so those purchases are not in its ledger and a",
      "card that made them holds less than the ledger says. A fresh data folder audits clean.",
    );
  }
  return { ok: r.ok, report: lines.join("\n") };
}

/**
 * How many quarantined records a PSAM wrote before batch records carried the
 * card's session: READ BATCH RECORD gives key version 0 (no card key has
 * version 0) and zeros for the session there.
 */
export function recordedBeforeClearing(entries: QuarantineEntry[]): number {
  return entries.filter((e) => e.entry?.$case === "record" && e.entry.value.record?.keyVersion === 0).length;
}
