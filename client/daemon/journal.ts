// The client daemon's journal: every purchase and load step it took, so that
// a card answer, a debit result, a receipt or a load confirmation that did
// not arrive is fetched again later, and nothing the card paid for or was
// credited with is lost.

import { LoadOffer } from "../../gen/netpurse/bank/v1/bank.js";
import { Money, PointsGrant, Sealed } from "../../gen/netpurse/card/v1/card.js";
import { SettledLoad } from "../../gen/netpurse/load/v1/load.js";
import { checkedOffer } from "../load/offer.js";
import type { ClientLoadState, LoadJournal, LoadRecord } from "../load/record.js";
import { PaymentOffer, Receipt } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { Db, Queryable } from "../../lib/store/db.js";
import { isGrantWellFormed } from "../points.js";
import type { ClientPurchaseState, DebitSent, PurchaseJournal, PurchaseRecord } from "../purchase.js";
import { dieAt } from "./test-crash.js";

export const CLIENT_MIGRATIONS = [
  `CREATE TABLE client_purchases (
     transaction_id TEXT PRIMARY KEY,
     offer BLOB NOT NULL,
     state TEXT NOT NULL,
     purse_id TEXT,
     card_counter INTEGER,
     psam_id TEXT,
     psam_counter INTEGER,
     completion_token BLOB,
     expected_card_signature BLOB,
     issued_result_m BLOB,
     card_status_word INTEGER,
     debit_response BLOB,
     result_m BLOB,
     receipt BLOB,
     proof_reported INTEGER NOT NULL DEFAULT 0,
     error TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
  `CREATE TABLE client_loads (
     transaction_id TEXT PRIMARY KEY,
     bank_address TEXT NOT NULL,
     account_id TEXT NOT NULL,
     amount BLOB NOT NULL,
     state TEXT NOT NULL,
     offer BLOB,
     card_counter INTEGER,
     load_response BLOB,
     settled BLOB,
     error TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
  `ALTER TABLE client_loads ADD COLUMN purse_id TEXT NOT NULL DEFAULT '';
   ALTER TABLE client_loads ADD COLUMN proof_reference TEXT;`,
  // The card's answer was lost and its log proves it never debited: a fact of its own, not a status word.
  `ALTER TABLE client_purchases ADD COLUMN card_log_proves_no_debit INTEGER NOT NULL DEFAULT 0;
   UPDATE client_purchases SET card_log_proves_no_debit = 1, card_status_word = NULL, debit_response = NULL WHERE card_status_word = 28416;`,
  // The client's trusted agent holds the digest of the card signature the PSAM expects, never the signature itself.
  `ALTER TABLE client_purchases RENAME COLUMN expected_card_signature TO expected_signature_digest;`,
  // The merchant's access secret for the order: with it, and only with it, GetOrder shows the goods again.
  `ALTER TABLE client_purchases ADD COLUMN order_access_secret BLOB;`,
  // The caller's request id of a LoadCard or PayOffer: a retry under it finds this row, never makes a second load or purchase.
  `ALTER TABLE client_purchases ADD COLUMN request_id TEXT;
   ALTER TABLE client_loads ADD COLUMN request_id TEXT;
   CREATE UNIQUE INDEX client_purchases_request_id ON client_purchases (request_id) WHERE request_id IS NOT NULL;
   CREATE UNIQUE INDEX client_loads_request_id ON client_loads (request_id) WHERE request_id IS NOT NULL;`,
  // Points a merchant granted the card (a receipt's points grant), kept until the card holds them: a collection
  // cut short is tried again, never lost.
  `CREATE TABLE client_grants (
     grant_id TEXT PRIMARY KEY,
     grant BLOB NOT NULL,
     state TEXT NOT NULL,
     error TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
  // A points credit's LOAD sent to the card (at this card counter), and the card's answer to it: until the answer is
  // known, the card is used for nothing else, as for a money load.
  `ALTER TABLE client_grants ADD COLUMN card_counter INTEGER;
   ALTER TABLE client_grants ADD COLUMN load_response BLOB;`,
];

/** A kept grant's row: OPEN (to collect), LOAD_SENT (the card may have credited it), CARD_ANSWERED, CREDITED or FAILED. */
export interface GrantRow {
  state: "OPEN" | "LOAD_SENT" | "CARD_ANSWERED" | "CREDITED" | "FAILED";
  card_counter: number | null;
  load_response: Buffer | null;
}

/** Keeps a grant (a grant kept before stays as it is). */
async function keepGrant(q: Queryable, grant: PointsGrant): Promise<void> {
  const now = new Date().toISOString();
  await q.run("INSERT INTO client_grants (grant_id, grant, state, created_at, updated_at) VALUES (?, ?, 'OPEN', ?, ?) ON CONFLICT DO NOTHING", [
    grant.grantId!.value,
    Buffer.from(PointsGrant.encode(grant).finish()),
    now,
    now,
  ]);
}

export interface JournalRow {
  transaction_id: string;
  offer: Buffer;
  state: ClientPurchaseState;
  purse_id: string | null;
  card_counter: number | null;
  psam_id: string | null;
  psam_counter: number | null;
  completion_token: Buffer | null;
  expected_signature_digest: Buffer | null;
  issued_result_m: Buffer | null;
  card_status_word: number | null;
  debit_response: Buffer | null;
  card_log_proves_no_debit: number;
  result_m: Buffer | null;
  receipt: Buffer | null;
  proof_reported: number;
  error: string | null;
  request_id: string | null;
}

const sealedBytes = (s: Sealed | undefined) => (s ? Buffer.from(Sealed.encode(s).finish()) : null);
const sealedOf = (b: Buffer | null) => (b ? Sealed.decode(b) : undefined);

/** A journal row as the purchase code sees it. */
export function toRecord(r: JournalRow): PurchaseRecord {
  return {
    transactionId: r.transaction_id,
    offer: PaymentOffer.decode(r.offer),
    state: r.state,
    ...(r.purse_id !== null ? { purseId: r.purse_id } : {}),
    ...(r.card_counter !== null ? { cardCounter: r.card_counter } : {}),
    ...(r.psam_id !== null ? { psamId: r.psam_id } : {}),
    ...(r.psam_counter !== null ? { psamCounter: r.psam_counter } : {}),
    ...(r.completion_token ? { completionToken: r.completion_token } : {}),
    ...(r.expected_signature_digest ? { expectedSignatureDigest: r.expected_signature_digest } : {}),
    issuedResultM: sealedOf(r.issued_result_m),
    ...(r.card_status_word !== null ? { cardStatusWord: r.card_status_word } : {}),
    ...(r.debit_response ? { debitResponse: r.debit_response } : {}),
    ...(r.card_log_proves_no_debit === 1 ? { cardLogProvesNoDebit: true } : {}),
    ...(r.result_m ? { resultM: Sealed.decode(r.result_m) } : {}),
    ...(r.receipt ? { receipt: Receipt.decode(r.receipt) } : {}),
    proofReported: r.proof_reported === 1,
  };
}

export class SqliteJournal implements PurchaseJournal {
  constructor(private readonly db: Db) {}

  private async set(id: string, fields: Record<string, string | number | Buffer | null>): Promise<void> {
    const keys = Object.keys(fields);
    await this.db.run(`UPDATE client_purchases SET ${keys.map((k) => `${k} = ?`).join(", ")}, updated_at = ? WHERE transaction_id = ?`, [
      ...Object.values(fields),
      new Date().toISOString(),
      id,
    ]);
  }

  async started(offer: PaymentOffer, requestId?: string): Promise<void> {
    const now = new Date().toISOString();
    await this.db.run("INSERT INTO client_purchases (transaction_id, offer, state, request_id, created_at, updated_at) VALUES (?, ?, 'STARTED', ?, ?, ?)", [
      offer.transactionId!.value,
      Buffer.from(PaymentOffer.encode(offer).finish()),
      requestId ?? null,
      now,
      now,
    ]);
    dieAt("purchase:STARTED");
  }

  async debitSent(id: string, d: DebitSent) {
    await this.set(id, {
      state: "DEBIT_SENT",
      purse_id: d.purseId,
      card_counter: d.cardCounter,
      psam_id: d.psamId,
      psam_counter: d.psamCounter,
      completion_token: d.completionToken,
      expected_signature_digest: d.expectedSignatureDigest,
      issued_result_m: sealedBytes(d.issuedResultM),
    });
    dieAt("purchase:DEBIT_SENT");
  }

  async cardAnswered(id: string, sw: number, debitResponse: Buffer) {
    dieAt("purchase:before-CARD_ANSWERED");
    await this.set(id, { state: "CARD_ANSWERED", card_status_word: sw, debit_response: debitResponse });
    dieAt("purchase:CARD_ANSWERED");
  }

  cardLogProvesNoDebit(id: string) {
    return this.set(id, { state: "CARD_ANSWERED", card_status_word: null, debit_response: null, card_log_proves_no_debit: 1 });
  }

  async confirmed(id: string, resultM: Sealed) {
    await this.set(id, { state: "CONFIRMED", result_m: sealedBytes(resultM) });
    dieAt("purchase:CONFIRMED");
  }

  /** The receipt, and in the same commit the points it grants: a crash after it loses neither. */
  async receipt(id: string, r: Receipt, orderAccessSecret: Uint8Array) {
    await this.db.transaction(async (tx) => {
      await tx.run("UPDATE client_purchases SET state = 'RECEIPT', receipt = ?, order_access_secret = ?, updated_at = ? WHERE transaction_id = ?", [
        Buffer.from(Receipt.encode(r).finish()),
        Buffer.from(orderAccessSecret),
        new Date().toISOString(),
        id,
      ]);
      if (r.pointsGrant && isGrantWellFormed(r.pointsGrant)) await keepGrant(tx, r.pointsGrant);
    });
    dieAt("purchase:RECEIPT");
  }

  proofReported(id: string) {
    return this.set(id, { proof_reported: 1 });
  }

  failed(id: string, why: string) {
    return this.set(id, { state: "FAILED", error: why });
  }

  get(id: string): Promise<JournalRow | undefined> {
    return this.db.get<JournalRow>("SELECT * FROM client_purchases WHERE transaction_id = ?", [id]);
  }

  /** The purchase a caller made under this request id, if any. */
  byRequestId(requestId: string): Promise<JournalRow | undefined> {
    return this.db.get<JournalRow>("SELECT * FROM client_purchases WHERE request_id = ?", [requestId]);
  }

  /**
   * Purchases journaled STARTED and no further: no DEBIT command was
   * journaled, so none reached the card. Only a daemon that stopped
   * half-way leaves them (a purchase in progress holds the card, as does
   * the recovery that looks for these).
   */
  startedOnly(): Promise<JournalRow[]> {
    return this.db.all<JournalRow>("SELECT * FROM client_purchases WHERE state = 'STARTED' ORDER BY created_at");
  }

  /**
   * Purchases the card may have paid whose debit result, goods or (in
   * CLIENT_COMPARES) proof report are still owed.
   */
  unfinished(): Promise<JournalRow[]> {
    return this.db.all<JournalRow>(
      `SELECT * FROM client_purchases
        WHERE state IN ('DEBIT_SENT', 'CARD_ANSWERED', 'CONFIRMED')
           OR (state = 'RECEIPT' AND proof_reported = 0 AND expected_signature_digest IS NOT NULL AND length(expected_signature_digest) > 0)
        ORDER BY created_at`,
    );
  }
}

/** The columns of the client_loads table. */
interface LoadRow {
  transaction_id: string;
  bank_address: string;
  account_id: string;
  amount: Buffer;
  state: string;
  offer: Buffer | null;
  card_counter: number | null;
  proof_reference: string | null;
  load_response: Buffer | null;
  settled: Buffer | null;
  purse_id: string;
  request_id: string | null;
  error: string | null;
}

/** A load as a retry of its request finds it: what it was asked for, and where it stands. */
export interface LoadByRequest {
  transactionId: string;
  state: ClientLoadState;
  bankAddress: string;
  accountId: string;
  amount: Money;
  /** The load server's settlement, from SETTLED on. */
  settled: SettledLoad | undefined;
  error: string | null;
}

const loadByRequest = (row: LoadRow): LoadByRequest => ({
  transactionId: row.transaction_id,
  state: row.state as ClientLoadState,
  bankAddress: row.bank_address,
  accountId: row.account_id,
  amount: Money.decode(row.amount),
  settled: row.settled ? SettledLoad.decode(row.settled) : undefined,
  error: row.error,
});

/** A journaled load that lacks what its state requires: the journal was damaged, and a person must look before the card moves on. */
class CorruptLoad extends Error {
  constructor(row: LoadRow, problem: string) {
    super(`load ${row.transaction_id} is inconsistent in the client's journal: state ${row.state} ${problem}`);
  }
}

