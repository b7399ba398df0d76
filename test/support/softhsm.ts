// SoftHSM2 tokens for the PKCS#11 tests, each in a test's own folder (never
// /var/lib/softhsm). The tests that need SoftHSM2 and pkcs11js skip loudly,
// saying what is missing, where either is absent.

import { join } from "node:path";
import { Issuer } from "../../services/issuer/issuer.js";
import { ensureToken, type TokenConfig } from "../../lib/hsm/pkcs11.js";
import { ensurePinFile, ensureSoftHsmConf, findSoftHsmModule, hsmDir, readPinFile, softHsmMissing } from "../../lib/hsm/softhsm.js";

/** Why the PKCS#11 tests cannot run here, or undefined when they can. */
export const pkcs11Missing = softHsmMissing;

/** For a suite's before(): skips it, loudly, when SoftHSM2 or pkcs11js is missing. */
export async function requirePkcs11(ctx: Mocha.Context): Promise<void> {
  const why = await pkcs11Missing();
  if (!why) return;
  // A CI that installs SoftHSM2 sets this: there a missing token is a failure, not a skip.
  if (process.env.NETPURSE_REQUIRE_PKCS11 === "1") throw new Error(`NETPURSE_REQUIRE_PKCS11=1 but the PKCS#11 tests cannot run: ${why}`);
  console.warn(`\n  *** SKIPPED: the PKCS#11 security module tests need SoftHSM2 and pkcs11js: ${why}\n`);
  ctx.skip();
}

/** SoftHSM2's configuration, the user PIN file and the SO PIN in DATA/hsm, as provision-hsm --pkcs11 makes them. */
export async function softHsmIn(data: string, tokenLabel = "netpurse-test"): Promise<{ token: TokenConfig; soPin: string; tokens: string }> {
  const dir = hsmDir(data);
  const tokens = join(dir, "tokens");
  const token: TokenConfig = {
    module: findSoftHsmModule()!,
    tokenLabel,
    pinFile: await ensurePinFile(join(dir, "user.pin")),
    softhsm2Conf: await ensureSoftHsmConf(join(dir, "softhsm2.conf"), tokens),
  };
  return { token, soPin: await readPinFile(await ensurePinFile(join(dir, "so.pin"))), tokens };
}

/** A fresh, initialised SoftHSM2 token in `data`. */
export async function freshToken(data: string, tokenLabel?: string): Promise<{ token: TokenConfig; tokens: string }> {
  const s = await softHsmIn(data, tokenLabel);
  await ensureToken(s.token, s.soPin);
  return s;
}

/**
 * In a data folder laid out by ensureDemoData: the load server's security
 * module moved onto a new SoftHSM2 token, with the load master key of
 * `keyVersion` generated in it, and clearing's keys exported again (so
 * clearing checks those loads in the token). Restart the load server and
 * clearing afterwards.
 */
export async function provisionTokenIn(data: string, keyVersion = 2) {
  const s = await softHsmIn(data, "netpurse-load");
  const issuer = await Issuer.open(join(data, "issuer"));
  try {
    const r = await issuer.provisionTokenHsm({ path: join(data, "load", "hsm.json"), token: s.token, soPin: s.soPin, keyVersion });
    await issuer.exportClearingKeys(join(data, "clearing", "keys.json"));
    return { ...r, token: s.token, tokens: s.tokens };
  } finally {
    await issuer.close();
  }
}
