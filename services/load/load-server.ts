// The load server (FIG. 17, 862; FIG. 18D): it checks the bank's sealed
// authorisation, has its host security module verify S1 and sign the LOAD
// command, verifies the card's answer (S3), settles negative results only on
// the card's proof, confirms pending loads from the card's own history, and
// seals every outcome for the bank. The security module holds every key
// that touches a card; this server holds only the banks' shared keys.

import { randomUUID } from "node:crypto";
import { Status } from "nice-grpc";
import { ErrorReason, type Sealed } from "../../gen/netpurse/card/v1/card.js";
import {
  LoadAuthorization,
  LoadConfirmation,
  LoadOutcome,
  LoadState,
  type AbandonLoadRequest,
  type AbandonLoadResponse,
  type CompleteLoadRequest,
  type CompleteLoadResponse,
  type GetLoadRequest,
  GetLoadResponse,
  type LoadServiceImplementation,
  type ProcessLoadRequestRequest,
  type ProcessLoadRequestResponse,
  type ReportCardHistoryResponse,
  type SettledLoad,
} from "../../gen/netpurse/load/v1/load.js";
import { invalidField, NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { peerOf, type Peer } from "../../lib/grpc/server.js";
import { requireName, requirePurseId, requireTransactionId, txnId, purseId as purseIdOf } from "../../lib/ids.js";
import type { Logger } from "../../lib/log.js";
import { formatMoney, money } from "../../lib/money.js";
import { Mutex } from "../../lib/mutex.js";
import { loadTransactionKey, open, seal } from "../../lib/protocol/encryption-layer.js";
import { LayoutError } from "../../lib/protocol/layout.js";
import {
  InitializeForLoadCommand,
  InitializeForLoadResponse,
  LoadResponse,
  LoadResult,
  type LoadAnswer,
  type LoadInit,
  type LoadInitCommand,
} from "../../lib/protocol/load.js";
import { LogKind, LogRecord, type CardLogRecord } from "../../lib/protocol/purse.js";
import { SecurityModuleUnavailable, unavailableStatus } from "../../lib/hsm/unavailable.js";
import { HsmRefused, REFUSAL_REASON, type HostSecurityModule } from "./hsm.js";
import type { LoadRow, LoadStore, Settlement } from "./store.js";

/** Card log records a load request may carry, and a history report. */
const MAX_LOG_IN_REQUEST = 8;
const MAX_LOG_IN_HISTORY = 32;

const denied = (reason: ErrorReason, text: string) => new NetpurseError(Status.PERMISSION_DENIED, reason, text);

function decodeField<T>(field: string, decode: () => T): T {
  try {
    return decode();
  } catch (e) {
    if (e instanceof LayoutError) throw invalidField(field, e.message);
    throw e;
  }
}

function parseLog(records: Uint8Array[], max: number, field: string): CardLogRecord[] {
  if (records.length > max) throw invalidField(field, `at most ${max} records`);
  return records.map((r, i) => {
    if (r.length !== LogRecord.size) throw invalidField(`${field}[${i}]`, `must be ${LogRecord.size} bytes`);
    return decodeField(`${field}[${i}]`, () => LogRecord.decode(r));
  });
}

export class LoadServer {
  // One load-changing step at a time: the security module works one command at a time anyway, and
  // a retried request racing its original must find the original's row, not sign a second command.
  private readonly mutex = new Mutex();

  constructor(
    private readonly o: {
      store: LoadStore;
      hsm: HostSecurityModule;
      banks: Map<string, Buffer>;
      log: Logger;
      /** Called after each settlement, once it is stored: the clearing reporter's wake-up. */
      settled?: () => void;
    },
  ) {}

  readonly service: LoadServiceImplementation = {
    processLoadRequest: (req) => this.mutex.run(() => this.processLoadRequest(req)),
    completeLoad: (req) => this.mutex.run(() => this.completeLoad(req)),
    abandonLoad: (req, ctx) => this.mutex.run(() => this.abandonLoad(req, peerOf(ctx))),
    reportCardHistory: (req) =>
      this.mutex.run(async (): Promise<ReportCardHistoryResponse> => {
        const purse = requirePurseId(req.purseId);
        return { settled: await this.settleFromHistory(purse, parseLog(req.cardLog, MAX_LOG_IN_HISTORY, "card_log")) };
      }),
    getLoad: async (req, ctx) => this.getLoad(req, peerOf(ctx)),
  };

  private bankKey(bankId: string): Buffer {
    const key = this.o.banks.get(bankId);
    if (!key) throw denied(ErrorReason.ERROR_REASON_UNKNOWN_BANK, `bank "${bankId}" is not registered at this load server`);
    return key;
  }

  /** The bank's authorisation of a load, opened and checked against the request's clear fields. */
  private authorisation(req: { transactionId?: { value: string }; bankId: string; keyNonce: Uint8Array; authorization?: Sealed }) {
    const id = requireTransactionId(req.transactionId);
    const bankId = requireName(req.bankId, "bank_id", 16);
    if (req.keyNonce.length !== 16) throw invalidField("key_nonce", "must be 16 bytes");
    if (!req.authorization) throw invalidField("authorization", "missing");
    const plain = open(loadTransactionKey(this.bankKey(bankId), bankId, id, req.keyNonce), "LOAD_AUTHORIZATION", id, req.authorization);
    if (!plain) throw denied(ErrorReason.ERROR_REASON_SEAL_BROKEN, "the bank's authorisation does not open for this bank and transaction");
    const auth = LoadAuthorization.decode(plain);
    if (auth.transactionId?.value !== id || auth.bankId !== bankId || !auth.amount || !auth.offeredAt)
      throw denied(ErrorReason.ERROR_REASON_SEAL_BROKEN, "the bank's authorisation is for another load");
    const authorised: LoadInitCommand = {
      amount: Number(auth.amount.amountMinor),
      currency: auth.amount.currency,
      bankId,
      dateTime: Math.floor(auth.offeredAt.getTime() / 1000),
      transactionRef: id,
    };
    const purse = Buffer.from(auth.purseId?.value ?? []).toString("hex");
    const amount = auth.amount;
    /** The load's record as this authorisation fixes it, with the card's answer when there is one. */
    const row = (initializeResponse: Uint8Array) => ({
      transaction_id: id,
      bank_id: bankId,
      purse_id: purse,
      amount_minor: authorised.amount,
      currency: amount.currency,
      exponent: amount.exponent,
      key_nonce: Buffer.from(req.keyNonce),
      authorised: InitializeForLoadCommand.encode(authorised),
      initialize_response: Buffer.from(initializeResponse),
    });
    return { id, bankId, amount, purse, authorised, row };
  }

  /** Steps 895-899. */
  private async processLoadRequest(req: ProcessLoadRequestRequest): Promise<ProcessLoadRequestResponse> {
    if (req.initializeResponse.length !== InitializeForLoadResponse.size)
      throw invalidField("initialize_response", `must be ${InitializeForLoadResponse.size} bytes`);
    const init = decodeField("initialize_response", () => InitializeForLoadResponse.decode(req.initializeResponse));
    const history = parseLog(req.cardLog, MAX_LOG_IN_REQUEST, "card_log");
    const { id, bankId, amount, purse: authorisedPurse, authorised, row: rowFor } = this.authorisation(req);
    const purse = init.purseId.toString("hex");
    if (authorisedPurse !== purse) throw denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, "the card is not the one the bank authorised the load for");

    // The card's history first: it may settle earlier loads of this card (pending deposits).
    const settled = await this.settleFromHistory(purse, history);

    const existing = await this.o.store.get(id);
    if (existing) return { ...this.repeatRequest(existing, bankId, req.initializeResponse), settled };

    const row = rowFor(req.initializeResponse);
    const what = `${formatMoney(amount)} to card ${purse} for bank ${bankId}`;
    let issued;
    try {
      issued = await this.o.hsm.issueLoad(authorised, amount.exponent, init);
    } catch (e) {
      if (e instanceof SecurityModuleUnavailable) throw this.unavailable(e, "no LOAD command was made and nothing was recorded: send the same request again");
      if (!(e instanceof HsmRefused)) throw e;
      // No LOAD command was made, so the card cannot have been credited: the load is over, and the bank may release its hold.
      await this.o.store.insert(
        {
          ...row,
          hsm_id: null,
          hsm_counter: null,
          load_command: null,
          proof_reference: null,
          state: "SETTLED",
          settlement: { outcome: "NOT_LOADED", kind: "REFUSED", proof: `security module refused: ${e.message}`, cardCounter: init.counter },
        },
        "refused",
        e.message,
      );
      this.o.log.warn("load refused by the security module", { transaction: id, why: e.refusal });
      const after = "; nothing was loaded, and CompleteLoad returns the confirmation that releases the bank's hold";
      if (e.refusal === "BAD_S1")
        throw denied(ErrorReason.ERROR_REASON_BAD_SIGNATURE, `the card's signature S1 does not verify for the load the bank authorised${after}`);
      throw new NetpurseError(Status.FAILED_PRECONDITION, REFUSAL_REASON[e.refusal], `${e.message}${after}`);
    }
    const proofReference = randomUUID();
    await this.o.store.insert(
      { ...row, hsm_id: issued.hsmId, hsm_counter: issued.hsmCounter, load_command: issued.command, proof_reference: proofReference, state: "PENDING" },
      "load_command_issued",
      `${what}, security module ${issued.hsmId} counter ${issued.hsmCounter}`,
    );
    this.o.log.info("LOAD command issued", { transaction: id, amount: formatMoney(amount), hsmCounter: issued.hsmCounter });
    return {
      loadCommand: issued.command,
      hsmId: Buffer.from(issued.hsmId, "hex"),
      hsmCounter: issued.hsmCounter,
      settled,
      proofReference: txnId(proofReference),
    };
  }

  /** A load that never got a LOAD command ends as NOT_LOADED, so that the bank can release its hold. */
  private async abandonLoad(req: AbandonLoadRequest, peer: Peer): Promise<AbandonLoadResponse> {
    const { id, bankId, row } = this.authorisation(req);
    if (peer.proven && peer.id !== bankId) {
      throw new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_NOT_ALLOWED, `bank ${peer.id} may not abandon a load of bank ${bankId}`);
    }
    const existing = await this.o.store.get(id);
    if (existing) {
      if (existing.bank_id !== bankId)
        throw new NetpurseError(Status.ALREADY_EXISTS, ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED, `transaction ${id} is a load for another bank`);
      if (existing.state === "PENDING") {
        throw new NetpurseError(
          Status.FAILED_PRECONDITION,
          ErrorReason.ERROR_REASON_WRONG_STATE,
          `load ${id} has a LOAD command: only the card can settle it (CompleteLoad with its zero-value answer, or its history)`,
        );
      }
      return { load: this.settledLoad(existing) };
    }
    await this.o.store.insert(
      {
        ...row(Buffer.alloc(0)),
        hsm_id: null,
        hsm_counter: null,
        load_command: null,
        proof_reference: null,
        state: "SETTLED",
        settlement: { outcome: "NOT_LOADED", kind: "ABANDONED", proof: "abandoned before any LOAD command was issued", cardCounter: 0 },
      },
      "abandoned",
      "no LOAD command was issued",
    );
    this.o.log.info("load abandoned before any LOAD command", { transaction: id });
    return { load: this.settledLoad((await this.o.store.get(id))!) };
  }

  /** The same request again gets the same command; other card data for the same transaction is another load. */
  private repeatRequest(row: LoadRow, bankId: string, initializeResponse: Uint8Array): Omit<ProcessLoadRequestResponse, "settled"> {
    if (row.bank_id !== bankId || !row.initialize_response.equals(Buffer.from(initializeResponse))) {
      throw new NetpurseError(
        Status.ALREADY_EXISTS,
        ErrorReason.ERROR_REASON_TRANSACTION_ID_REUSED,
        `transaction ${row.transaction_id} already has a load request with other card data`,
      );
    }
    if (!row.load_command) {
      throw new NetpurseError(
        Status.FAILED_PRECONDITION,
        ErrorReason.ERROR_REASON_WRONG_STATE,
        `load ${row.transaction_id} was refused: ${row.proof ?? "see GetLoad"}`,
      );
    }
    return { loadCommand: row.load_command, hsmId: Buffer.from(row.hsm_id!, "hex"), hsmCounter: row.hsm_counter!, proofReference: txnId(row.proof_reference!) };
  }

  /** Steps 883-890, with the negative result handling. */
  private async completeLoad(req: CompleteLoadRequest): Promise<CompleteLoadResponse> {
    const id = requireTransactionId(req.transactionId);
    const row = await this.o.store.get(id);
    if (!row) throw notFound(`no load with transaction id ${id}`);
    if (row.state === "SETTLED") return { load: this.settledLoad(row) };

    if (req.loadResponse.length && req.loadResponse.length !== LoadResponse.size)
      throw invalidField("load_response", `must be ${LoadResponse.size} bytes, or empty when the card's answer is lost`);
    const answer = req.loadResponse.length ? decodeField("load_response", () => LoadResponse.decode(req.loadResponse)) : undefined;
    const init = InitializeForLoadResponse.decode(row.initialize_response);
    const authorised = InitializeForLoadCommand.decode(row.authorised);

    let settlement: Settlement;
    if (answer?.result === LoadResult.LOADED) {
      if (!this.provesCredit(row, authorised, init, answer)) {
        await this.o.store.event(this.o.store.db, id, "s3_refused", "the card's S3 does not verify; the load stays pending");
        this.o.log.warn("LOAD answer refused: S3 does not verify", { transaction: id });
        throw denied(
          ErrorReason.ERROR_REASON_BAD_SIGNATURE,
          "the card's signature S3 does not verify; the load stays pending until the card's history proves it",
        );
      }
      settlement = { outcome: "LOADED", kind: "S3", proof: "S3 verified", cardCounter: answer.counter, cardSignature: answer.s3 };
    } else {
      // A negative result, or no answer at all: nothing is taken on the client's word.
      if (req.zeroValueInitializeResponse.length !== InitializeForLoadResponse.size) {
        throw invalidField(
          "zero_value_initialize_response",
          `a ${answer ? "negative result" : "missing LOAD answer"} needs the card's ${InitializeForLoadResponse.size}-byte answer to a zero-value INITIALIZE FOR LOAD`,
        );
      }
      const zero = decodeField("zero_value_initialize_response", () => InitializeForLoadResponse.decode(req.zeroValueInitializeResponse));
      if (!zero.purseId.equals(init.purseId)) throw denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, "the zero-value answer comes from another card");
      settlement = this.negativeResult({ ...authorised, amount: 0, transactionRef: row.proof_reference! }, init, zero);
    }
    if (await this.o.store.settle(id, settlement)) this.o.settled?.();
    this.o.log.info("load settled", { transaction: id, outcome: settlement.outcome, proof: settlement.proof });
    return { load: this.settledLoad((await this.o.store.get(id))!) };
  }

  /** Whether a positive answer (from LOAD or from the card's log) is the genuine credit this load asked for. */
  private provesCredit(row: LoadRow, authorised: LoadInitCommand, init: LoadInit, answer: LoadAnswer): boolean {
    return (
      answer.result === LoadResult.LOADED &&
      answer.counter === init.counter + 1 &&
      answer.balance === init.balance + authorised.amount &&
      this.checked(() => this.o.hsm.verifyLoadAnswer(authorised, init, { hsmCounter: row.hsm_counter! }, answer))
    );
  }

  /** A check by the security module; a token out of reach decides nothing, and the caller is told to come back (UNAVAILABLE). */
  private checked(check: () => boolean): boolean {
    try {
      return check();
    } catch (e) {
      if (e instanceof SecurityModuleUnavailable) throw this.unavailable(e, "the load was left as it was: send the same request again");
      throw e;
    }
  }

  private unavailable(e: SecurityModuleUnavailable, consequence: string) {
    this.o.log.warn("security module unavailable", { why: e.message });
    return unavailableStatus(e, consequence);
  }

  /**
   * The negative result handling of WO 98/49658 (FIG. 18 text). The card
   * answered a zero-value INITIALIZE FOR LOAD with the original request's
   * elements and the load's proof reference, which exists only since the
   * LOAD command does (so no such answer can be made before the card could
   * take the LOAD, and making it ends the card's load session). If its
   * counter equals the original's, the server takes the
   * values the original would have left had it failed; if not, it first
   * decreases the counter to the original's. Either way the security module
   * recomputes S1 over those values and the card's fresh challenge: a match
   * proves the card is as it was (not loaded); anything else is a load.
   */
  private negativeResult(zeroCommand: LoadInitCommand, init: LoadInit, zero: LoadInit): Settlement {
    const countersEqual = zero.counter === init.counter;
    const expected: LoadInit = { ...zero, counter: init.counter, balance: init.balance };
    const branch = countersEqual ? "counters equal" : `counter ${zero.counter} decreased to the original ${init.counter}`;
    if (this.checked(() => this.o.hsm.matchesS1(zeroCommand, expected))) {
      return {
        outcome: "NOT_LOADED",
        kind: "NEGATIVE_RESULT",
        proof: `negative result proven: zero-value S1 (${branch}) matches the card unloaded`,
        cardCounter: init.counter,
      };
    }
    return {
      outcome: "LOADED",
      kind: "NEGATIVE_RESULT_UNPROVEN",
      proof: `negative result not proven: zero-value S1 (${branch}) does not match the card unloaded, so it is treated as loaded`,
      cardCounter: zero.counter,
    };
  }

  /** Pending deposits: the card's own log records of its credits confirm the loads they belong to. */
  private async settleFromHistory(purse: string, history: CardLogRecord[]): Promise<SettledLoad[]> {
    const credits = history.filter((r) => r.kind === LogKind.LOAD);
    const rows = await this.o.store.ofPurse(
      purse,
      credits.map((c) => c.transactionRef),
    );
    const out: SettledLoad[] = [];
    for (const row of rows) {
      if (row.state === "PENDING") {
        const credit = credits.find(
          (c) => c.transactionRef === row.transaction_id && c.moduleId.toString("hex") === row.hsm_id && c.moduleCounter === row.hsm_counter,
        );
        const init = InitializeForLoadResponse.decode(row.initialize_response);
        const authorised = InitializeForLoadCommand.decode(row.authorised);
        const answer = credit && { result: LoadResult.LOADED, counter: credit.counter, balance: credit.balance, s3: credit.cardSignature };
        if (!answer || credit.amount !== authorised.amount || !this.provesCredit(row, authorised, init, answer)) {
          await this.o.store.event(this.o.store.db, row.transaction_id, "history_refused", "a log record for this load does not prove it");
          continue;
        }
        const confirmed = await this.o.store.settle(row.transaction_id, {
          outcome: "LOADED",
          kind: "CARD_HISTORY",
          proof: "card history: the credit and its S3 in the card's log",
          cardCounter: answer.counter,
          cardSignature: answer.s3,
        });
        if (confirmed) this.o.settled?.();
        this.o.log.info("pending load confirmed from the card's history", { transaction: row.transaction_id });
      }
      out.push(this.settledLoad((await this.o.store.get(row.transaction_id))!));
    }
    return out;
  }

  /** A settled load with its confirmation sealed for the bank (step 890). */
  private settledLoad(row: LoadRow): SettledLoad {
    const outcome = row.outcome === "LOADED" ? LoadOutcome.LOAD_OUTCOME_LOADED : LoadOutcome.LOAD_OUTCOME_NOT_LOADED;
    const confirmation = LoadConfirmation.encode({
      transactionId: txnId(row.transaction_id),
      bankId: row.bank_id,
      purseId: purseIdOf(row.purse_id),
      amount: money(row.amount_minor, row.currency, row.exponent),
      outcome,
      cardCounter: row.card_counter ?? 0,
      cardSignature: row.card_signature ?? Buffer.alloc(0),
      proof: row.proof ?? "",
      settledAt: new Date(row.settled_at!),
    }).finish();
    const key = loadTransactionKey(this.bankKey(row.bank_id), row.bank_id, row.transaction_id, row.key_nonce);
    const sealed: Sealed = seal(key, "LOAD_CONFIRMATION", row.transaction_id, confirmation);
    return { transactionId: txnId(row.transaction_id), outcome, confirmation: sealed };
  }

  /**
   * Whoever has a load's id learns its state, nothing more. The whole record
   * (card, amount, outcome, the proof reference a zero-value answer needs)
   * goes to the operator, and to whoever shows the load's offer: the bank's
   * sealed authorisation reaches only the cardholder's client, which needs
   * the proof reference when the answer to its load request was lost.
   */
  private async getLoad(req: GetLoadRequest, peer: Peer): Promise<GetLoadResponse> {
    const id = requireTransactionId(req.transactionId);
    const proof = req.bankId !== "" || req.keyNonce.length > 0 || req.authorization !== undefined;
    // The proof is checked before the record is read: an authorisation that does not open learns nothing, not even whether the load exists.
    const offer = proof ? this.authorisation(req) : undefined;
    const row = await this.o.store.get(id);
    if (!row) throw notFound(`no load with transaction id ${id}`);
    const state = row.state === "PENDING" ? LoadState.LOAD_STATE_PENDING : LoadState.LOAD_STATE_SETTLED;
    if (offer && (row.bank_id !== offer.bankId || !row.key_nonce.equals(Buffer.from(req.keyNonce)) || row.purse_id !== offer.purse)) {
      this.o.log.warn("load record refused: the authorisation is of another load", { transaction: id });
      throw denied(ErrorReason.ERROR_REASON_CONFIRMATION_MISMATCH, `the authorisation given is not the one load ${id} was made with; give its own offer's`);
    }
    // Without TLS (--insecure) no caller has an identity to check, as everywhere else.
    const operator = peer.proven ? peer.kind === "operator" : peer.insecure;
    // A stranger learns the state of an id it already has, and nothing else.
    if (!offer && !operator) return GetLoadResponse.fromPartial({ transactionId: txnId(id), state });
    return {
      transactionId: txnId(id),
      bankId: row.bank_id,
      purseId: purseIdOf(row.purse_id),
      amount: money(row.amount_minor, row.currency, row.exponent),
      state,
      outcome:
        row.outcome === "LOADED"
          ? LoadOutcome.LOAD_OUTCOME_LOADED
          : row.outcome === "NOT_LOADED"
            ? LoadOutcome.LOAD_OUTCOME_NOT_LOADED
            : LoadOutcome.LOAD_OUTCOME_UNSPECIFIED,
      proof: row.proof ?? "",
      hsmId: Buffer.from(row.hsm_id ?? "", "hex"),
      hsmCounter: row.hsm_counter ?? 0,
      proofReference: row.proof_reference ? txnId(row.proof_reference) : undefined,
    };
  }
}
