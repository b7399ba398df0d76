// Which host security module the load server runs: the one its hsm.json
// describes (docs/hsm.md).

import { readJson } from "../../lib/files.js";
import type { Logger } from "../../lib/log.js";
import { SoftwareHsm, type HostSecurityModule } from "./hsm.js";
import { Pkcs11Hsm, type Pkcs11HsmFile } from "./pkcs11-hsm.js";

/**
 * Opens the module DATA/load/hsm.json describes: the software module (no
 * `kind`, or "software"), or a PKCS#11 token (`kind: "pkcs11"`), whose
 * binding, pkcs11js, is loaded only then (lib/hsm/pkcs11.ts).
 */
export async function openHsm(path: string, log?: Logger): Promise<HostSecurityModule> {
  const file = await readJson<{ kind?: string }>(path);
  if (file.kind === "pkcs11") return Pkcs11Hsm.open(path, file as Pkcs11HsmFile, log);
  return SoftwareHsm.open(path);
}
