// Who a peer is, as its certificate proves it: a SPIFFE ID in the
// certificate's URI subject alternative name,
// spiffe://<trust domain>/<kind>/<id>. Services authorise by kind and id,
// never by what a message claims.

/** The kinds of identity an installation issues, one per part of the system that holds a key. */
export const KINDS = ["terminal", "payment", "concentrator", "merchant", "validation", "bank", "load", "clearing", "operator"] as const;
export type Kind = (typeof KINDS)[number];

export const DEFAULT_TRUST_DOMAIN = "netpurse.local";

export interface Identity {
  trustDomain: string;
  kind: Kind;
  id: string;
}

const ID_RE = /^[A-Za-z0-9._-]{1,64}$/;
const DOMAIN_RE = /^[a-z0-9.-]{1,255}$/;

export function isKind(s: string): s is Kind {
  return (KINDS as readonly string[]).includes(s);
}

/** The SPIFFE ID of an identity. */
export function spiffeId(i: Identity): string {
  return `spiffe://${i.trustDomain}/${i.kind}/${i.id}`;
}

/** Parses a SPIFFE ID of netpurse's form; undefined when it is not one. */
export function parseSpiffeId(uri: string): Identity | undefined {
  const m = /^spiffe:\/\/([^/]+)\/([^/]+)\/([^/]+)$/.exec(uri);
  if (!m) return undefined;
  const [, trustDomain = "", kind = "", id = ""] = m;
  if (!DOMAIN_RE.test(trustDomain) || !isKind(kind) || !ID_RE.test(id)) return undefined;
  return { trustDomain, kind, id };
}

/** Checks a name given on a command line or in configuration before a certificate carries it. */
export function requireIdentity(kind: string, id: string, trustDomain = DEFAULT_TRUST_DOMAIN): Identity {
  if (!isKind(kind)) throw new Error(`unknown kind "${kind}": one of ${KINDS.join(", ")}`);
  if (!ID_RE.test(id)) throw new Error(`identity "${id}" must be 1..64 characters of [A-Za-z0-9._-]`);
  if (!DOMAIN_RE.test(trustDomain)) throw new Error(`trust domain "${trustDomain}" must be lower-case letters, digits, dots and dashes`);
  return { trustDomain, kind, id };
}

/**
 * The identity in a peer certificate's subjectaltname as Node reports it
 * ("URI:spiffe://…, DNS:localhost, IP Address:127.0.0.1"): exactly one
 * SPIFFE ID of the expected trust domain, or undefined.
 */
export function identityFromSubjectAltName(subjectaltname: string | undefined, trustDomain: string): Identity | undefined {
  if (!subjectaltname) return undefined;
  const uris = subjectaltname
    .split(",")
    .map((s) => s.trim())
    .filter((s) => s.startsWith("URI:spiffe://"))
    .map((s) => s.slice("URI:".length));
  if (uris.length !== 1) return undefined;
  const i = parseSpiffeId(uris[0] ?? "");
  return i?.trustDomain === trustDomain ? i : undefined;
}
