// The modes benchmark's part of the report: one row per confirmation mode
// and delay beside the chatty baseline at the same delay, then hold time and
// latency against delay, the method, and anything that went wrong.

import { formatMoney } from "../lib/money.js";
import { EUR } from "../services/network/layout.js";
import { CHATTY } from "./chatty.js";
import { markdown, mib, ms, perPurchase, rate, ratio, whole } from "./format.js";
import type { ModesReport } from "./modes.js";
import { SONG } from "./purchases.js";
import { ROUTINE_STEPS } from "./service-records.js";

const chattyAt = (m: ModesReport, delayMs: number) => m.results.find((r) => r.approach === CHATTY && r.delayMs === delayMs);

function modesTable(m: ModesReport): string {
  const rows = m.results.map((r) => {
    const chatty = chattyAt(m, r.delayMs);
    return [
      r.approach,
      String(r.delayMs),
      perPurchase(r.roundTrips.onPath),
      perPurchase(r.roundTrips.after),
      perPurchase(r.roundTrips.merchantToPayment),
      perPurchase(r.messages),
      whole(r.bytesPerPurchase),
      rate(r.perSecond),
      ms(r.p50Ms),
      ms(r.p99Ms),
      ms(r.psamHold.p50Ms),
      ms(r.psamHold.p99Ms),
      mib(r.serverPeakMemoryMiB),
      ratio(r.p50Ms, chatty?.p50Ms),
      ratio(r.psamHold.p50Ms, chatty?.psamHold.p50Ms),
      String(r.errors + r.backgroundFailures),
    ];
  });
  return markdown(
    [
      "approach",
      "delay ms each way",
      "round trips on path",
      "round trips after",
      "validation → payment reports",
      "messages",
      "bytes via proxy",
      "purchases/s",
      "p50 ms",
      "p99 ms",
      "PSAM hold p50 ms",
      "PSAM hold p99 ms",
      "server VmHWM MiB",
      "p50 ÷ chatty p50",
      "hold p50 ÷ chatty hold p50",
      "errors",
    ],
    rows,
  );
}

/** Per approach, how hold time and latency move with the delay: the modes that free the PSAM early should not move their hold time. */
function byDelayTable(m: ModesReport): string {
  const approaches = [...new Set(m.results.map((r) => r.approach))];
  const at = (approach: string, delayMs: number) => m.results.find((r) => r.approach === approach && r.delayMs === delayMs);
  const rows = approaches.map((a) => [a, ...m.delaysMs.flatMap((d) => [ms(at(a, d)?.psamHold.p50Ms ?? NaN), ms(at(a, d)?.p50Ms ?? NaN)])]);
  return markdown(["approach", ...m.delaysMs.flatMap((d) => [`PSAM hold p50 ms at ${d} ms`, `latency p50 ms at ${d} ms`])], rows);
}

/** What the one-round-trip modes defer: proofs still to report or record when the load ended, and how long they took. */
function backlogTable(m: ModesReport): string {
  const rows = m.results.flatMap((r) =>
    r.backlog
      ? [
          [
            r.approach,
            String(r.delayMs),
            String(r.backlog.merchantProofs.atEnd),
            (r.backlog.merchantProofs.waitedMs / 1000).toFixed(1),
            String(r.backlog.unrecordedProofs.atEnd),
            (r.backlog.unrecordedProofs.waitedMs / 1000).toFixed(1),
            String(r.backlog.merchantProofs.left + r.backlog.unrecordedProofs.left),
          ],
        ]
      : [],
  );
  return markdown(
    ["mode", "delay ms each way", "proofs in the validation outbox", "waited s", "purchases not yet in a PSAM batch", "waited s", "left after waiting"],
    rows,
  );
}

