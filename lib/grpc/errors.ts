// Errors as gRPC status codes with a precise message and, where a client must
// branch, a machine-readable reason in the `netpurse-error-reason` trailer.

import { ClientError, Metadata, ServerError, Status } from "nice-grpc";
import { ErrorReason, errorReasonFromJSON, errorReasonToJSON } from "../../gen/netpurse/card/v1/card.js";

export const REASON_TRAILER = "netpurse-error-reason";

/** A ServerError that carries a reason; the error middleware puts the reason in the trailer. */
export class NetpurseError extends ServerError {
  constructor(
    code: Status,
    readonly reason: ErrorReason,
    details: string,
  ) {
    super(code, details);
  }
}

export const invalidField = (field: string, problem: string) =>
  new NetpurseError(Status.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD, `${field}: ${problem}`);

export const notFound = (what: string) => new NetpurseError(Status.NOT_FOUND, ErrorReason.ERROR_REASON_NOT_FOUND, what);

/** A client-side error with the reason read from the trailer (see reasonMiddleware in client.ts). */
export interface ReasonedClientError extends ClientError {
  reason?: ErrorReason;
}

export function reasonOf(e: unknown): ErrorReason | undefined {
  if (e instanceof NetpurseError) return e.reason;
  return (e as ReasonedClientError | undefined)?.reason;
}

export function reasonFromTrailer(trailer: Metadata): ErrorReason | undefined {
  const v = trailer.get(REASON_TRAILER);
  if (!v) return undefined;
  const r = errorReasonFromJSON(v);
  return r === ErrorReason.UNRECOGNIZED ? undefined : r;
}

export function reasonName(r: ErrorReason): string {
  return errorReasonToJSON(r);
}

/** Re-raises a downstream service's error to our own caller with its code, reason and message. */
export function passOn(e: unknown, prefix: string): never {
  if (e instanceof ClientError) {
    const reason = (e as ReasonedClientError).reason ?? ErrorReason.ERROR_REASON_UNSPECIFIED;
    throw new NetpurseError(e.code, reason, `${prefix}: ${e.details}`);
  }
  throw e;
}

export { Status };
