// The demo bank's server (FIG. 17, 860): load offers with a hold on the
// funds (steps 872-875), and the load server's sealed confirmation, opened
// and checked before the hold is posted or released (step 892). Only a
// confirmation the load server sealed moves money; the client that carries
// it can neither read nor forge it.

import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { createHash, randomBytes } from "node:crypto";
import { Status } from "nice-grpc";
import { ErrorReason, PurseStatus } from "../../gen/netpurse/card/v1/card.js";
import {
  HoldState,
  LoadOffer,
  type BankServiceImplementation,
  type ConfirmLoadRequest,
  type ConfirmLoadResponse,
  type CreateLoadOfferRequest,
  type CreateLoadOfferResponse,
  type GetAccountResponse,
  type Hold,
  type ListHoldsRequest,
  type ListHoldsResponse,
  type ListStatementLinesRequest,
  type ListStatementLinesResponse,
  type StatementLine,
} from "../../gen/netpurse/bank/v1/bank.js";
import { LoadAuthorization, LoadConfirmation, LoadOutcome, type LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { isPositiveInt, pagePosition, pageSize, pageToken, type PageSizeRule } from "../../lib/grpc/page-token.js";
import { requireCardAmount, requireMoney, requireName, requirePurseId, requireTransactionId, purseId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney, money } from "../../lib/money.js";
import { loadTransactionKey, open, seal } from "../../lib/protocol/encryption-layer.js";
import { isExpired } from "../../lib/protocol/purse.js";
import type { AccountRow, BankStore, HoldPosition, HoldRow, HoldRowState, StatementRow } from "./store.js";

const failed = (reason: ErrorReason, text: string) => new NetpurseError(Status.FAILED_PRECONDITION, reason, text);
const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);

const HOLD_STATE: Record<HoldRowState, HoldState> = {
  HELD: HoldState.HOLD_STATE_HELD,
  POSTED: HoldState.HOLD_STATE_POSTED,
  RELEASED: HoldState.HOLD_STATE_RELEASED,
};

/** How many holds and statement lines GetAccount returns. */
const LISTED = 50;

/** page_size of ListHolds and ListStatementLines, as bank.proto documents it. */
const PAGE: PageSizeRule = { fallback: 50, max: 200 };

/** The lists page tokens are made for, and for which account. */
const HOLDS = "holds";
const LINES = "statement lines";
const scopeOf = (accountId: string) => `account ${accountId}`;

/** A ListHolds token's position: the created_at and rowid of the previous page's last hold. */
const isHoldPosition = (p: unknown): p is { t: string; r: number } =>
  typeof p === "object" &&
  p !== null &&
  typeof (p as { t?: unknown }).t === "string" &&
  /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test((p as { t: string }).t) &&
  isPositiveInt((p as { r?: unknown }).r);

/** A ListStatementLines token's position: the id of the previous page's last line. */
const isLinePosition = (p: unknown): p is { id: number } => typeof p === "object" && p !== null && isPositiveInt((p as { id?: unknown }).id);

export interface BankIdentity {
  bankId: string;
  /** The key this bank shares with the load server. */
  loadServerKey: Buffer;
  /** Where cardholders send load requests, and this bank's own address, both put into offers. */
  loadServerAddress: string;
  bankAddress: string;
}

export type LoadClient = Client<typeof LoadServiceDefinition, DeadlineOptions>;

export class BankServer {
  constructor(
    private readonly o: {
      store: BankStore;
      identity: BankIdentity;
      log: Logger;
      /** The load server, asked directly only about holds whose cardholder never came back. */
      loadServer?: LoadClient;
    },
  ) {}

  /**
   * Holds older than `olderThanMs` whose confirmation never came: the bank
   * asks the load server to end each load (AbandonLoad, with the bank's own
   * authorisation). A load no LOAD command was issued for ends NOT_LOADED
   * and the hold is released; a load settled but never confirmed here comes
   * back with its confirmation and is posted; a load with a LOAD command
   * still pending is left held, for the card to settle. Returns how many
   * holds it resolved.
   */
  async resolveStaleHolds(olderThanMs: number): Promise<number> {
    const server = this.o.loadServer;
    if (!server) return 0;
    const before = new Date(Date.now() - olderThanMs).toISOString();
    let resolved = 0;
    for (const hold of await this.o.store.heldSince(before)) {
      const offer = LoadOffer.decode(hold.offer);
      try {
        const r = await server.abandonLoad(
          { transactionId: offer.transactionId, bankId: offer.bankId, keyNonce: offer.keyNonce, authorization: offer.authorization },
          { deadline: DEFAULT_DEADLINE_MS },
        );
        await this.confirmLoad({ transactionId: offer.transactionId, confirmation: r.load!.confirmation });
        resolved++;
      } catch (e) {
        // A load the card must still settle, or a load server out of reach: the hold waits for the next round.
        this.o.log.info("stale hold left held", { transaction: hold.transaction_id, detail: (e as Error).message });
      }
    }
    return resolved;
  }

