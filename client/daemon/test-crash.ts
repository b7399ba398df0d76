// Test only: the client daemon process killing itself at a named step of
// its journal, so the crash tests can stop it at each step of a load or a
// purchase and check what its recovery makes of the journal it left.
// Off unless NETPURSE_TEST_DAEMON_DIE_AT names a step; never set it in
// production.

import { crashPoints } from "../../lib/crash-point.js";

/** The environment variable naming the step (test only). */
export const DIE_AT_ENV = "NETPURSE_TEST_DAEMON_DIE_AT";

/**
 * The steps a test may name: "load:STATE" right after a load's journal
 * row reached STATE, "purchase:STATE" the same for a purchase, and
 * "purchase:before-CARD_ANSWERED" after the card answered DEBIT, before its
 * answer was journaled.
 */
export const DIE_STEPS = [
  "load:STARTED",
  "load:OFFERED",
  "load:REQUESTED",
  "load:LOAD_SENT",
  "load:CARD_ANSWERED",
  "load:SETTLED",
  "purchase:STARTED",
  "purchase:DEBIT_SENT",
  "purchase:before-CARD_ANSWERED",
  "purchase:CARD_ANSWERED",
  "purchase:CONFIRMED",
  "purchase:RECEIPT",
] as const;

export type DieStep = (typeof DIE_STEPS)[number];

/** Kills this process at once (SIGKILL: no clean-up, as a crash or a power cut) when the test named this step. */
export const dieAt: (step: string) => void = crashPoints(DIE_AT_ENV, "client daemon");
