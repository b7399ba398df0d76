// Test-only: makes the payment server die at a named step, as a crash would,
// so tests can check that recovery ends what every step leaves behind. Off
// unless NETPURSE_TEST_PAYMENT_CRASH_AT is set, to "before:STEP" (just before
// the event STEP is written, so its change is not in payment.db) or
// "after:STEP" (just after it is written, before anything else happens);
// STEP is a step name of the purchase's events (GetPurchase lists them). Never
// set it outside tests: the process kills itself with SIGKILL.

import { crashPoints } from "../../lib/crash-point.js";

const check = crashPoints("NETPURSE_TEST_PAYMENT_CRASH_AT", "payment server");

/** Dies here when the test asked for this point. */
export function crashPoint(when: "before" | "after", step: string): void {
  check(`${when}:${step}`);
}