  readonly service: BankServiceImplementation = {
    createLoadOffer: (req) => this.createLoadOffer(req),
    confirmLoad: (req) => this.confirmLoad(req),
    getAccount: (req) => this.getAccount(requireName(req.accountId, "account_id", 32)),
    listHolds: (req) => this.listHolds(req),
    listStatementLines: (req) => this.listStatementLines(req),
  };

  private async createLoadOffer(req: CreateLoadOfferRequest): Promise<CreateLoadOfferResponse> {
    const id = requireTransactionId(req.transactionId);
    const accountId = requireName(req.accountId, "account_id", 32);
    const amount = requireCardAmount(req.amount, "amount");
    const p = req.purse;
    if (!p) throw invalidField("purse", "missing: read the card first");
    const purse = requirePurseId(p.purseId, "purse.purse_id");
    const balance = requireMoney(p.balance, "purse.balance");
    const maxBalance = requireMoney(p.maxBalance, "purse.max_balance");
    if (!/^\d{4}-\d{2}-\d{2}$/.test(p.expiryDate)) throw invalidField("purse.expiry_date", "must be YYYY-MM-DD");
    const minor = Number(amount.amountMinor);
    const requestHash = createHash("sha256")
      .update(JSON.stringify([accountId, minor, amount.currency, amount.exponent, purse]))
      .digest("hex");

    const { identity } = this.o;
    return this.o.store.db.transaction(async (tx) => {
      const prior = await this.o.store.hold(id, tx);
      if (prior) {
        if (prior.request_hash !== requestHash)
          throw new NetpurseError(
            Status.ALREADY_EXISTS,
            ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
            `transaction ${id} is already a load offer for other content`,
          );
        return { offer: LoadOffer.decode(prior.offer) };
      }
      const account = await this.o.store.account(accountId, tx);
      if (!account) throw notFound(`no account ${accountId} at this bank`);
      const asked = formatMoney(amount);
      if (amount.currency !== account.currency || amount.exponent !== account.exponent)
        throw failed(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, `the account is in currency ${account.currency}, the load asks ${asked}`);
      if (balance.currency !== amount.currency || balance.exponent !== amount.exponent)
        throw failed(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, `the card holds currency ${balance.currency}, the load asks ${asked}`);
      if (p.status === PurseStatus.PURSE_STATUS_BLOCKED) throw failed(ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked; ask its issuer");
      if (isExpired(p.expiryDate, new Date())) throw failed(ErrorReason.ERROR_REASON_CARD_EXPIRED, `the card expired on ${p.expiryDate}`);
      const room = maxBalance.amountMinor - balance.amountMinor;
      if (amount.amountMinor > room) {
        throw failed(
          ErrorReason.ERROR_REASON_MAX_BALANCE_EXCEEDED,
          `the card holds ${formatMoney(balance)} of at most ${formatMoney(maxBalance)}: at most ${formatMoney(money(room < 0n ? 0n : room, amount.currency, amount.exponent))} more fits`,
        );
      }
      const available = await this.o.store.available(account, tx);
      if (available < minor)
        throw failed(
          ErrorReason.ERROR_REASON_INSUFFICIENT_FUNDS,
          `account ${accountId} has ${formatMoney(money(available, account.currency, account.exponent))} available, the load asks ${asked}`,
        );

      const keyNonce = randomBytes(16);
      const offeredAt = new Date(Math.floor(Date.now() / 1000) * 1000); // whole seconds: the card signs it as such
      const authorization = LoadAuthorization.encode({
        transactionId: txnId(id),
        bankId: identity.bankId,
        purseId: purseId(purse),
        amount,
        offeredAt,
      }).finish();
      const offer: LoadOffer = {
        transactionId: txnId(id),
        bankId: identity.bankId,
        purseId: purseId(purse),
        amount,
        loadServerAddress: identity.loadServerAddress,
        offeredAt,
        keyNonce,
        authorization: seal(loadTransactionKey(identity.loadServerKey, identity.bankId, id, keyNonce), "LOAD_AUTHORIZATION", id, authorization),
        bankAddress: identity.bankAddress,
      };
      await tx.run(
        "INSERT INTO holds (transaction_id, account_id, purse_id, amount_minor, request_hash, offer, key_nonce, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'HELD', ?)",
        [id, accountId, purse, minor, requestHash, Buffer.from(LoadOffer.encode(offer).finish()), keyNonce, new Date().toISOString()],
      );
      this.o.log.info("load offer made, funds held", { transaction: id, account: accountId, amount: asked });
      return { offer };
    });
  }

  private async confirmLoad(req: ConfirmLoadRequest): Promise<ConfirmLoadResponse> {
    const id = requireTransactionId(req.transactionId);
    if (!req.confirmation) throw invalidField("confirmation", "missing");
    const hold = await this.o.store.hold(id);
    if (!hold) throw notFound(`no load offer with transaction id ${id}`);
    const { identity } = this.o;
    const plain = open(loadTransactionKey(identity.loadServerKey, identity.bankId, id, hold.key_nonce), "LOAD_CONFIRMATION", id, req.confirmation);
    if (!plain) throw denied(ErrorReason.ERROR_REASON_SEAL_BROKEN, "the confirmation does not open: it was not sealed by the load server for this load");
    const c = LoadConfirmation.decode(plain);
    const matches =
      c.transactionId?.value === id &&
      c.bankId === identity.bankId &&
      Buffer.from(c.purseId?.value ?? []).toString("hex") === hold.purse_id &&
      c.amount?.amountMinor === BigInt(hold.amount_minor) &&
      (c.outcome === LoadOutcome.LOAD_OUTCOME_LOADED || c.outcome === LoadOutcome.LOAD_OUTCOME_NOT_LOADED);
    if (!matches) throw denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, "the confirmation does not match the load offer");

    return this.o.store.db.transaction(async (tx) => {
      const now = (await this.o.store.hold(id, tx))!;
      const wanted: HoldRowState = c.outcome === LoadOutcome.LOAD_OUTCOME_LOADED ? "POSTED" : "RELEASED";
      if (now.state === "HELD") {
        if (wanted === "POSTED") await this.o.store.post(tx, now, `load to card ${now.purse_id}`);
        else await this.o.store.release(tx, now);
        this.o.log.info(wanted === "POSTED" ? "load confirmed, account debited" : "load not made, hold released", { transaction: id, proof: c.proof });
      } else if (now.state !== wanted) {
        throw failed(ErrorReason.ERROR_REASON_WRONG_STATE, `the hold was already ${now.state.toLowerCase()}; this confirmation says otherwise`);
      }
      const account = (await this.o.store.account(now.account_id, tx))!;
      return { holdState: HOLD_STATE[wanted], outcome: c.outcome, balance: money(account.balance_minor, account.currency, account.exponent) };
    });
  }

