// The hardware suite's report: markdown tables for each part, or why a part
// is missing, and its problems for the report's findings.

import { renderHsm } from "./hsm.js";
import { markdown, ms, pct, perPurchase, ratio } from "./format.js";
import type { HardwarePurchaseOutcome, HardwarePurchaseRun, HardwareReport, Part } from "./hardware.js";
import { renderPcsc } from "./pcsc.js";

/** A part's table, or a line saying why it is not there. */
function part<T>(title: string, p: Part<T>, render: (t: T) => string): string {
  if ("measured" in p) return render(p.measured);
  if ("unavailable" in p) return `### ${title}\n\nNot measured: it cannot be set up on this machine: ${p.unavailable}\n`;
  return `### ${title}\n\nFAILED: ${p.failed}\n`;
}

/** The processes that are there only for the readers. */
const READERS = ["pcscd", "emulator"];

/** CPU per purchase, ms, of the named processes (all when none named): % of one core × seconds ÷ purchases. */
function cpuMs(r: HardwarePurchaseRun, names?: string[]): number {
  const total = Object.entries(r.cpuPercent)
    .filter(([name]) => !names || names.includes(name))
    .reduce((a, [, v]) => a + v, 0);
  return r.purchases > 0 ? (total * 10 * r.seconds) / r.purchases : NaN;
}

const byIns = (a: { byIns: Record<string, number> } | undefined) =>
  a
    ? Object.entries(a.byIns)
        .sort(([x], [y]) => x.localeCompare(y))
        .map(([ins, n]) => `${ins}×${perPurchase(n)}`)
        .join(" ")
    : "n/a";

function purchaseTable(outcomes: HardwarePurchaseOutcome[]): string {
  const inProcess = (mode: string) => outcomes.find((o) => o.mode === mode && o.layout === "in-process")?.run;
  const rows = outcomes.map((o) => {
    const r = o.run;
    if (!r) return [o.mode, o.layout, o.unavailable ? `not measured: ${o.unavailable}` : `FAILED: ${o.failed}`, ...Array<string>(12).fill("")];
    const base = inProcess(o.mode);
    const apdus = r.card.apdus + (r.psam?.apdus ?? 0);
    const addedPerApdu = o.layout === "PC/SC" && base && r.psam ? (r.p50Ms - base.p50Ms) / apdus : NaN;
    const other = r.machineCpuPercent === undefined ? undefined : r.machineCpuPercent - Object.values(r.cpuPercent).reduce((a, b) => a + b, 0);
    return [
      o.mode,
      o.layout,
      String(r.purchases),
      ms(r.p50Ms),
      ms(r.p99Ms),
      ms(r.meanMs),
      o.layout === "in-process" ? "1.00" : ratio(r.p50Ms, base?.p50Ms),
      o.layout === "in-process" ? "1.00" : ratio(r.p99Ms, base?.p99Ms),
      `${perPurchase(r.card.apdus)} + ${perPurchase(r.card.resets)} reset`,
      r.psam ? perPurchase(r.psam.apdus) : "n/a",
      Number.isFinite(addedPerApdu) ? addedPerApdu.toFixed(2) : "n/a",
      ms(cpuMs(r)),
      o.layout === "PC/SC" ? ms(cpuMs(r, READERS)) : "n/a",
      o.layout === "PC/SC" ? pct(READERS.reduce((a, name) => a + (r.idleCpuPercent[name] ?? 0), 0)) : "n/a",
      `${r.errors}${other === undefined ? "" : ` (other work ${Math.max(0, other).toFixed(0)} %)`}`,
    ];
  });
  return markdown(
    [
      "mode",
      "card and PSAMs",
      "purchases",
      "p50 ms",
      "p99 ms",
      "mean ms",
      "p50 ÷ in-process",
      "p99 ÷ in-process",
      "card APDUs/purchase",
      "PSAM APDUs/purchase",
      "added ms per APDU (p50)",
      "CPU ms/purchase",
      "pcscd + emulator CPU ms/purchase",
      "pcscd + emulator idle CPU %",
      "errors",
    ],
    rows,
  );
}

