// The clearing benchmark's part of the report: records cleared per second
// per batch size and number of terminal hosts, beside the stack's purchases
// per second, the method, and anything that went wrong.

import { CLEARING_PROCESS, type ClearingReport, type ClearingRun } from "./clearing.js";
import { markdown, mib, ms, pct, rate } from "./format.js";
import { PROCESS } from "./network.js";

const ratioOf = (run: ClearingRun, r: ClearingReport) => run.recordsPerSecond / r.stack.purchasesPerSecond;
const fixed = (v: number, digits: number) => (Number.isFinite(v) ? v.toFixed(digits) : "n/a");

function otherWork(run: ClearingRun): number | undefined {
  if (run.machineCpuPercent === undefined) return undefined;
  const ours = Object.values(run.cpuPercent).reduce((a, b) => a + b, 0);
  return Math.max(0, run.machineCpuPercent - ours);
}

function runsTable(r: ClearingReport): string {
  const rows = r.runs.map((run) => [
    String(run.recordsPerBatch),
    String(run.terminalHosts),
    String(run.batches),
    String(run.records),
    fixed(run.seconds, 1),
    rate(run.recordsPerSecond),
    rate(run.batchesPerSecond),
    ms(run.p50Ms),
    ms(run.p99Ms),
    pct(run.cpuPercent[CLEARING_PROCESS]),
    fixed(run.clearingCpuMsPerRecord, 3),
    mib(run.clearingPeakMemoryMiB),
    pct(run.cpuPercent[PROCESS.bench]),
    pct(otherWork(run)),
    fixed(ratioOf(run, r), 1),
    String(run.errors),
  ]);
  return markdown(
    [
      "records per batch",
      "terminal hosts",
      "batches",
      "records",
      "seconds",
      "records/s",
      "batches/s",
      "SubmitBatch p50 ms",
      "SubmitBatch p99 ms",
      "clearing CPU %",
      "clearing CPU ms/record",
      "clearing VmHWM MiB",
      "terminal hosts' CPU % (bench)",
      "other work %",
      "records/s ÷ purchases/s",
      "errors",
    ],
    rows,
  );
}

function stackLine(r: ClearingReport): string {
  const s = r.stack;
  const psams = `${s.psams} PSAM${s.psams === 1 ? "" : "s"}`;
  const where = s.from === "stack suite" ? "the best of this run's stack suite" : "measured by this suite, the stack suite not having run";
  return `Purchases/s to compare with: ${rate(s.purchasesPerSecond)} (${psams} × ${s.cardholders} cardholders, TLS ${s.tls ? "on" : "off"}, ${where}).`;
}

function verdict(r: ClearingReport): string {
  if (r.runs.length === 0 || !(r.stack.purchasesPerSecond > 0)) return "No comparison: no purchases/s were measured.";
  const lowest = r.runs.reduce((a, b) => (ratioOf(b, r) < ratioOf(a, r) ? b : a));
  const highest = r.runs.reduce((a, b) => (ratioOf(b, r) > ratioOf(a, r) ? b : a));
  const lo = ratioOf(lowest, r);
  const what = (run: ClearingRun) => `batches of ${run.recordsPerBatch}, ${run.terminalHosts} terminal host${run.terminalHosts === 1 ? "" : "s"}`;
  return lo > 1
    ? `Clearing clears ${fixed(lo, 1)}–${fixed(ratioOf(highest, r), 1)} records for each purchase the stack makes in the same time (fewest: ${what(lowest)}; most: ${what(highest)}): it is not the bottleneck.`
    : `Clearing cleared fewer records per second than the stack makes purchases in at least one run (${what(lowest)}: ${fixed(lo, 2)} records per purchase): there it would be the bottleneck.`;
}

function notes(r: ClearingReport): string {
  const made = r.runs.map((run) => run.recordsMadePerSecond).filter(Number.isFinite);
  const madeRange = made.length ? `${Math.min(...made).toFixed(0)}–${Math.max(...made).toFixed(0)}` : "n/a";
  return [
    "- One clearing process (TLS as installed, log level warn), started on an empty ledger for each run. Each terminal host is a channel of its own with its terminal identity's certificate, submitting its one PSAM's batches one at a time, in batch-number order; with several, they submit at once.",
    `- Records are made in the bench process before each window (${madeRange} records/s), not by cards: a card makes one per purchase, and this measures clearing. Each is genuine: the card's signature under its own purchase key (as the issuer personalised it, ${r.cards} cards in turn, each session with its counter, a fresh challenge and the balance after), the record's and the batch's MACs under the PSAM's batch key, by the project's own functions. The suite checks the first record of each run under clearing's keys in-process, and that a changed signature does not verify.`,
    "- Throughput counts the window's records, from the first SubmitBatch's start to the last acknowledgement; every acknowledgement must be ACCEPTED with every record posted and none quarantined, or it counts as an error. Afterwards clearing's settlement (GetSettlement) must show as many purchases posted as records acknowledged (warm-up included) and its audit (RunAudit) must hold.",
    `- Warm-up: ${r.phases.warmupMs / 1000} s of batches. Window: each terminal host submits batches made ahead (twice the warm-up's pace's worth, at least two) until ${r.phases.measureMs / 1000} s have passed, and its batch in flight then is counted; the window ends with the last acknowledgement.`,
    "- Clearing CPU is its utime + stime (/proc/PID/stat) over the window; CPU ms/record is that divided by the records cleared. VmHWM is its peak resident memory since its start. Other work is the machine's busy CPU outside clearing and the bench process.",
    "- A terminal host closes a PSAM's batch at 200 records by default (the software PSAM holds 256): batches of 1,000 are larger than a host sends, batches of 1 the worst case of one record per call.",
  ].join("\n");
}

/** Every failure and service log finding of the suite. */
export function clearingProblems(r: ClearingReport): string[] {
  const lines: string[] = [];
  for (const run of r.runs) {
    for (const [message, n] of Object.entries(run.errorMessages))
      lines.push(`- clearing, ${run.recordsPerBatch} per batch, ${run.terminalHosts} hosts: ${n} × ${message}`);
  }
  for (const [message, n] of Object.entries(r.stack.run?.errorMessages ?? {})) lines.push(`- clearing's stack comparison: ${n} × ${message}`);
  for (const finding of r.serviceLogs.samples) lines.push(`- clearing, service log: ${finding}`);
  return lines;
}

export function renderClearing(r: ClearingReport): string {
  return [
    "## Clearing: records cleared per second",
    "",
    runsTable(r),
    "",
    stackLine(r),
    "",
    verdict(r),
    "",
    `Clearing's log: ${r.serviceLogs.count} warning or error lines.`,
    "",
    "### Notes",
    "",
    notes(r),
    "",
  ].join("\n");
}