function need<T>(row: LoadRow, value: T | null, column: string): T {
  if (value === null) throw new CorruptLoad(row, `without ${column}`);
  return value;
}

/** An open load's row as the load code sees it: by its state, each field it must have checked. */
function toLoadRecord(row: LoadRow): LoadRecord {
  const base = {
    transactionId: row.transaction_id,
    bankAddress: row.bank_address,
    accountId: row.account_id,
    amount: Money.decode(row.amount),
    purseId: row.purse_id,
  };
  if (row.state === "STARTED") return { ...base, state: row.state };
  if (row.state === "SETTLED") return { ...base, state: row.state, settled: SettledLoad.decode(need(row, row.settled, "settled")) };
  const offer = checkedOffer(LoadOffer.decode(need(row, row.offer, "offer")), (missing) => new CorruptLoad(row, `with an offer without ${missing}`));
  if (row.state === "OFFERED") return { ...base, state: row.state, offer };
  const requested = { ...base, offer, cardCounter: need(row, row.card_counter, "card_counter") };
  if (row.state === "REQUESTED") return { ...requested, state: row.state };
  // Journals older than the proof reference have none, like a load server's answer that carried none: the load server is asked for it.
  const sent = { ...requested, proofReference: row.proof_reference ?? "" };
  if (row.state === "LOAD_SENT") return { ...sent, state: row.state };
  if (row.state === "CARD_ANSWERED") return { ...sent, state: row.state, loadResponse: need(row, row.load_response, "load_response") };
  throw new CorruptLoad(row, "is not the state of an open load");
}

