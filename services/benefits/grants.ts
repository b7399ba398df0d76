// The benefits site's BenefitsService: the rewards, points granted by
// enrolled merchants, and their credit to the card through the load
// protocol, signed by the programme's security module (docs/loyalty.md,
// "Earning points"). A grant is GRANTED, then CREDIT_ISSUED once a LOAD
// command was signed for the card's counter of that moment, then CREDITED
// once the card's S3 proves the points on the card. Another LOAD command for
// the grant is signed only while the card's counter is still the one the
// last was made for: a card that took a LOAD has moved its counter, so the
// points reach the card once.

import { randomUUID } from "node:crypto";
import type { CallContext } from "nice-grpc";
import {
  GrantState,
  type ConfirmPointsCreditRequest,
  type ConfirmPointsCreditResponse,
  type GrantPointsRequest,
  type GrantPointsResponse,
  type IssuePointsCreditRequest,
  type IssuePointsCreditResponse,
  type BenefitsServiceImplementation,
} from "../../gen/netpurse/benefits/v1/benefits.js";
import { ErrorReason, type PointsGrant } from "../../gen/netpurse/card/v1/card.js";
import { invalidField, NetpurseError, notFound, Status } from "../../lib/grpc/errors.js";
import { peerOf, type Peer } from "../../lib/grpc/server.js";
import { merchantId, purseId, requireCardAmount, requirePurseId, requireTransactionId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { isMoneyCurrency, MAX_CARD_AMOUNT, money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import { InitializeForLoadResponse, LoadResponse, LoadResult, type LoadInit, type LoadInitCommand } from "../../lib/protocol/load.js";
import type { Db } from "../../lib/store/db.js";
import { HsmRefused, REFUSAL_REASON, type HostSecurityModule } from "../load/hsm.js";
import { MERCHANT_MIGRATIONS } from "../merchant/shop.js";
import { rewardsOf, type SiteFile } from "./site.js";

/**
 * benefits.db: the Shop's orders (its migrations first, so that they keep
 * their numbers), then the grants. A migration added to the Shop's list
 * shifts these: add it here instead, after the grants' (append only).
 */
export const BENEFITS_MIGRATIONS = [
  ...MERCHANT_MIGRATIONS,
  `CREATE TABLE grants (
     grant_id TEXT PRIMARY KEY,
     merchant_id TEXT NOT NULL,
     transaction_id TEXT NOT NULL,
     purse_id TEXT NOT NULL,
     paid_minor INTEGER NOT NULL,
     paid_currency INTEGER NOT NULL,
     paid_exponent INTEGER NOT NULL,
     points INTEGER NOT NULL,
     granted_at INTEGER NOT NULL,
     site_address TEXT NOT NULL,
     state TEXT NOT NULL,
     card_counter INTEGER,
     hsm_counter INTEGER,
     initialize_response BLOB,
     load_command BLOB,
     load_response BLOB,
     balance INTEGER,
     credited_at TEXT,
     UNIQUE (merchant_id, transaction_id)
   );`,
];

interface GrantRow {
  grant_id: string;
  merchant_id: string;
  transaction_id: string;
  purse_id: string;
  paid_minor: number;
  paid_currency: number;
  paid_exponent: number;
  points: number;
  /** Seconds since the epoch: the time stamp of the card's INITIALIZE FOR LOAD. */
  granted_at: number;
  site_address: string;
  state: "GRANTED" | "CREDIT_ISSUED" | "CREDITED";
  /** The card's counter the last LOAD command was signed for. */
  card_counter: number | null;
  hsm_counter: number | null;
  initialize_response: Buffer | null;
  load_command: Buffer | null;
  load_response: Buffer | null;
  balance: number | null;
  credited_at: string | null;
}

const STATE_OF_ROW: Record<GrantRow["state"], GrantState> = {
  GRANTED: GrantState.GRANT_STATE_GRANTED,
  CREDIT_ISSUED: GrantState.GRANT_STATE_CREDIT_ISSUED,
  CREDITED: GrantState.GRANT_STATE_CREDITED,
};

const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);
const alreadyCredited = (text: string) => new NetpurseError(Status.FAILED_PRECONDITION, ErrorReason.ERROR_REASON_GRANT_ALREADY_CREDITED, text);

function decodeField<T>(field: string, bytes: Uint8Array, layout: { size: number; decode(b: Buffer): T }): T {
  if (bytes.length !== layout.size) throw invalidField(field, `must be ${layout.size} bytes, got ${bytes.length}`);
  try {
    return layout.decode(Buffer.from(bytes));
  } catch (e) {
    if (e instanceof LayoutError) throw invalidField(field, e.message);
    throw e;
  }
}

/** Points for a purchase: the merchant's rate (points per currency unit) times the amount paid, rounded down: EUR 12.99 at 10 is 129. */
export function pointsFor(amountMinor: bigint, exponent: number, pointsPerUnit: number): bigint {
  return (amountMinor * BigInt(pointsPerUnit)) / 10n ** BigInt(exponent);
}

export class Benefits {
  // One grant-changing step at a time: the security module signs one command at a time anyway, and a
  // retried request racing its original must find the original's row, not sign a second command.
  private readonly mutex = new Mutex();
  private readonly rates: Map<string, number>;

  constructor(
    private readonly o: {
      site: SiteFile;
      db: Db;
      /** The programme's security module: its load keys are the programme's earn master keys. */
      hsm: HostSecurityModule;
      /** Where cardholders collect grants (this server's advertised address). */
      siteAddress: () => string;
      log: Logger;
    },
  ) {
    this.rates = new Map(o.site.enrolled.map((e) => [e.merchantId, e.pointsPerUnit]));
  }

  readonly service: BenefitsServiceImplementation = {
    listRewards: async () => ({
      siteId: merchantId(this.o.site.merchantId),
      siteName: this.o.site.name,
      programme: { code: this.o.site.programme.code, name: this.o.site.programme.name },
      rewards: rewardsOf(this.o.site),
    }),
    grantPoints: async (req, ctx: CallContext) => this.grantPoints(req, peerOf(ctx)),
    issuePointsCredit: async (req) => this.issuePointsCredit(req),
    confirmPointsCredit: async (req) => this.confirmPointsCredit(req),
  };

  private get programme(): number {
    return this.o.site.programme.code;
  }

  private grantOf(r: GrantRow): PointsGrant {
    return {
      grantId: txnId(r.grant_id),
      programme: this.programme,
      points: money(r.points, this.programme, 0),
      purseId: purseId(r.purse_id),
      siteAddress: r.site_address,
      siteId: this.o.site.merchantId,
      grantedAt: new Date(r.granted_at * 1000),
    };
  }

  /** The load the card is asked for: exactly the grant's points, to the site, at the grant's time, with the grant id as reference. */
  private authorised(r: GrantRow): LoadInitCommand {
    return { amount: r.points, currency: this.programme, bankId: this.o.site.merchantId, dateTime: r.granted_at, transactionRef: r.grant_id };
  }

  private async grantPoints(req: GrantPointsRequest, peer: Peer): Promise<GrantPointsResponse> {
    // The access rule let in merchants only; a server run --insecure proves nobody, and a grant is the merchant's.
    if (!peer.proven)
      throw denied(
        ErrorReason.ERROR_REASON_NOT_ALLOWED,
        "GrantPoints needs the merchant's certificate: without TLS the site cannot tell which merchant grants",
      );
    const rate = this.rates.get(peer.id);
    if (rate === undefined) throw denied(ErrorReason.ERROR_REASON_NOT_ALLOWED, `merchant ${peer.id} is not enrolled in ${this.o.site.programme.name}`);
    const id = requireTransactionId(req.transactionId);
    const purse = requirePurseId(req.purseId);
    const amount = requireCardAmount(req.amount, "amount");
    if (!isMoneyCurrency(amount.currency)) throw invalidField("amount.currency", "must be a money currency 1..998: points are earned on money paid");
    const points = pointsFor(amount.amountMinor, amount.exponent, rate);
    return this.mutex.run(async () => {
      const existing = await this.o.db.get<GrantRow>("SELECT * FROM grants WHERE merchant_id = ? AND transaction_id = ?", [peer.id, id]);
      if (existing) {
        if (existing.purse_id !== purse || BigInt(existing.paid_minor) !== amount.amountMinor || existing.paid_currency !== amount.currency)
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `transaction ${id} of merchant ${peer.id} already has a grant for another card or amount`,
          );
        return { grant: this.grantOf(existing) };
      }
      if (points < 1n)
        throw new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_UNSPECIFIED,
          `a purchase of ${amount.amountMinor} minor units earns no points at ${rate} per whole unit`,
        );
      if (points > BigInt(MAX_CARD_AMOUNT)) throw invalidField("amount", `earns ${points} points, more than a card counts (${MAX_CARD_AMOUNT})`);
      const row = {
        grant_id: randomUUID(),
        granted_at: Math.floor(Date.now() / 1000),
        site_address: this.o.siteAddress(),
      };
      await this.o.db.run(
        `INSERT INTO grants (grant_id, merchant_id, transaction_id, purse_id, paid_minor, paid_currency, paid_exponent, points, granted_at, site_address, state)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'GRANTED')`,
        [row.grant_id, peer.id, id, purse, amount.amountMinor, amount.currency, amount.exponent, points, row.granted_at, row.site_address],
      );
      this.o.log.info("points granted", { grant: row.grant_id, merchant: peer.id, transaction: id, purse, points: Number(points) });
      return { grant: this.grantOf((await this.row(row.grant_id))!) };
    });
  }

  private row(grantId: string): Promise<GrantRow | undefined> {
    return this.o.db.get<GrantRow>("SELECT * FROM grants WHERE grant_id = ?", [grantId]);
  }

  private async issuePointsCredit(req: IssuePointsCreditRequest): Promise<IssuePointsCreditResponse> {
    const grantId = requireTransactionId(req.grantId, "grant_id");
    const init = decodeField("initialize_response", req.initializeResponse, InitializeForLoadResponse);
    return this.mutex.run(async () => {
      const r = await this.row(grantId);
      if (!r) throw notFound(`no grant ${grantId} at ${this.o.site.name}`);
      if (r.state === "CREDITED") throw alreadyCredited(`grant ${grantId} is on the card already: its credit was confirmed`);
      if (init.purseId.toString("hex") !== r.purse_id) throw denied(ErrorReason.ERROR_REASON_NOT_ALLOWED, `grant ${grantId} is for another card`);
      if (r.state === "CREDIT_ISSUED") {
        // The same answer again (a retry): the same command, which the card's session still takes.
        if (r.initialize_response?.equals(Buffer.from(req.initializeResponse))) return { loadCommand: r.load_command! };
        if (init.counter !== r.card_counter)
          throw alreadyCredited(
            `a credit of grant ${grantId} was signed at the card's counter ${r.card_counter} and the card has moved to ${init.counter}: ` +
              "confirm that one with ConfirmPointsCredit",
          );
      }
      // A card holding no purse of the programme answers for its money purse, whose S1 no programme key verifies.
      if (init.currency !== this.programme)
        throw new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_CURRENCY_MISMATCH,
          `the card answered for currency ${init.currency}: it holds no points purse of programme ${this.programme}`,
        );
      let issued;
      try {
        issued = await this.o.hsm.issueLoad(this.authorised(r), 0, init);
      } catch (e) {
        if (!(e instanceof HsmRefused)) throw e;
        this.o.log.warn("points credit refused by the programme's security module", { grant: grantId, why: e.refusal });
        if (e.refusal === "BAD_S1") throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `the card's signature S1 does not verify for grant ${grantId}`);
        throw new NetpurseError(Status.FAILED_PRECONDITION, REFUSAL_REASON[e.refusal], e.message);
      }
      await this.o.db.run(
        `UPDATE grants SET state = 'CREDIT_ISSUED', card_counter = ?, hsm_counter = ?, initialize_response = ?, load_command = ?
         WHERE grant_id = ?`,
        [init.counter, issued.hsmCounter, Buffer.from(req.initializeResponse), issued.command, grantId],
      );
      this.o.log.info("points credit signed", { grant: grantId, points: r.points, cardCounter: init.counter, hsmCounter: issued.hsmCounter });
      return { loadCommand: issued.command };
    });
  }

  private credited(r: GrantRow): ConfirmPointsCreditResponse {
    return {
      state: STATE_OF_ROW[r.state],
      balance: money(r.balance ?? 0, this.programme, 0),
      creditedAt: r.credited_at ? new Date(r.credited_at) : undefined,
    };
  }

  private async confirmPointsCredit(req: ConfirmPointsCreditRequest): Promise<ConfirmPointsCreditResponse> {
    const grantId = requireTransactionId(req.grantId, "grant_id");
    const answer = decodeField("load_response", req.loadResponse, LoadResponse);
    return this.mutex.run(async () => {
      const r = await this.row(grantId);
      if (!r) throw notFound(`no grant ${grantId} at ${this.o.site.name}`);
      if (r.state === "GRANTED") throw notFound(`no credit of grant ${grantId} was signed: ask for one with IssuePointsCredit`);
      if (r.state === "CREDITED") {
        if (r.load_response?.equals(Buffer.from(req.loadResponse))) return this.credited(r);
        throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `grant ${grantId} was confirmed with another answer of the card`);
      }
      const init: LoadInit = InitializeForLoadResponse.decode(r.initialize_response!);
      const genuine = this.o.hsm.verifyLoadAnswer(this.authorised(r), init, { hsmCounter: r.hsm_counter! }, answer);
      if (!genuine) {
        this.o.log.warn("points credit answer refused: S3 does not verify", { grant: grantId });
        throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `the card's signature S3 does not verify for the credit of grant ${grantId}`);
      }
      if (answer.result !== LoadResult.LOADED)
        throw new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_CARD_REFUSED,
          `the card refused the credit of grant ${grantId} (result ${answer.result}); nothing was credited: ask for a new credit`,
        );
      // S3 covers the card's counter and balance: a genuine LOADED answer shows exactly these.
      if (answer.counter !== init.counter + 1 || answer.balance !== init.balance + r.points)
        throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `the card's answer does not show the credit of grant ${grantId}`);
      const creditedAt = new Date();
      await this.o.db.run("UPDATE grants SET state = 'CREDITED', load_response = ?, balance = ?, credited_at = ? WHERE grant_id = ?", [
        Buffer.from(req.loadResponse),
        answer.balance,
        creditedAt.toISOString(),
        grantId,
      ]);
      this.o.log.info("points credited", { grant: grantId, points: r.points, balance: answer.balance });
      return { state: GrantState.GRANT_STATE_CREDITED, balance: money(answer.balance, this.programme, 0), creditedAt };
    });
  }
}