function notes(m: ModesReport): string {
  const lateness = Math.max(...m.results.map((r) => r.proxy.latenessP99Ms).filter(Number.isFinite));
  const windowSamples = m.results.map((r) => r.completed);
  const warmups = m.results.map((r) => r.warmupMs / 1000);
  return [
    `- ${m.psams} PSAMs, ${m.cardholders} cardholders in a closed loop; each row starts a fresh network (or remote reader) and a fresh delay proxy. Song "${SONG.productId}" at ${formatMoney({ amountMinor: SONG.priceMinor, currency: EUR, exponent: 2 })}.`,
    `- Warm-up: at least ${m.phases.warmupMs / 1000} s, and until every cardholder has finished one purchase, so that the window sees the steady state and not the start, when all ${m.cardholders} queue at once (${Math.min(...warmups).toFixed(1)} to ${Math.max(...warmups).toFixed(1)} s here); then a ${m.phases.measureMs / 1000} s window (${Math.min(...windowSamples)} to ${Math.max(...windowSamples)} purchases per window).`,
    "- Delay: a TCP proxy in a process of its own (bench/delay-proxy-process.ts) holds every chunk for the given time in each direction, on the cardholder ↔ payment server path only (the merchant's offers name the proxy); the cardholder ↔ merchant path and the services' own links are not delayed. " +
      `The proxy's timers fired up to ${ms(lateness)} ms late (p99 of the worst row) on top of the delay.`,
    "- Round trips on path: cardholder → payment server RPCs that payOffer waited for, counted by wrapping the clients payOffer is given; after: RPCs still in flight or started when payOffer returned (CLIENT_COMPARES's ReportCardSignature). Validation → payment reports: ReportCardSignature calls from the merchant validation's outbox (MERCHANT_COMPARES), read from its database, off the cardholder's path. Per successful purchase of the whole run.",
    "- Messages: gRPC messages on the delayed path per purchase, both directions (a unary call is a request and a response); bytes via proxy: everything the proxy carried (HTTP/2 framing, pings and the connection's set-up included) per purchase. Every mode also makes one undelayed CompleteOrder to the merchant inside payOffer, and the merchant one ValidateConfirmation to its validation service.",
    "- Latency: payOffer, timed; the merchant's CreateOrder before it is not. PSAM hold: the payment server's \"psam_released\" events (lease taken → released, whole ms) of leases that ended inside the window, from DATA/payment/payment.db. In SERVER_COMPARES, CLIENT_COMPARES and MERCHANT_COMPARES the payment server takes the PSAM a second time, briefly and off the purchase's path, to record the card's proof in its batch; that lease is not logged, so it is not in these figures.",
    `- ${CHATTY}: the approach this design replaces. A server process (bench/remote-reader-server.ts) holds ${m.psams} software PSAMs and drives each cardholder's card over a bidirectional gRPC stream through the same proxy, one card APDU per round trip: SELECT, INITIALIZE FOR PURCHASE, then (PSAM, local) CARD RESET, INITIALIZE, DRAW AMOUNT, then DEBIT, then (PSAM, local) VERIFY DEBIT. It takes the PSAM before SELECT and gives it back after VERIFY DEBIT. Its round trips are card APDUs over the network, its messages the card's ATR, the commands and the responses, its hold time lease taken → released in that server. It has no merchant, encryption layer or transaction database, so it does less work per purchase than netpurse: its CPU cost flatters it, its round trips do not.`,
    "- Ratios compare with the chatty baseline at the same delay; server VmHWM is the peak resident memory of the process holding the PSAM pool (payment server or remote reader) since its start.",
    "- Work left behind: when the load ends, the benchmark counts the card proofs the merchant validation has yet to report and the purchases the payment server has yet to rule on or record in their PSAM's batch (states DEBIT_RESPONSE_RECEIVED and PROVEN), then waits, at most 15 s each and in turn, for the cardholders' own proof reports, the validation's outbox and the payment server, before it stops the network.",
    "- Errors: failed purchases, plus calls after the purchase that failed or never ended, and proofs still unreported or unrecorded when the benchmark stopped waiting; the run exits non-zero when there is any.",
  ].join("\n");
}

/** Every failure and every finding worth a look, by row. */
export function modesProblems(m: ModesReport): string[] {
  const lines: string[] = [];
  for (const r of m.results) {
    const label = `${r.approach}, ${r.delayMs} ms`;
    for (const [message, n] of Object.entries(r.errorMessages)) lines.push(`- ${label}: ${n} × ${message}`);
    if (r.backgroundFailures) lines.push(`- ${label}: ${r.backgroundFailures} calls or proofs after the purchase failed or did not end`);
    for (const [message, n] of Object.entries(r.remoteReaderFailures ?? {})) lines.push(`- ${label}, remote reader: ${n} × ${message}`);
    for (const [step, n] of Object.entries(r.payment?.events ?? {}))
      if (!ROUTINE_STEPS.has(step)) lines.push(`- ${label}, payment server logged ${n} × "${step}"`);
    for (const finding of r.serviceLogs.samples) lines.push(`- ${label}, service log: ${finding}`);
  }
  return lines;
}

export function modesErrors(m: ModesReport): number {
  return m.results.reduce((n, r) => n + r.errors + r.backgroundFailures, 0);
}

export function renderModes(m: ModesReport): string {
  return [
    "## Confirmation modes against the chatty baseline",
    "",
    modesTable(m),
    "",
    "## PSAM hold time and latency against the delay",
    "",
    byDelayTable(m),
    "",
    "## Work left when the load ended",
    "",
    backlogTable(m),
    "",
    "## Notes on the modes",
    "",
    notes(m),
    "",
  ].join("\n");
}