export class SqliteLoadJournal implements LoadJournal {
  constructor(private readonly db: Db) {}

  private async set(id: string, fields: { state: ClientLoadState } & Record<string, string | number | Buffer | null>): Promise<void> {
    const keys = Object.keys(fields);
    await this.db.run(`UPDATE client_loads SET ${keys.map((k) => `${k} = ?`).join(", ")}, updated_at = ? WHERE transaction_id = ?`, [
      ...Object.values(fields),
      new Date().toISOString(),
      id,
    ]);
    dieAt(`load:${fields.state}`);
  }

  async loadStarted(r: { transactionId: string; bankAddress: string; accountId: string; amount: Money; purseId: string; requestId?: string }): Promise<void> {
    const now = new Date().toISOString();
    await this.db.run(
      "INSERT INTO client_loads (transaction_id, bank_address, account_id, amount, purse_id, state, request_id, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'STARTED', ?, ?, ?)",
      [r.transactionId, r.bankAddress, r.accountId, Buffer.from(Money.encode(r.amount).finish()), r.purseId, r.requestId ?? null, now, now],
    );
    dieAt("load:STARTED");
  }

  /** The load a caller made under this request id, if any. */
  async byRequestId(requestId: string): Promise<LoadByRequest | undefined> {
    const row = await this.db.get<LoadRow>("SELECT * FROM client_loads WHERE request_id = ?", [requestId]);
    return row ? loadByRequest(row) : undefined;
  }

