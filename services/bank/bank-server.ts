// The demo bank's server (FIG. 17, 860): load offers with a hold on the
// funds (steps 872-875), and the load server's sealed confirmation, opened
// and checked before the hold is posted or released (step 892). Only a
// confirmation the load server sealed moves money; the client that carries
// it can neither read nor forge it. Only the account holder, logged in with
// the account's password, reads an account or has its funds held for a load.

import { DEFAULT_DEADLINE_MS } from "../../lib/grpc/client.js";
import { createHash, randomBytes } from "node:crypto";
import { Status, type CallContext } from "nice-grpc";
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
  type LoginRequest,
  type LoginResponse,
  type StatementLine,
} from "../../gen/netpurse/bank/v1/bank.js";
import { LoadAuthorization, LoadConfirmation, LoadOutcome, type LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { bearerTokenOf } from "../../lib/grpc/server.js";
import { isPositiveInt, pagePosition, pageSize, pageToken, type PageSizeRule } from "../../lib/grpc/page-token.js";
import { requireCardAmount, requireMoney, requireName, requirePurseId, requireTransactionId, purseId, txnId } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney, money } from "../../lib/money.js";
import { loadTransactionKey, open, seal } from "../../lib/protocol/encryption-layer.js";
import { isExpired } from "../../lib/protocol/purse.js";
import type { AccountRow, BankStore, HoldPosition, HoldRow, HoldRowState, StatementRow } from "./store.js";
import { accessTokenHash, ACCESS_TOKEN_SHAPE, MAX_PASSWORD_BYTES, newAccessToken, verifyPassword } from "./credentials.js";
import { LoginLimiter, type LoginLimits } from "./login-limiter.js";
import { KeyedMutex } from "../../lib/mutex.js";

const failed = (reason: ErrorReason, text: string) => new NetpurseError(Status.FAILED_PRECONDITION, reason, text);
const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);
const unauthenticated = (text: string) => new NetpurseError(Status.UNAUTHENTICATED, ErrorReason.ERROR_REASON_UNAUTHENTICATED, text);

/** How the account holder's RPCs carry the access token: gRPC metadata, as every gRPC client sends it. */

/** The access token's default lifetime: short, since it acts for the account. */
export const DEFAULT_ACCESS_TOKEN_TTL_MS = 15 * 60_000;

/** Holds waiting for their confirmation that one account may have at once, by default. */
export const DEFAULT_MAX_HOLDS_PER_ACCOUNT = 3;

/** Access tokens kept per account: logging in again and again cannot fill bank.db. */
const TOKENS_PER_ACCOUNT = 10;

/** Logins being checked at once, at most: each scrypt hash takes 32 MiB for a while. */
const MAX_LOGINS_IN_FLIGHT = 16;

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

/**
 * A ListHolds token's position: the created_at and seq of the previous page's
 * last hold (`s`; a token of a bank from before seq, with SQLite's rowid as
 * `r`, is refused rather than read as a seq).
 */
