// How a PSAM's or a card's refusal reaches the cardholder: a gRPC status
// with a reason and a message that says what happened to the money.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { SW, swHex } from "../../lib/apdu/apdu.js";
import { invalidField, NetpurseError } from "../../lib/grpc/errors.js";
import { DebitResult } from "../../lib/protocol/purse.js";
import type { Failure } from "./store.js";

/** A PSAM's refusal of the card (INITIALIZE) or of the amount (DRAW AMOUNT): nothing was signed. */
export function psamRefusal(sw: number): NetpurseError {
  const fp = (reason: ErrorReason, what: string) =>
    new NetpurseError(Status.FAILED_PRECONDITION, reason, `${what} (PSAM SW ${swHex(sw)}); nothing was debited`);
  switch (sw) {
    case SW.CARD_EXPIRED:
      return fp(ErrorReason.ERROR_REASON_CARD_EXPIRED, "the card has expired");
    case SW.CURRENCY_NOT_ACCEPTED:
      return fp(ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, "the card's currency is not the amount's, or the PSAM does not accept it");
    case SW.CARD_BLOCKED:
      return fp(ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked");
    case SW.INSUFFICIENT_BALANCE:
      return fp(ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE, "the card's balance is lower than the amount");
    case SW.REFERENCED_DATA_NOT_FOUND:
      return fp(ErrorReason.ERROR_REASON_KEY_VERSION_UNKNOWN, "no PSAM holds the card's key version");
    case SW.SECURITY_STATUS_NOT_SATISFIED:
      // The card's cryptogram does not verify: a made-up card, or a genuine answer altered on the way.
      return new NetpurseError(
        Status.PERMISSION_DENIED,
        ErrorReason.ERROR_REASON_BAD_SIGNATURE,
        `the card's INITIALIZE response does not prove a genuine card: its cryptogram does not verify (PSAM SW ${swHex(sw)}); nothing was debited`,
      );
    case SW.AMOUNT_OUT_OF_RANGE:
      return invalidField("draw_request.amount.amount_minor", `the PSAM refused the amount (SW ${swHex(sw)})`);
    case SW.WRONG_LENGTH:
    case SW.WRONG_DATA:
    case SW.FUNCTION_NOT_SUPPORTED:
      return invalidField("draw_request.initialize_response", `the PSAM refused the card's response as malformed (SW ${swHex(sw)})`);
    default:
      return fp(ErrorReason.ERROR_REASON_UNSPECIFIED, "the PSAM refused the card");
  }
}

/** The card's signed refusal of a debit. */
export function cardDeclined(result: number): NetpurseError {
  const why: Record<number, [ErrorReason, string]> = {
    [DebitResult.INSUFFICIENT_BALANCE]: [ErrorReason.ERROR_REASON_INSUFFICIENT_BALANCE, "the card's balance is lower than the amount"],
    [DebitResult.CURRENCY_MISMATCH]: [ErrorReason.ERROR_REASON_CURRENCY_MISMATCH, "the card's currency is not the amount's"],
    [DebitResult.EXPIRED]: [ErrorReason.ERROR_REASON_CARD_EXPIRED, "the card has expired"],
    [DebitResult.BLOCKED]: [ErrorReason.ERROR_REASON_CARD_BLOCKED, "the card is blocked"],
  };
  const [reason, text] = why[result] ?? [ErrorReason.ERROR_REASON_CARD_REFUSED, `the card declined the debit (result ${result})`];
  return new NetpurseError(Status.FAILED_PRECONDITION, reason, `${text}; the card proved it did not debit and the transaction was reversed in the PSAM`);
}

/** The card refused the DEBIT command outright (an error status word). */
export function cardRefused(sw: number): NetpurseError {
  return new NetpurseError(
    Status.FAILED_PRECONDITION,
    ErrorReason.ERROR_REASON_CARD_REFUSED,
    `the card refused the DEBIT command (SW ${swHex(sw)}); the transaction was reversed in the PSAM and nothing was debited`,
  );
}

/** The card's answer does not verify. */
export function badCardSignature(detail: string): NetpurseError {
  return new NetpurseError(Status.PERMISSION_DENIED, ErrorReason.ERROR_REASON_BAD_SIGNATURE, `the card signature does not verify: ${detail}`);
}

export function sealBroken(what: string): NetpurseError {
  return new NetpurseError(
    Status.PERMISSION_DENIED,
    ErrorReason.ERROR_REASON_SEAL_BROKEN,
    `${what} does not open: wrong key, another transaction's or another message's, or altered on the way`,
  );
}

/** How a refusal is recorded with the purchase, to be given again to a retry. */
export function failureOf(e: NetpurseError): Failure {
  return { code: e.code, reason: e.reason, message: e.details };
}

/** The recorded refusal, as its caller was first told it. */
export function errorOf(f: Failure): NetpurseError {
  return new NetpurseError(f.code, f.reason, f.message);
}
