// The stack suite's TLS on ÷ off comparison: each configuration measured
// with every link on TLS and with every link plaintext (--insecure), on fresh
// networks one after the other in the same run, and the echo baseline both
// ways at the same concurrencies.

import type { EchoResult } from "./echo.js";
import { markdown, mib, ms, rate } from "./format.js";
import { PROCESS } from "./network.js";
import { cpuMsPerOperation } from "./proc.js";
import type { PurchaseResult } from "./purchases.js";

/** A figure with TLS on, with TLS off, and on ÷ off. */
export interface OnOff {
  on: number;
  off: number;
  onOverOff: number;
}

export interface TlsCost {
  psams: number;
  cardholders: number;
  mode: string;
  perSecond: OnOff;
  p50Ms: OnOff;
  p99Ms: OnOff;
  /** CPU of every process of the network and of the cardholders, ms per purchase. */
  cpuMsPerPurchase: OnOff;
  /** What TLS costs a purchase in CPU, ms: on − off. */
  tlsCpuMsPerPurchase: number;
  /** The payment server's VmHWM, MiB. */
  paymentPeakMemoryMiB: OnOff;
  /** Purchases/s ÷ echo calls/s at the same concurrency, each under its own transport. */
  perEchoCall: OnOff;
  errors: { on: number; off: number };
}

export interface EchoTlsCost {
  concurrency: number;
  perSecond: OnOff;
  p50Ms: OnOff;
  /** Echo server and client, ms per call. */
  cpuMsPerCall: OnOff;
  /** What TLS costs a call in CPU, ms: on − off. */
  tlsCpuMsPerCall: number;
}

const onOff = (on: number, off: number): OnOff => ({ on, off, onOverOff: on / off });

/** The configurations measured both ways, in the order run. */
export function tlsCosts(purchases: PurchaseResult[], echo: EchoResult[]): TlsCost[] {
  const echoAt = (concurrency: number, tls: boolean) => echo.find((e) => e.concurrency === concurrency && e.tls === tls);
  const out: TlsCost[] = [];
  for (const on of purchases.filter((p) => p.tls)) {
    const off = purchases.find((p) => !p.tls && p.psams === on.psams && p.cardholders === on.cardholders && p.mode === on.mode);
    if (!off) continue;
    const cpuOn = cpuMsPerOperation(on.cpuPercent, on.perSecond);
    const cpuOff = cpuMsPerOperation(off.cpuPercent, off.perSecond);
    const echoOn = echoAt(on.cardholders, true);
    const echoOff = echoAt(on.cardholders, false);
    out.push({
      psams: on.psams,
      cardholders: on.cardholders,
      mode: on.mode,
      perSecond: onOff(on.perSecond, off.perSecond),
      p50Ms: onOff(on.p50Ms, off.p50Ms),
      p99Ms: onOff(on.p99Ms, off.p99Ms),
      cpuMsPerPurchase: onOff(cpuOn, cpuOff),
      tlsCpuMsPerPurchase: cpuOn - cpuOff,
      paymentPeakMemoryMiB: onOff(on.peakMemoryMiB[PROCESS.payment] ?? NaN, off.peakMemoryMiB[PROCESS.payment] ?? NaN),
      perEchoCall: onOff(echoOn ? on.perSecond / echoOn.perSecond : NaN, echoOff ? off.perSecond / echoOff.perSecond : NaN),
      errors: { on: on.errors, off: off.errors },
    });
  }
  return out;
}

/** Across the configurations measured both ways: the median and range of TLS's CPU per purchase, and the median throughput ratio. */
export interface TlsSummary {
  configurations: number;
  tlsCpuMsPerPurchase: { median: number; min: number; max: number };
  perSecondOnOverOff: { median: number; min: number; max: number };
}

function spread(values: number[]): { median: number; min: number; max: number } {
  const v = values.filter(Number.isFinite).sort((a, b) => a - b);
  const mid = Math.floor(v.length / 2);
  const at = (i: number) => v[i] ?? NaN;
  const median = v.length % 2 ? at(mid) : (at(mid - 1) + at(mid)) / 2;
  return { median, min: v[0] ?? NaN, max: v[v.length - 1] ?? NaN };
}

export function tlsSummary(costs: TlsCost[]): TlsSummary | undefined {
  if (costs.length === 0) return undefined;
  return {
    configurations: costs.length,
    tlsCpuMsPerPurchase: spread(costs.map((c) => c.tlsCpuMsPerPurchase)),
    perSecondOnOverOff: spread(costs.map((c) => c.perSecond.onOverOff)),
  };
}

export function renderTlsSummary(s: TlsSummary): string {
  const t = s.tlsCpuMsPerPurchase;
  const r = s.perSecondOnOverOff;
  return `Over ${s.configurations} configuration${s.configurations === 1 ? "" : "s"}: TLS costs a purchase ${signed(t.median, 1)} ms of CPU (median of on − off; from ${signed(t.min, 1)} to ${signed(t.max, 1)}); purchases/s on ÷ off, median ${x(r.median)} (from ${x(r.min)} to ${x(r.max)}).`;
}

