// Money is an integer count of minor units with an ISO 4217 numeric currency
// and its exponent; never a float.

import type { Money } from "../gen/netpurse/card/v1/card.js";

/** Largest amount a card counts in (4 unsigned bytes). */
export const MAX_CARD_AMOUNT = 0xffffffff;

// Where a currency code stands, three kinds of unit share the field (docs/loyalty.md, "Currency codes").
/** ISO 4217 "XXX", no currency involved: an authentication, always amount 0. */
export const AUTHENTICATION_CURRENCY = 999;
/** A loyalty programme's code: its points, exponent 0. */
export const isProgrammeCode = (c: number) => Number.isInteger(c) && c >= 1000 && c <= 65535;
/** An ISO 4217 numeric money currency. */
export const isMoneyCurrency = (c: number) => Number.isInteger(c) && c >= 1 && c <= 998;

const ALPHA: Record<number, string> = { 978: "EUR", 840: "USD", 826: "GBP", 756: "CHF", 752: "SEK", 208: "DKK", 392: "JPY" };

function currencyCode(numeric: number): string {
  return ALPHA[numeric] ?? String(numeric).padStart(3, "0");
}

/** Formats minor units for people: formatMinor(1250, 2) = "12.50". */
export function formatMinor(minor: bigint | number, exponent: number): string {
  const v = BigInt(minor);
  const neg = v < 0n;
  const digits = (neg ? -v : v).toString().padStart(exponent + 1, "0");
  const whole = exponent ? digits.slice(0, -exponent) : digits;
  const frac = exponent ? "." + digits.slice(-exponent) : "";
  return `${neg ? "-" : ""}${whole}${frac}`;
}

/** For people: "EUR 12.50"; a programme's points as "2000 points of programme 1001"; an authentication as "no value (authentication)". */
export function formatMoney(m: { amountMinor: bigint | number; currency: number; exponent: number }): string {
  if (m.currency === AUTHENTICATION_CURRENCY) return "no value (authentication)";
  if (isProgrammeCode(m.currency)) return `${formatMinor(m.amountMinor, m.exponent)} points of programme ${m.currency}`;
  return `${currencyCode(m.currency)} ${formatMinor(m.amountMinor, m.exponent)}`;
}

/** Parses "12.50" with exponent 2 into 1250; refuses more decimals than the exponent allows. */
export function parseMinor(text: string, exponent: number): bigint {
  const m = /^(\d+)(?:\.(\d+))?$/.exec(text.trim());
  if (!m) throw new Error(`not an amount: "${text}" (write it like 12.50)`);
  const frac = m[2] ?? "";
  if (frac.length > exponent) throw new Error(`"${text}" has more than ${exponent} decimals`);
  return BigInt(m[1]! + frac.padEnd(exponent, "0"));
}

export function money(amountMinor: bigint | number, currency: number, exponent: number): Money {
  return { amountMinor: BigInt(amountMinor), currency, exponent };
}
