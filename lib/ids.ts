// Identifiers as the contract defines them (proto/netpurse/card/v1/card.proto),
// with the checks every service applies at its edge.

import { ConfirmationMode, type MerchantId, type Money, type PsamId, type PurseId, type TransactionId } from "../gen/netpurse/card/v1/card.js";
import { MAX_CARD_AMOUNT } from "./money.js";
import { isUuid } from "./protocol/layout.js";
import { invalidField } from "./grpc/errors.js";

const NAME_RE = /^[A-Za-z0-9._-]+$/;

export function isName(s: string, max: number): boolean {
  return s.length >= 1 && s.length <= max && NAME_RE.test(s);
}

export function requireTransactionId(id: TransactionId | undefined, field = "transaction_id"): string {
  const v = id?.value ?? "";
  if (!v) throw invalidField(field, "missing");
  if (!isUuid(v)) throw invalidField(field, `"${v.slice(0, 64)}" is not a canonical lower-case UUID`);
  return v;
}

export function requireMerchantId(id: MerchantId | undefined, field = "merchant_id"): string {
  const v = id?.value ?? "";
  if (!v) throw invalidField(field, "missing");
  if (!isName(v, 16)) throw invalidField(field, "must be 1..16 characters of [A-Za-z0-9._-]");
  return v;
}

/** An amount as the contract allows it: non-negative minor units, an ISO 4217 numeric currency and an exponent 0..4. */
export function requireMoney(m: Money | undefined, field: string): Money {
  if (!m) throw invalidField(field, "missing");
  if (m.amountMinor < 0n || m.amountMinor > BigInt(Number.MAX_SAFE_INTEGER)) throw invalidField(`${field}.amount_minor`, "out of range");
  if (m.currency < 1 || m.currency > 999) throw invalidField(`${field}.currency`, "must be an ISO 4217 numeric code 1..999");
  if (m.exponent > 4) throw invalidField(`${field}.exponent`, "must be 0..4");
  return m;
}

/** An amount a card can move: requireMoney, and 1..MAX_CARD_AMOUNT minor units (the card counts in 4 unsigned bytes). */
export function requireCardAmount(m: Money | undefined, field: string): Money {
  const a = requireMoney(m, field);
  if (a.amountMinor <= 0n || a.amountMinor > BigInt(MAX_CARD_AMOUNT)) throw invalidField(`${field}.amount_minor`, `must be 1..${MAX_CARD_AMOUNT}`);
  return a;
}

/** A name-like identifier (bank id, account id): 1..max characters of [A-Za-z0-9._-]. */
export function requireName(v: string, field: string, max: number): string {
  if (!v) throw invalidField(field, "missing");
  if (!isName(v, max)) throw invalidField(field, `must be 1..${max} characters of [A-Za-z0-9._-]`);
  return v;
}

/**
 * A server's network address, host:port (a name, an IPv4 address or a
 * bracketed IPv6 address, and a port 1..65535): never a Unix socket path or
 * a URL, so a caller cannot send a service's calls to a local socket.
 */
export function requireHostPort(v: string, field: string): string {
  const m = /^(\[[0-9A-Fa-f:.]{2,45}\]|[A-Za-z0-9.-]{1,253}):(\d{1,5})$/.exec(v);
  const port = m ? Number(m[2]) : 0;
  if (!m || port < 1 || port > 65_535) throw invalidField(field, "must be host:port (a name or address, and a port 1..65535)");
  return v;
}

const MODES: readonly ConfirmationMode[] = [
  ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
  ConfirmationMode.CONFIRMATION_MODE_SERVER_COMPARES,
  ConfirmationMode.CONFIRMATION_MODE_CLIENT_COMPARES,
  ConfirmationMode.CONFIRMATION_MODE_MERCHANT_COMPARES,
];

/** One of the four confirmation modes (not UNSPECIFIED, not a number this version does not know). */
export function requireConfirmationMode(mode: ConfirmationMode, field: string): ConfirmationMode {
  if (!MODES.includes(mode)) throw invalidField(field, "missing or unknown");
  return mode;
}

export function requirePurseId(id: PurseId | undefined, field = "purse_id"): string {
  const v = id?.value;
  if (!v || v.length === 0) throw invalidField(field, "missing");
  if (v.length !== 8) throw invalidField(field, `must be 8 bytes, got ${v.length}`);
  return Buffer.from(v).toString("hex");
}

export const txnId = (value: string): TransactionId => ({ value });
export const merchantId = (value: string): MerchantId => ({ value });
export const psamId = (hex: string): PsamId => ({ value: Buffer.from(hex, "hex") });
export const purseId = (hex: string): PurseId => ({ value: Buffer.from(hex, "hex") });
export const hexOf = (b: Uint8Array | undefined): string => Buffer.from(b ?? []).toString("hex");