export function echoTlsCosts(echo: EchoResult[]): EchoTlsCost[] {
  const out: EchoTlsCost[] = [];
  for (const on of echo.filter((e) => e.tls)) {
    const off = echo.find((e) => !e.tls && e.concurrency === on.concurrency);
    if (!off) continue;
    const cpuOn = cpuMsPerOperation(on.cpuPercent, on.perSecond);
    const cpuOff = cpuMsPerOperation(off.cpuPercent, off.perSecond);
    out.push({
      concurrency: on.concurrency,
      perSecond: onOff(on.perSecond, off.perSecond),
      p50Ms: onOff(on.p50Ms, off.p50Ms),
      cpuMsPerCall: onOff(cpuOn, cpuOff),
      tlsCpuMsPerCall: cpuOn - cpuOff,
    });
  }
  return out;
}

const x = (v: number, digits = 2) => (Number.isFinite(v) ? v.toFixed(digits) : "n/a");
const signed = (v: number, digits: number) => (Number.isFinite(v) ? `${v >= 0 ? "+" : ""}${v.toFixed(digits)}` : "n/a");

export function renderTlsCosts(costs: TlsCost[]): string {
  const rows = costs.map((c) => [
    String(c.psams),
    String(c.cardholders),
    c.mode,
    rate(c.perSecond.on),
    rate(c.perSecond.off),
    x(c.perSecond.onOverOff),
    ms(c.p50Ms.on),
    ms(c.p50Ms.off),
    x(c.p50Ms.onOverOff),
    ms(c.p99Ms.on),
    ms(c.p99Ms.off),
    x(c.p99Ms.onOverOff),
    x(c.cpuMsPerPurchase.on, 1),
    x(c.cpuMsPerPurchase.off, 1),
    x(c.cpuMsPerPurchase.onOverOff),
    signed(c.tlsCpuMsPerPurchase, 1),
    mib(c.paymentPeakMemoryMiB.on),
    mib(c.paymentPeakMemoryMiB.off),
    x(c.paymentPeakMemoryMiB.onOverOff),
    x(c.perEchoCall.on, 4),
    x(c.perEchoCall.off, 4),
  ]);
  return markdown(
    [
      "PSAMs",
      "cardholders",
      "mode",
      "purchases/s on",
      "purchases/s off",
      "on÷off",
      "p50 ms on",
      "p50 ms off",
      "on÷off",
      "p99 ms on",
      "p99 ms off",
      "on÷off",
      "CPU ms/purchase on",
      "CPU ms/purchase off",
      "on÷off",
      "TLS CPU ms/purchase (on − off)",
      "payment VmHWM MiB on",
      "payment VmHWM MiB off",
      "on÷off",
      "purchases/s ÷ echo calls/s on",
      "purchases/s ÷ echo calls/s off",
    ],
    rows,
  );
}

export function renderEchoTlsCosts(costs: EchoTlsCost[]): string {
  const rows = costs.map((c) => [
    String(c.concurrency),
    rate(c.perSecond.on),
    rate(c.perSecond.off),
    x(c.perSecond.onOverOff),
    ms(c.p50Ms.on),
    ms(c.p50Ms.off),
    x(c.cpuMsPerCall.on, 3),
    x(c.cpuMsPerCall.off, 3),
    signed(c.tlsCpuMsPerCall, 3),
  ]);
  return markdown(
    ["concurrent calls", "calls/s on", "calls/s off", "on÷off", "p50 ms on", "p50 ms off", "CPU ms/call on", "CPU ms/call off", "TLS CPU ms/call (on − off)"],
    rows,
  );
}

/** The TCP connections between the processes, per run: how many carried the load, and how many were opened inside the window. */
export function renderConnections(purchases: PurchaseResult[]): string {
  const rows = purchases.map((p) => {
    const c = p.connections;
    return [
      String(p.psams),
      String(p.cardholders),
      p.mode,
      p.tls ? "on" : "off",
      c ? String(c.open) : "n/a",
      c ? String(c.openedInWindow) : "n/a",
      String(p.completed),
      c && p.completed > 0 ? x(c.openedInWindow / p.completed, 3) : "n/a",
    ];
  });
  return markdown(
    [
      "PSAMs",
      "cardholders",
      "mode",
      "TLS",
      "connections between the processes",
      "opened in the window",
      "purchases in the window",
      "connections opened per purchase",
    ],
    rows,
  );
}

/** The links of the first run that could count them, as "client → server n". */
export function describeLinks(purchases: PurchaseResult[]): string | undefined {
  const first = purchases.find((p) => p.connections);
  if (!first?.connections) return undefined;
  return first.connections.links.map((l) => `${l.from} → ${l.to} ${l.connections}`).join(", ");
}
