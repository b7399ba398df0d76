// A security module out of reach. Kept apart from the PKCS#11 wrapper so
// that the services can recognise it without loading anything of PKCS#11.

import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { NetpurseError } from "../grpc/errors.js";

/**
 * The token cannot be used now: the module did not load, the token is
 * missing or was removed, the session or the login was lost, the PIN was
 * refused. Nothing was signed; the same call may succeed once the token is
 * back. The message never holds the PIN.
 */
export class SecurityModuleUnavailable extends Error {
  override readonly name = "SecurityModuleUnavailable";
}

/** What a caller of a service is told: UNAVAILABLE, reason SECURITY_MODULE_UNAVAILABLE, with the advice to retry. */
export function unavailableStatus(e: SecurityModuleUnavailable, consequence: string): NetpurseError {
  return new NetpurseError(
    Status.UNAVAILABLE,
    ErrorReason.ERROR_REASON_SECURITY_MODULE_UNAVAILABLE,
    `the security module is unavailable (${e.message}); ${consequence}`,
  );
}