const isHoldPosition = (p: unknown): p is { t: string; s: number } =>
  typeof p === "object" &&
  p !== null &&
  typeof (p as { t?: unknown }).t === "string" &&
  /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/.test((p as { t: string }).t) &&
  isPositiveInt((p as { s?: unknown }).s);

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
      /** How long an access token acts for its account (default 15 minutes). */
      accessTokenTtlMs?: number;
      /** Holds waiting for their confirmation one account may have at once (default 3). */
      maxHoldsPerAccount?: number;
      /** Failed login limits (see login-limiter.ts). */
      loginLimits?: Partial<LoginLimits>;
    },
  ) {
    this.limiter = new LoginLimiter(o.loginLimits);
  }

  readonly limiter: LoginLimiter;
  private loginsInFlight = 0;
  /** Load offers being made, one account's at a time (createLoadOffer). */
  private readonly offering = new KeyedMutex();

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
    login: (req, context) => this.login(req, context),
    createLoadOffer: async (req, context) => this.createLoadOffer(req, await this.holder(context, req.accountId, "CreateLoadOffer")),
    confirmLoad: (req) => this.confirmLoad(req),
    getAccount: async (req, context) => this.getAccount((await this.holder(context, req.accountId, "GetAccount")).accountId),
    listHolds: async (req, context) => this.listHolds(req, (await this.holder(context, req.accountId, "ListHolds")).accountId),
    listStatementLines: async (req, context) => this.listStatementLines(req, (await this.holder(context, req.accountId, "ListStatementLines")).accountId),
  };

  /**
   * The account of an account holder's call: the access token it carries
   * (`authorization: Bearer`) must be one this bank issued, not expired, and
   * for `asked`, the account the request names. Returns that account id and
   * the token's hash, for a check again where money moves.
   */
  private async holder(context: CallContext, asked: string, method: string): Promise<{ accountId: string; tokenHash: string }> {
    if (!context.metadata.has("authorization"))
      throw unauthenticated(`${method} acts for the account holder only: log in (Login) and send its access token as 'authorization: Bearer TOKEN'`);
    const token = bearerTokenOf(context);
    if (!token || !ACCESS_TOKEN_SHAPE.test(token))
      throw unauthenticated("the authorization metadata holds no access token of this bank: send 'authorization: Bearer TOKEN' with the token Login gave");
    const tokenHash = accessTokenHash(token);
    const row = await this.o.store.accessToken(tokenHash);
    if (!row) throw unauthenticated("the access token is not one this bank issued, or a new password ended it: log in again");
    if (Date.parse(row.expires_at) <= Date.now()) throw unauthenticated(`the access token expired at ${row.expires_at}: log in again`);
    const accountId = requireName(asked, "account_id", 32);
    if (row.account_id !== accountId) {
      this.o.log.warn("refused an access token for another account", { method, account: accountId, holder: row.account_id, peer: context.peer });
      throw denied(ErrorReason.ERROR_REASON_NOT_ALLOWED, `the access token acts for account ${row.account_id} only, not for account ${accountId}`);
    }
    return { accountId, tokenHash };
  }

  /** Login: the account's password for a short-lived access token, with failed attempts limited per account and per caller address. */
  private async login(req: LoginRequest, context: CallContext): Promise<LoginResponse> {
    const accountId = requireName(req.accountId, "account_id", 32);
    const bytes = Buffer.byteLength(req.password, "utf8");
    if (bytes === 0) throw invalidField("password", "missing");
    if (bytes > MAX_PASSWORD_BYTES) throw invalidField("password", `longer than ${MAX_PASSWORD_BYTES} bytes: no password of this bank is`);
    const address = LoginLimiter.addressOf(context.peer);
    if (this.loginsInFlight >= MAX_LOGINS_IN_FLIGHT) {
      throw new NetpurseError(
        Status.RESOURCE_EXHAUSTED,
        ErrorReason.ERROR_REASON_TOO_MANY_ATTEMPTS,
        "the bank is checking as many logins as it can at once; try again in a second",
        {
          retryAfterMs: 1_000,
        },
      );
    }
    const lockout = this.limiter.begin(accountId, address);
    if (lockout) {
      const minutes = Math.ceil(lockout.retryAfterMs / 60_000);
      this.o.log.warn("login refused: locked after failed logins", { account: accountId, address, by: lockout.by, ms: lockout.retryAfterMs });
      throw new NetpurseError(
        Status.RESOURCE_EXHAUSTED,
        ErrorReason.ERROR_REASON_TOO_MANY_ATTEMPTS,
        lockout.by === "account"
          ? `too many failed logins to account ${accountId}: it is locked for ${minutes} more minute(s), even for the right password; try again then`
          : `too many failed logins from your address: logins from it are refused for ${minutes} more minute(s); try again then`,
        { retryAfterMs: lockout.retryAfterMs },
      );
    }
    this.loginsInFlight++;
    let ok = false;
    let checked = false;
    let hash: string | undefined;
    try {
      hash = await this.o.store.passwordHash(accountId);
      ok = await verifyPassword(req.password, hash);
      checked = true;
    } finally {
      this.loginsInFlight--;
      if (checked) {
        const locked = this.limiter.end(accountId, address, ok);
        if (!ok) this.o.log.warn("login refused: wrong account id or password", { account: accountId, address, locked });
      } else {
        // A login the bank could not check (its database failing) is no wrong guess, nor a right one.
        this.limiter.abandon(accountId, address);
      }
    }
    if (!ok) throw unauthenticated("wrong account id or password");
    const token = newAccessToken();
    const issuedAt = new Date();
    const expiresAt = new Date(issuedAt.getTime() + (this.o.accessTokenTtlMs ?? DEFAULT_ACCESS_TOKEN_TTL_MS));
    // A new password set while this one was checked ends this login too, as it ends every token.
    if (!hash || !(await this.o.store.addAccessToken({ tokenHash: accessTokenHash(token), accountId, issuedAt, expiresAt }, TOKENS_PER_ACCOUNT, hash))) {
      this.o.log.warn("login refused: the password changed while it was checked", { account: accountId, address });
      throw unauthenticated("wrong account id or password");
    }
    this.o.log.info("account holder logged in", { account: accountId, address, until: expiresAt.toISOString() });
    return { accessToken: token, expiresAt, accountId };
  }

  private async createLoadOffer(
    req: CreateLoadOfferRequest,
    { accountId, tokenHash }: { accountId: string; tokenHash: string },
  ): Promise<CreateLoadOfferResponse> {
    const id = requireTransactionId(req.transactionId);
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
    // One transaction from the checks to the hold: the cap on holds and the funds available are checked where the hold is
    // written, so concurrent offers (on this server or a replica sharing its database) cannot together pass either. It may
    // run more than once (PostgreSQL retries it when another offer interferes): nothing in it acts outside the database.
    // An account's offers take turns in this process, so that many at once (an attack) wait rather than abort each other.
    const { offer, made } = await this.offering.run(accountId, () =>
      this.o.store.db.transaction(async (tx) => {
        // Again where the money is held: a new password set since the check above has ended the token.
        if (!(await this.o.store.accessToken(tokenHash, tx))) throw unauthenticated("a new password ended the access token: log in again");
        const prior = await this.o.store.hold(id, tx);
        if (prior) {
          if (prior.request_hash !== requestHash)
            throw new NetpurseError(
              Status.ALREADY_EXISTS,
              ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
              `transaction ${id} is already a load offer for other content`,
            );
          return { offer: LoadOffer.decode(prior.offer), made: false };
        }
        const account = await this.o.store.account(accountId, tx);
        if (!account) throw notFound(`no account ${accountId} at this bank`);
        const maxHolds = this.o.maxHoldsPerAccount ?? DEFAULT_MAX_HOLDS_PER_ACCOUNT;
        const held = await this.o.store.heldCount(accountId, tx);
        if (held >= maxHolds) {
          // Logged where it is thrown: a refusal ends the transaction, which is never run again after it.
          this.o.log.warn("load offer refused: the account has as many holds as allowed", { account: accountId, held });
          throw new NetpurseError(
            Status.RESOURCE_EXHAUSTED,
            ErrorReason.ERROR_REASON_TOO_MANY_HOLDS,
            `account ${accountId} already has ${held} load(s) waiting for their confirmation, as many as this bank holds funds for at once: finish them ('netpurse card sync'), or wait for the bank to release the ones nobody came back for`,
            { retryAfterMs: 60_000 },
          );
        }
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
        await this.o.store.insertHold(tx, {
          transaction_id: id,
          account_id: accountId,
          purse_id: purse,
          amount_minor: minor,
          request_hash: requestHash,
          offer: Buffer.from(LoadOffer.encode(offer).finish()),
          key_nonce: keyNonce,
          created_at: new Date().toISOString(),
        });
        return { offer, made: true };
      }),
    );
    if (made) this.o.log.info("load offer made, funds held", { transaction: id, account: accountId, amount: formatMoney(amount) });
    return { offer };
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

  private async listHolds(req: ListHoldsRequest, accountId: string): Promise<ListHoldsResponse> {
    const size = pageSize(req.pageSize, PAGE);
    const after = pagePosition(req.pageToken, HOLDS, scopeOf(accountId), isHoldPosition);
    const a = await this.listed(accountId);
    const rows = await this.o.store.holdsPage(accountId, after && { created_at: after.t, seq: after.s }, size + 1);
    const page = rows.slice(0, size);
    const last: HoldPosition | undefined = rows.length > size ? page[page.length - 1] : undefined;
    return {
      holds: page.map((h) => holdView(a, h)),
      nextPageToken: last ? pageToken(HOLDS, scopeOf(accountId), { t: last.created_at, s: last.seq }) : "",
    };
  }

  private async listStatementLines(req: ListStatementLinesRequest, accountId: string): Promise<ListStatementLinesResponse> {
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