  /** A load by its transaction id, if journaled. */
  async get(id: string): Promise<LoadByRequest | undefined> {
    const row = await this.db.get<LoadRow>("SELECT * FROM client_loads WHERE transaction_id = ?", [id]);
    return row ? loadByRequest(row) : undefined;
  }

  loadOffered(id: string, offer: LoadOffer) {
    return this.set(id, { state: "OFFERED", offer: Buffer.from(LoadOffer.encode(offer).finish()) });
  }

  loadRequested(id: string, cardCounter: number) {
    return this.set(id, { state: "REQUESTED", card_counter: cardCounter });
  }

  loadSent(id: string, proofReference: string) {
    return this.set(id, { state: "LOAD_SENT", proof_reference: proofReference });
  }

  loadAnswered(id: string, loadResponse: Buffer) {
    return this.set(id, { state: "CARD_ANSWERED", load_response: loadResponse });
  }

  loadSettled(id: string, settled: SettledLoad) {
    return this.set(id, { state: "SETTLED", settled: Buffer.from(SettledLoad.encode(settled).finish()) });
  }

  loadDone(id: string) {
    return this.set(id, { state: "DONE" });
  }

  loadFailed(id: string, why: string) {
    return this.set(id, { state: "FAILED", error: why });
  }

  async openLoads(): Promise<LoadRecord[]> {
    const rows = await this.db.all<LoadRow>("SELECT * FROM client_loads WHERE state NOT IN ('DONE', 'FAILED') ORDER BY created_at");
    return rows.map(toLoadRecord);
  }

