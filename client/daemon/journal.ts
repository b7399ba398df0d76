// The client daemon's journal: every purchase step it took, so that a
// confirmation or a receipt that did not arrive is fetched again later and
// nothing the card paid for is lost.

import { CompletePurchaseResponse } from "../../gen/netpurse/payment/v1/payment.js";
import { PaymentOffer, Receipt } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { Db } from "../../lib/store/db.js";
import type { ClientPurchaseState, DebitSent, PurchaseJournal } from "../purchase.js";

export const CLIENT_MIGRATIONS = [
  `CREATE TABLE client_purchases (
     transaction_id TEXT PRIMARY KEY,
     offer BLOB NOT NULL,
     state TEXT NOT NULL,
     card_status_word INTEGER,
     debit_response BLOB,
     completion BLOB,
     receipt BLOB,
     error TEXT,
     created_at TEXT NOT NULL,
     updated_at TEXT NOT NULL
   );`,
  `ALTER TABLE client_purchases ADD COLUMN purse_id TEXT;
   ALTER TABLE client_purchases ADD COLUMN card_counter INTEGER;
   ALTER TABLE client_purchases ADD COLUMN psam_id TEXT;
   ALTER TABLE client_purchases ADD COLUMN psam_counter INTEGER;
   ALTER TABLE client_purchases ADD COLUMN completion_token BLOB;`,
];

export interface JournalRow {
  transaction_id: string;
  offer: Buffer;
  state: ClientPurchaseState;
  card_status_word: number | null;
  debit_response: Buffer | null;
  completion: Buffer | null;
  receipt: Buffer | null;
  error: string | null;
  purse_id: string | null;
  card_counter: number | null;
  psam_id: string | null;
  psam_counter: number | null;
  completion_token: Buffer | null;
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

  async started(offer: PaymentOffer): Promise<void> {
    const now = new Date().toISOString();
    await this.db.run("INSERT INTO client_purchases (transaction_id, offer, state, created_at, updated_at) VALUES (?, ?, 'STARTED', ?, ?)", [
      offer.transactionId!.value,
      Buffer.from(PaymentOffer.encode(offer).finish()),
      now,
      now,
    ]);
  }

  debitSent(id: string, d: DebitSent) {
    return this.set(id, {
      state: "DEBIT_SENT",
      purse_id: d.purseId,
      card_counter: d.cardCounter,
      psam_id: d.psamId,
      psam_counter: d.psamCounter,
      completion_token: d.completionToken,
    });
  }

  cardAnswered(id: string, sw: number, debitResponse: Buffer) {
    return this.set(id, { state: "CARD_ANSWERED", card_status_word: sw, debit_response: debitResponse });
  }

  confirmed(id: string, c: CompletePurchaseResponse) {
    return this.set(id, { state: "CONFIRMED", completion: Buffer.from(CompletePurchaseResponse.encode(c).finish()) });
  }

  receipt(id: string, r: Receipt) {
    return this.set(id, { state: "RECEIPT", receipt: Buffer.from(Receipt.encode(r).finish()) });
  }

  failed(id: string, why: string) {
    return this.set(id, { state: "FAILED", error: why });
  }

  get(id: string): Promise<JournalRow | undefined> {
    return this.db.get<JournalRow>("SELECT * FROM client_purchases WHERE transaction_id = ?", [id]);
  }

  /** Purchases the card may have paid whose confirmation or goods are still owed. */
  unfinished(): Promise<JournalRow[]> {
    return this.db.all<JournalRow>("SELECT * FROM client_purchases WHERE state IN ('DEBIT_SENT', 'CARD_ANSWERED', 'CONFIRMED') ORDER BY created_at");
  }
}