function purchaseNotes(r: HardwareReport): string {
  const s = r.settings;
  const pcsc = r.purchases.find((o) => o.layout === "PC/SC" && o.run)?.run;
  return [
    `- One cardholder pays ${s.warmupPurchases} purchases (not timed), then ${s.purchases} in a row: the merchant's CreateOrder (not timed), then payOffer (timed), the song at the mode's demo shop. Each run is a fresh data folder and network: one terminal host with ${s.psams} PSAMs, TLS on. p99 of ${s.purchases} is their ${Math.ceil(0.99 * s.purchases)}th fastest.`,
    "- in-process: the stack suite's layout, the cardholder's software card in the benchmark process, the PSAM files in the terminal host. PC/SC: the card and every PSAM in emulated readers (an emulator child process, bench/apdu-counting-emulator.ts, serving them as netpurse-emulator does, to a pcscd of the run's own with the loopback/TCP_NODELAY shim); the terminal host --psam-readers, the client daemon --pcsc (its own card, idle), the cardholder through the PC/SC transport with the client daemon's settings (exclusive from reset, the reader let go after 5 s idle).",
    "- Card APDUs are counted at the cardholder's transport (each payOffer resets the card: under PC/SC a reconnect); PSAM APDUs at the emulated PSAMs, all of them over the timed purchases, so in-process they cannot be counted." +
      (pcsc ? ` Per purchase, by INS: card ${byIns(pcsc.card)}; PSAMs ${byIns(pcsc.psam)}.` : ""),
    "- Added ms per APDU: (PC/SC p50 − in-process p50) ÷ (card + PSAM APDUs per purchase), beside the APDU round trip above.",
    "- CPU: every process of the network, the benchmark's (the cardholder), and under PC/SC the emulator and pcscd, over the timed purchases; other work is the rest of the machine's busy CPU meanwhile (% of one core). Idle: the emulator and pcscd over 2 s with the network up and no purchase (pcscd polls each reader, the emulator's links answer), % of one core.",
  ].join("\n");
}

export function renderHardware(r: HardwareReport): string {
  return [
    "## Hardware",
    "",
    part("APDU round trip through PC/SC", r.apdu, renderPcsc),
    "### Purchases through PC/SC against in-process",
    "",
    purchaseTable(r.purchases),
    "",
    purchaseNotes(r),
    "",
    part("S2 signings per second", r.hsm, renderHsm),
  ].join("\n");
}

/** Failed parts and purchases, and service log findings, for the report's findings. */
export function hardwareProblems(r: HardwareReport): string[] {
  const lines: string[] = [];
  if ("failed" in r.apdu) lines.push(`- hardware, APDU round trip: failed: ${r.apdu.failed}`);
  if ("failed" in r.hsm) lines.push(`- hardware, S2 signings: failed: ${r.hsm.failed}`);
  for (const o of r.purchases) {
    const label = `- hardware, ${o.mode}, ${o.layout}`;
    if (o.failed) lines.push(`${label}: failed: ${o.failed}`);
    for (const [message, n] of Object.entries(o.run?.errorMessages ?? {})) lines.push(`${label}: ${n} × ${message}`);
    for (const finding of o.run?.serviceLogs.samples ?? []) lines.push(`${label}, service log: ${finding}`);
    if (o.layout === "PC/SC" && o.run && o.run.purchases > 0 && !(o.run.psam && o.run.psam.apdus > 0)) {
      lines.push(`${label}: the emulated PSAMs processed no APDU: the purchases did not go through PC/SC`);
    }
  }
  return lines;
}

/** Failures that make the run exit 1: parts that failed, failed purchases, PC/SC purchases that did not use the readers. Parts that cannot be set up here are not errors. */
export function hardwareErrors(r: HardwareReport): number {
  const failedParts = ["failed" in r.apdu, "failed" in r.hsm].filter(Boolean).length;
  return (
    failedParts +
    r.purchases.reduce(
      (n, o) =>
        n + (o.failed ? 1 : 0) + (o.run?.errors ?? 0) + (o.layout === "PC/SC" && o.run && o.run.purchases > 0 && !(o.run.psam && o.run.psam.apdus > 0) ? 1 : 0),
      0,
    )
  );
}
