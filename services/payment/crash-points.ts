// Test-only: makes the payment server die at a named step, as a crash would,
// so tests can check that recovery ends what every step leaves behind. Off
// unless NETPURSE_TEST_PAYMENT_CRASH_AT is set, to "before:STEP" (just before
// the event STEP is written, so its change is not in payment.db) or
// "after:STEP" (just after it is written, before anything else happens);
// STEP is a step name of the purchase's events (GetPurchase lists them). Never
// set it outside tests: the process kills itself with SIGKILL.

const crashAt = process.env.NETPURSE_TEST_PAYMENT_CRASH_AT ?? "";
// Said at start, so a variable left set by mistake outside a test is seen before it kills a server.
if (crashAt !== "") process.stderr.write(`NETPURSE_TEST_PAYMENT_CRASH_AT=${crashAt} is set: this payment server kills itself there (test only)\n`);

/** Dies here when the test asked for this point. */
export function crashPoint(when: "before" | "after", step: string): void {
  if (crashAt !== "" && crashAt === `${when}:${step}`) {
    process.stderr.write(`NETPURSE_TEST_PAYMENT_CRASH_AT=${crashAt}: the payment server kills itself here (test only)\n`);
    process.kill(process.pid, "SIGKILL");
  }
}
