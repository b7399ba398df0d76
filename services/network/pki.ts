// The demo installation's certificates: on first run the main job makes the
// certificate authority and a key and certificate for every part it starts,
// each with its SPIFFE identity; later runs reuse them and issue only what a
// new part lacks.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { CertificateAuthority, pkiPaths } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf } from "../../lib/pki/security.js";

/** The demo clearing service's identity. */
export const CLEARING_ID = "clearing-1";

/** Who the demo network's parts are. */
export function demoIdentities(p: { terminals: { id: string }[]; merchants: string[]; bankId: string; concentrators?: number }): { kind: Kind; id: string }[] {
  return [
    ...Array.from({ length: p.concentrators ?? 1 }, (_, i) => ({ kind: "concentrator" as const, id: `concentrator-${i + 1}` })),
    ...p.terminals.map((t) => ({ kind: "terminal" as const, id: t.id })),
    { kind: "payment", id: "payment-1" },
    { kind: "validation", id: "validation-1" },
    ...p.merchants.map((id) => ({ kind: "merchant" as const, id })),
    { kind: "bank", id: p.bankId },
    { kind: "load", id: "load-1" },
    { kind: "clearing", id: CLEARING_ID },
    { kind: "operator", id: "operator" },
  ];
}

/** Makes the authority if there is none, and a key and certificate for each identity that has none. */
export async function ensurePki(data: string, identities: { kind: Kind; id: string }[], say: (line: string) => void): Promise<void> {
  const dir = pkiDirOf(data);
  if (!CertificateAuthority.exists(dir)) {
    const made = await CertificateAuthority.init(dir);
    say(`operator: made the installation's certificate authority (${made.trustDomain}) in ${dir}`);
  }
  const ca = await CertificateAuthority.open(dir);
  const issued: string[] = [];
  for (const i of identities) {
    if (existsSync(pkiPaths(dir).cert(i)) && existsSync(pkiPaths(dir).key(i))) continue;
    issued.push((await ca.issue(i)).spiffeId);
  }
  if (issued.length) say(`operator: issued certificates for ${issued.join(", ")}`);
}

/** Where the concentrator reads the issuer's PSAM registry. */
export const psamRegistryPath = (data: string) => join(data, "concentrator", "psams.json");
