// Errors as gRPC status codes with a precise message, and the gRPC rich error
// model (google.rpc.Status in the grpc-status-details-bin trailer) for what a
// client must branch on: ErrorInfo with the netpurse reason, BadRequest with
// the field at fault, RetryInfo where trying again makes sense. Any gRPC
// client in any language reads them (grpcurl prints them).

import { ClientError, Status } from "nice-grpc";
import { BadRequest, ErrorInfo, RetryInfo, RichClientError, RichServerError, type ErrorDetails } from "nice-grpc-error-details";
import { ErrorReason, errorReasonFromJSON, errorReasonToJSON } from "../../gen/netpurse/card/v1/card.js";

/** ErrorInfo.domain of every netpurse error: its reasons are the names of netpurse.card.v1.ErrorReason. */
const ERROR_DOMAIN = "netpurse.card.v1";

/** How long a client should wait before retrying, by code, when the error does not say otherwise. */
const RETRY_AFTER_MS: Partial<Record<Status, number>> = {
  [Status.RESOURCE_EXHAUSTED]: 1_000,
  [Status.UNAVAILABLE]: 2_000,
  [Status.ABORTED]: 100,
};

function retryInfo(ms: number): RetryInfo {
  return RetryInfo.fromPartial({ retryDelay: { seconds: Math.floor(ms / 1000), nanos: (ms % 1000) * 1_000_000 } });
}

/** A refusal with its reason; the details middleware sends the rich error model with it. */
export class NetpurseError extends RichServerError {
  constructor(
    code: Status,
    readonly reason: ErrorReason,
    details: string,
    more: { field?: string; retryAfterMs?: number; metadata?: Record<string, string> } = {},
  ) {
    const extra: ErrorDetails[] = [ErrorInfo.fromPartial({ reason: errorReasonToJSON(reason), domain: ERROR_DOMAIN, metadata: more.metadata ?? {} })];
    if (more.field !== undefined) extra.push(BadRequest.fromPartial({ fieldViolations: [{ field: more.field, description: details }] }));
    const retry = more.retryAfterMs ?? RETRY_AFTER_MS[code];
    if (retry !== undefined) extra.push(retryInfo(retry));
    super(code, details, extra);
  }
}

/** INVALID_ARGUMENT naming the field (as a BadRequest field violation too). */
export const invalidField = (field: string, problem: string) =>
  new NetpurseError(Status.INVALID_ARGUMENT, ErrorReason.ERROR_REASON_INVALID_FIELD, `${field}: ${problem}`, { field });

export const notFound = (what: string) => new NetpurseError(Status.NOT_FOUND, ErrorReason.ERROR_REASON_NOT_FOUND, what);

/** The netpurse reason of an error: ours, or one a netpurse server sent in its ErrorInfo. */
export function reasonOf(e: unknown): ErrorReason | undefined {
  if (e instanceof NetpurseError) return e.reason;
  if (!(e instanceof RichClientError)) return undefined;
  for (const d of e.extra) {
    if (d.$type === "google.rpc.ErrorInfo" && d.domain === ERROR_DOMAIN) {
      const r = errorReasonFromJSON(d.reason);
      return r === ErrorReason.UNRECOGNIZED ? undefined : r;
    }
  }
  return undefined;
}

/** The metadata of a netpurse ErrorInfo (say, the client daemon's transaction_id, state and may_complete); empty if none. */
export function errorMetadataOf(e: unknown): Record<string, string> {
  const extra = e instanceof RichClientError || e instanceof RichServerError ? e.extra : [];
  for (const d of extra) if (d.$type === "google.rpc.ErrorInfo" && d.domain === ERROR_DOMAIN) return { ...d.metadata };
  return {};
}

/** The field a server named in its BadRequest, if any. */
export function fieldOf(e: unknown): string | undefined {
  const extra = e instanceof RichClientError || e instanceof RichServerError ? e.extra : [];
  for (const d of extra) if (d.$type === "google.rpc.BadRequest") return d.fieldViolations[0]?.field;
  return undefined;
}

/** The retry delay a server advised, in ms. */
export function retryAfterMsOf(e: unknown): number | undefined {
  const extra = e instanceof RichClientError || e instanceof RichServerError ? e.extra : [];
  for (const d of extra)
    if (d.$type === "google.rpc.RetryInfo" && d.retryDelay) return d.retryDelay.seconds * 1000 + Math.floor(d.retryDelay.nanos / 1_000_000);
  return undefined;
}

export function reasonName(r: ErrorReason): string {
  return errorReasonToJSON(r);
}

/** Re-raises a downstream service's error to our own caller with its code, reason and message. */
export function passOn(e: unknown, prefix: string): never {
  if (e instanceof ClientError) {
    throw new NetpurseError(e.code, reasonOf(e) ?? ErrorReason.ERROR_REASON_UNSPECIFIED, `${prefix}: ${e.details}`, {
      ...(fieldOf(e) !== undefined ? { field: fieldOf(e) } : {}),
      ...(retryAfterMsOf(e) !== undefined ? { retryAfterMs: retryAfterMsOf(e) } : {}),
    });
  }
  throw e;
}

export { Status };
