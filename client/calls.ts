// How the client treats its calls to servers: which answers end a
// transaction for good, and retries of idempotent calls while a failure is
// transient. Purchases and loads share these rules.

import { ClientError, Status } from "nice-grpc";
import { ErrorReason } from "../gen/netpurse/card/v1/card.js";
import { NetpurseError, reasonOf, retryAfterMsOf } from "../lib/grpc/errors.js";

/** The longest the client waits on a server's advice before trying a call again. */
const MAX_ADVISED_WAIT_MS = 5_000;

/**
 * Whether a server's answer ends the transaction for good. Anything else
 * (timeouts, unavailability, internal errors) leaves it to be finished
 * later: once the card has answered, only a ruling may close the record.
 */
export function isFinal(e: unknown): boolean {
  if (!(e instanceof ClientError || e instanceof NetpurseError)) return false;
  return [Status.FAILED_PRECONDITION, Status.PERMISSION_DENIED, Status.INVALID_ARGUMENT, Status.NOT_FOUND, Status.ALREADY_EXISTS].includes(e.code);
}

/** Retries an idempotent call while the failure is transient, waiting at least what the server advised (RetryInfo). */
export async function retrying<T>(call: () => Promise<T>, attempts = 5): Promise<T> {
  let wait = 200;
  for (let i = 1; ; i++) {
    try {
      return await call();
    } catch (e) {
      // An empty PSAM pool is final for this call but not for long: a payment server or terminal host that just
      // (re)started fills it within a second or two, and the same draw request is then served.
      const transient =
        e instanceof ClientError &&
        (((e.code === Status.UNAVAILABLE || e.code === Status.DEADLINE_EXCEEDED || e.code === Status.ABORTED) &&
          reasonOf(e) !== ErrorReason.ERROR_REASON_IN_DOUBT) ||
          reasonOf(e) === ErrorReason.ERROR_REASON_NO_PSAM_ATTACHED);
      if (!transient || i >= attempts) throw e;
      await new Promise((r) => setTimeout(r, Math.max(wait, Math.min(retryAfterMsOf(e) ?? 0, MAX_ADVISED_WAIT_MS))));
      wait = Math.min(wait * 2, 2_000);
    }
  }
}