  /** Keeps a points grant until the card holds its points (a grant kept before stays as it is). */
  grantKept(grant: PointsGrant): Promise<void> {
    return keepGrant(this.db, grant);
  }

  async grantRow(grantId: string): Promise<GrantRow | undefined> {
    return this.db.get<GrantRow>("SELECT state, card_counter, load_response FROM client_grants WHERE grant_id = ?", [grantId]);
  }

  /** Written before the card sees the LOAD: from here on the card may have credited the grant. */
  async grantLoadSent(grantId: string, cardCounter: number): Promise<void> {
    await this.db.run("UPDATE client_grants SET state = 'LOAD_SENT', card_counter = ?, updated_at = ? WHERE grant_id = ?", [
      cardCounter,
      new Date().toISOString(),
      grantId,
    ]);
  }

  /** The card's answer to the LOAD (from the card or its log): the card may move on, the programme confirms later. */
  async grantAnswered(grantId: string, loadResponse: Buffer): Promise<void> {
    await this.db.run("UPDATE client_grants SET state = 'CARD_ANSWERED', load_response = ?, updated_at = ? WHERE grant_id = ?", [
      loadResponse,
      new Date().toISOString(),
      grantId,
    ]);
  }

  /** A grant whose LOAD went to the card with no answer known: the card must show whether it credited it before anything else. */
  async grantInDoubt(): Promise<string | undefined> {
    return (await this.db.get<{ grant_id: string }>("SELECT grant_id FROM client_grants WHERE state = 'LOAD_SENT' LIMIT 1"))?.grant_id;
  }

  /** The grant's points are on the card and the programme confirmed them. */
  async grantCredited(grantId: string): Promise<void> {
    await this.db.run("UPDATE client_grants SET state = 'CREDITED', error = NULL, updated_at = ? WHERE grant_id = ?", [new Date().toISOString(), grantId]);
  }

  /**
   * A collection failed: the grant stays open to be tried again, unless the
   * refusal was final. A grant credited before stays CREDITED: asked again
   * once the card's log no longer shows the credit, the programme refuses it
   * (GRANT_ALREADY_CREDITED), and its points are on the card all the same.
   */
  async grantFailed(grantId: string, why: string, final: boolean): Promise<void> {
    // A LOAD sent, or the card's answer known, is kept as it is: only the card, or the programme's ruling, settles it.
    await this.db.run(
      "UPDATE client_grants SET state = CASE WHEN ? THEN 'FAILED' WHEN state IN ('LOAD_SENT', 'CARD_ANSWERED') THEN state ELSE 'OPEN' END, error = ?, updated_at = ? WHERE grant_id = ? AND state <> 'CREDITED'",
      [final ? 1 : 0, why, new Date().toISOString(), grantId],
    );
  }

  /** Grants whose points are not confirmed on the card yet, oldest first. */
  async openGrants(): Promise<PointsGrant[]> {
    const rows = await this.db.all<{ grant: Buffer }>(
      "SELECT grant FROM client_grants WHERE state IN ('OPEN', 'LOAD_SENT', 'CARD_ANSWERED') ORDER BY created_at",
    );
    return rows.map((r) => PointsGrant.decode(r.grant));
  }
}