  private async getAccount(accountId: string): Promise<GetAccountResponse> {
    const a = await this.o.store.account(accountId);
    if (!a) throw notFound(`no account ${accountId} at this bank`);
    const m = (minor: number) => money(minor, a.currency, a.exponent);
    const holds = await this.o.store.holds(accountId, LISTED);
    const lines = await this.o.store.statement(accountId, LISTED);
    return {
      accountId,
      holder: a.holder,
      balance: m(a.balance_minor),
      available: m(await this.o.store.available(a)),
      holds: holds.map((h) => holdView(a, h)),
      statement: lines.map((l) => lineView(a, l)),
    };
  }

  /** The account of a list request: its id checked, and known here. */
  private async listed(accountId: string): Promise<AccountRow> {
    const a = await this.o.store.account(accountId);
    if (!a) throw notFound(`no account ${accountId} at this bank`);
    return a;
  }

  private async listHolds(req: ListHoldsRequest): Promise<ListHoldsResponse> {
    const accountId = requireName(req.accountId, "account_id", 32);
    const size = pageSize(req.pageSize, PAGE);
    const after = pagePosition(req.pageToken, HOLDS, scopeOf(accountId), isHoldPosition);
    const a = await this.listed(accountId);
    const rows = await this.o.store.holdsPage(accountId, after && { created_at: after.t, row_id: after.r }, size + 1);
    const page = rows.slice(0, size);
    const last: HoldPosition | undefined = rows.length > size ? page[page.length - 1] : undefined;
    return {
      holds: page.map((h) => holdView(a, h)),
      nextPageToken: last ? pageToken(HOLDS, scopeOf(accountId), { t: last.created_at, r: last.row_id }) : "",
    };
  }

  private async listStatementLines(req: ListStatementLinesRequest): Promise<ListStatementLinesResponse> {
    const accountId = requireName(req.accountId, "account_id", 32);
    const size = pageSize(req.pageSize, PAGE);
    const before = pagePosition(req.pageToken, LINES, scopeOf(accountId), isLinePosition);
    const a = await this.listed(accountId);
    const rows = await this.o.store.statementPage(accountId, before?.id, size + 1);
    const page = rows.slice(0, size);
    const last = rows.length > size ? page[page.length - 1] : undefined;
    return { lines: page.map((l) => lineView(a, l)), nextPageToken: last ? pageToken(LINES, scopeOf(accountId), { id: last.id }) : "" };
  }
}

function holdView(a: AccountRow, h: HoldRow): Hold {
  return {
    transactionId: txnId(h.transaction_id),
    purseId: purseId(h.purse_id),
    amount: money(h.amount_minor, a.currency, a.exponent),
    state: HOLD_STATE[h.state],
    createdAt: new Date(h.created_at),
  };
}

function lineView(a: AccountRow, l: StatementRow): StatementLine {
  return {
    postedAt: new Date(l.posted_at),
    text: l.text,
    amount: money(l.amount_minor, a.currency, a.exponent),
    balanceAfter: money(l.balance_after, a.currency, a.exponent),
    transactionId: l.transaction_id ? txnId(l.transaction_id) : undefined,
  };
}
