// netpurse-issuer: the issuer's commands. Keys stay in the private keys
// file; nothing here prints key material.

import { join, resolve } from "node:path";
import { dataDir } from "../../lib/config.js";
import { ensurePinFile, ensureSoftHsmConf, hsmDir, isSoftHsm, readPinFile } from "../../lib/hsm/softhsm.js";
import { runCommands, UsageError, int, str } from "../../lib/cli.js";
import { AUTHENTICATION_CURRENCY, formatMinor, isProgrammeCode, MAX_CARD_AMOUNT, parseMinor } from "../../lib/money.js";
import { DEFAULT_POINTS_MAX_BALANCE, DEMO_ISSUER_ID, Issuer } from "./issuer.js";
import { VERDICT_KEY_FILE } from "../payment/security-module.js";

const dataOption = { data: { type: "string" } } as const;
const issuerDir = (v: Record<string, unknown>) => join(dataDir(v.data as string | undefined), "issuer");

/** The values of a repeatable option. */
const many = (v: unknown): string[] => (Array.isArray(v) ? v.filter((x): x is string => typeof x === "string") : typeof v === "string" ? [v] : []);

/** Whole points: digits only, at most what a card counts. */
function points(text: string, what: string): number {
  const n = /^\d{1,10}$/.test(text) ? Number(text) : NaN;
  if (!(n <= MAX_CARD_AMOUNT)) throw new UsageError(`${what}: "${text}" is not a whole number of points (0..${MAX_CARD_AMOUNT})`);
  return n;
}

/** --points PROGRAMME:N[:MAX], the points purse a card is personalised with. */
function pointsPurse(text: string): { programme: number; value: number; maxBalance: number } {
  const parts = text.split(":");
  if (parts.length < 2 || parts.length > 3 || !/^\d{1,5}$/.test(parts[0]!))
    throw new UsageError(`--points "${text}": write PROGRAMME:POINTS or PROGRAMME:POINTS:MAX, like 1001:500`);
  const programme = Number(parts[0]);
  const maxBalance = parts[2] === undefined ? DEFAULT_POINTS_MAX_BALANCE : points(parts[2], `--points ${text} maximum`);
  const value = points(parts[1]!, `--points ${text}`);
  if (value > maxBalance) throw new UsageError(`--points ${text}: ${value} points are more than the maximum ${maxBalance}`);
  return { programme, value, maxBalance };
}

await runCommands("netpurse-issuer", "Issuer tools: master keys, card personalisation, PSAM and security module provisioning.", [
  {
    name: "create-keys",
    summary:
      "Create the issuer master keys (purchase, load, authentication) for a key version.\nDoes nothing when that version exists. The keys file is DATA/issuer/keys.json, mode 0600.",
    usage: "[--data DIR] [--key-version N]",
    options: { ...dataOption, "key-version": { type: "string" } },
    async run(v) {
      const version = int(v["key-version"], 1, "key-version");
      const r = await Issuer.createKeys(issuerDir(v), version);
      console.log(
        r.created
          ? `created master keys of version ${version} in ${Issuer.keysPath(issuerDir(v))}`
          : `master keys of version ${version} exist already; nothing changed`,
      );
    },
  },
  {
    name: "create-programme",
    summary: [
      "Create a loyalty programme: its redeem and earn master keys (16 random bytes each) for every key",
      "version, in the keys file (mode 0600). CODE (1000..65535) stands where a currency stands; its",
      "points are whole. Cards get its points purse (personalise-card --points), PSAMs redeem them",
      "(provision-psam --currency CODE), its security module credits them (provision-programme-hsm).",
    ].join("\n"),
    usage: "--code N --name TEXT [--data DIR]",
    options: { ...dataOption, code: { type: "string" }, name: { type: "string" } },
    async run(v) {
      if (typeof v.code !== "string" || typeof v.name !== "string") throw new UsageError("--code N and --name TEXT are required");
      const code = int(v.code, 0, "code");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const p = await issuer.createProgramme(code, v.name);
        console.log(`created loyalty programme ${p.code} "${p.name}" (redeem and earn master keys of versions ${p.keyVersions.join(", ")})`);
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "personalise-card",
    summary:
      "Personalise a software stored-value card: diversified keys, purse data and an initial value\nrecorded as an issuer credit. The card file is private (mode 0600).",
    usage:
      "--out FILE [--value 100.00] [--max-balance 500.00] [--currency 978] [--exponent 2] [--expiry YYYY-MM-DD] [--key-version N]\n" +
      `         [--points PROGRAMME:N[:MAX] ...] [--data DIR]\n\n--points: a points purse of a loyalty programme (create-programme) holding N whole points, at most MAX\n(default ${DEFAULT_POINTS_MAX_BALANCE}); repeat it for more programmes.`,
    options: {
      ...dataOption,
      out: { type: "string" },
      points: { type: "string", multiple: true },
      value: { type: "string" },
      "max-balance": { type: "string" },
      currency: { type: "string" },
      exponent: { type: "string" },
      expiry: { type: "string" },
      "key-version": { type: "string" },
    },
    async run(v) {
      if (typeof v.out !== "string") throw new UsageError("--out FILE is required");
      const exponent = int(v.exponent, 2, "exponent");
      const pointsPurses = many(v.points).map(pointsPurse);
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const card = await issuer.personaliseCard({
          path: v.out,
          currency: int(v.currency, 978, "currency"),
          exponent,
          initialValue: Number(parseMinor(str(v.value, "100.00"), exponent)),
          maxBalance: Number(parseMinor(str(v["max-balance"], "500.00"), exponent)),
          expiry: str(v.expiry, `${new Date().getUTCFullYear() + 4}-12-31`),
          ...(v["key-version"] !== undefined ? { keyVersion: int(v["key-version"], 1, "key-version") } : {}),
          ...(pointsPurses.length ? { points: pointsPurses } : {}),
        });
        const held = (card.points ?? []).map((q) => `, ${q.balance} points of programme ${q.programme}`).join("");
        console.log(
          `personalised card ${card.purseId} (key version ${card.keyVersion}) with ${formatMinor(card.balance, exponent)}${held}, expires ${card.expiry}: ${v.out}`,
        );
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "provision-psam",
    summary: [
      "Provision a software PSAM with every purchase key version, its batch key and its verdict key.",
      "Put it in a terminal host's folder: DATA/terminals/ID/psams/NAME.psam.json (mode 0600).",
      "--currency 999: an authentication PSAM (the authentication keys); --currency CODE or --programme CODE",
      "with a loyalty programme's code (1000..65535): that programme's points PSAM (its redeem keys).",
    ].join("\n"),
    usage: "--out FILE --terminal ID [--currency 978 | --programme CODE] [--psam-id HEX8] [--batch-capacity N] [--data DIR]",
    options: {
      ...dataOption,
      out: { type: "string" },
      terminal: { type: "string" },
      currency: { type: "string" },
      programme: { type: "string" },
      "psam-id": { type: "string" },
      "batch-capacity": { type: "string" },
    },
    async run(v) {
      if (typeof v.out !== "string") throw new UsageError("--out FILE is required");
      if (v.programme !== undefined && v.currency !== undefined) throw new UsageError("--programme CODE stands for --currency CODE: give one of them");
      const currency = v.programme !== undefined ? int(v.programme, 0, "programme") : int(v.currency, 978, "currency");
      if (v.programme !== undefined && !isProgrammeCode(currency)) throw new UsageError(`--programme: a programme code is 1000..65535, not ${currency}`);
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const p = await issuer.provisionPsam({
          path: v.out,
          ...(typeof v.terminal === "string" ? { terminalId: v.terminal } : {}),
          currency,
          ...(typeof v["psam-id"] === "string" ? { psamId: v["psam-id"] } : {}),
          batchCapacity: int(v["batch-capacity"], 256, "batch-capacity"),
        });
        const kind =
          p.currency === AUTHENTICATION_CURRENCY ? "authentication PSAM" : isProgrammeCode(p.currency) ? `points PSAM of programme ${p.currency}` : "PSAM";
        console.log(`provisioned ${kind} ${p.psamId} (key versions ${Object.keys(p.purchaseKeys).join(", ")}, currency ${p.currency}): ${v.out}`);
        console.log(
          typeof v.terminal === "string"
            ? `assigned to terminal ${v.terminal}; export the PSAM registry for the concentrator: netpurse-issuer export-psam-registry`
            : "assigned to no terminal: the concentrator accepts it once 'netpurse-issuer assign-psam' and 'export-psam-registry' say where it is",
        );
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "assign-psam",
    summary: "Say which terminal host holds a provisioned PSAM (the concentrator accepts a PSAM only from its terminal).",
    usage: "--psam-id HEX8 --terminal ID [--data DIR]",
    options: { ...dataOption, "psam-id": { type: "string" }, terminal: { type: "string" } },
    async run(v) {
      if (typeof v["psam-id"] !== "string" || typeof v.terminal !== "string") throw new UsageError("--psam-id and --terminal are required");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        await issuer.assignPsam(v["psam-id"], v.terminal);
        console.log(`PSAM ${v["psam-id"]} is terminal ${v.terminal}'s; export the PSAM registry for the concentrator: netpurse-issuer export-psam-registry`);
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "export-psam-registry",
    summary:
      "Write the PSAM registry the concentrator reads: each provisioned PSAM and its terminal host.\nThe concentrator follows the file: a new export takes effect within seconds.",
    usage: "[--out FILE (default DATA/concentrator/psams.json)] [--data DIR]",
    options: { ...dataOption, out: { type: "string" } },
    async run(v) {
      const out = str(v.out, join(dataDir(v.data as string | undefined), "concentrator", "psams.json"));
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const r = await issuer.exportPsamRegistry(out);
        console.log(`wrote ${out}: ${r.psams.length} PSAMs on ${new Set(r.psams.map((p) => p.terminalId)).size} terminal hosts`);
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "provision-hsm",
    summary: [
      "Provision the load server's host security module; its file is DATA/load/hsm.json (mode 0600),",
      "read by the load server at start (docs/hsm.md).",
      "Software (the default): every load master key version of the keys file, and the module's counter.",
      "--pkcs11: on a PKCS#11 token. The token labelled --token is used, or initialised in a free slot when",
      "there is none; the load master key of --key-version (default: the token's latest, or a new version)",
      "is generated in it, sensitive and never extractable, unless it holds it already. The keys file then",
      "names the token for that version and holds no value for it; its purchase and authentication keys",
      "are in the keys file as usual. hsm.json names the module, the token and the PIN file, and keeps",
      "the counter (its module id and counter are kept when it exists). For SoftHSM2 the configuration is",
      "--softhsm2-conf, by default DATA/hsm/softhsm2.conf (written if missing) with the tokens in",
      "DATA/hsm/tokens. The user PIN is read from --pin-file (mode 0600; default DATA/hsm/user.pin, a",
      "random PIN written if missing) or, without --pin-file, from $NETPURSE_HSM_PIN when it is set; the",
      "security officer's PIN (for initialising) from --so-pin-file (default DATA/hsm/so.pin, likewise).",
      "No PIN is ever printed. Export clearing's keys again afterwards (export-clearing-keys).",
    ].join("\n"),
    usage:
      "[--out FILE] [--hsm-id HEX8] [--data DIR]\n       netpurse-issuer provision-hsm --pkcs11 --module LIB --token LABEL [--pin-file F] [--key-version N]\n" +
      "         [--so-pin-file F] [--softhsm2-conf F] [--out FILE] [--hsm-id HEX8] [--data DIR]",
    options: {
      ...dataOption,
      out: { type: "string" },
      "hsm-id": { type: "string" },
      pkcs11: { type: "boolean" },
      module: { type: "string" },
      token: { type: "string" },
      "pin-file": { type: "string" },
      "so-pin-file": { type: "string" },
      "softhsm2-conf": { type: "string" },
      "key-version": { type: "string" },
    },
    async run(v) {
      const data = dataDir(v.data as string | undefined);
      const out = str(v.out, join(data, "load", "hsm.json"));
      const hsmId = typeof v["hsm-id"] === "string" ? { hsmId: v["hsm-id"] } : {};
      if (!v.pkcs11) {
        for (const o of ["module", "token", "pin-file", "so-pin-file", "softhsm2-conf", "key-version"])
          if (v[o] !== undefined) throw new UsageError(`--${o} is for --pkcs11 only`);
        const issuer = await Issuer.open(issuerDir(v));
        try {
          const h = await issuer.provisionHsm({ path: out, ...hsmId });
          console.log(`provisioned security module ${h.hsmId} (load key versions ${Object.keys(h.loadKeys).join(", ")}): ${out}`);
        } finally {
          await issuer.close();
        }
        return;
      }
      if (typeof v.module !== "string" || typeof v.token !== "string") throw new UsageError("--pkcs11 needs --module LIB and --token LABEL");
      const module = resolve(v.module);
      const folder = hsmDir(data);
      const softhsm2Conf = isSoftHsm(module)
        ? await ensureSoftHsmConf(typeof v["softhsm2-conf"] === "string" ? v["softhsm2-conf"] : join(folder, "softhsm2.conf"), join(folder, "tokens"))
        : undefined;
      const pinFile =
        typeof v["pin-file"] === "string"
          ? await ensurePinFile(v["pin-file"])
          : process.env.NETPURSE_HSM_PIN
            ? undefined
            : await ensurePinFile(join(folder, "user.pin"));
      const soPin = await readPinFile(await ensurePinFile(typeof v["so-pin-file"] === "string" ? v["so-pin-file"] : join(folder, "so.pin")));
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const r = await issuer.provisionTokenHsm({
          path: out,
          token: { module, tokenLabel: v.token, ...(pinFile ? { pinFile } : {}), ...(softhsm2Conf ? { softhsm2Conf } : {}) },
          soPin,
          ...(v["key-version"] !== undefined ? { keyVersion: int(v["key-version"], 1, "key-version") } : {}),
          ...hsmId,
        });
        if (r.initialised) console.log(`initialised token ${v.token}${softhsm2Conf ? ` (SoftHSM2 configuration ${softhsm2Conf})` : ""}`);
        console.log(
          r.generated
            ? `generated the load master key of version ${r.keyVersion} in token ${v.token} (sensitive, never extractable)`
            : `token ${v.token} holds the load master key of version ${r.keyVersion} already`,
        );
        console.log(
          `provisioned PKCS#11 security module ${r.file.hsmId} (load key versions ${Object.keys(r.file.loadKeys).join(", ")} in the token, PIN from ${pinFile ?? "$NETPURSE_HSM_PIN"}): ${out}`,
        );
        console.log("export clearing's keys again so that it checks these loads in the token: netpurse-issuer export-clearing-keys");
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "provision-programme-hsm",
    summary: [
      "Provision a loyalty programme's security module: the load server's software module holding the",
      "programme's earn master keys of every key version, so that it signs points credits (its benefits",
      "server reads it). The file is private (mode 0600); provisioning the same module id again keeps",
      "its counter. The keys are never printed.",
    ].join("\n"),
    usage: "--programme CODE --out FILE [--hsm-id HEX8] [--data DIR]",
    options: { ...dataOption, programme: { type: "string" }, out: { type: "string" }, "hsm-id": { type: "string" } },
    async run(v) {
      if (typeof v.programme !== "string" || typeof v.out !== "string") throw new UsageError("--programme CODE and --out FILE are required");
      const programme = int(v.programme, 0, "programme");
      if (!isProgrammeCode(programme)) throw new UsageError(`--programme: a programme code is 1000..65535, not ${programme}`);
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const h = await issuer.provisionProgrammeHsm({ path: v.out, programme, ...(typeof v["hsm-id"] === "string" ? { hsmId: v["hsm-id"] } : {}) });
        console.log(
          `provisioned security module ${h.hsmId} of programme ${programme} (earn key versions ${Object.keys(h.loadKeys).join(", ")}, counter ${h.counter}): ${v.out}`,
        );
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "add-verdict-key",
    summary:
      "Give software PSAMs provisioned before PSAM verdicts their verdict key, keeping their counter,\nopen debits and batch. Run it with their terminal host stopped. A PSAM that has its key is left alone.",
    usage: "--psam FILE [--psam FILE ...] [--data DIR]",
    options: { ...dataOption, psam: { type: "string", multiple: true } },
    async run(v) {
      const files = Array.isArray(v.psam) ? v.psam.filter((f): f is string => typeof f === "string") : [];
      if (files.length === 0) throw new UsageError("--psam FILE is required");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        for (const file of files) {
          const r = await issuer.addVerdictKey(file);
          console.log(
            r.added ? `PSAM ${r.psamId} now holds its verdict key: ${file}` : `PSAM ${r.psamId} holds its verdict key already; nothing changed: ${file}`,
          );
        }
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "export-verdict-key",
    summary:
      "Write the verdict master key for the payment operator's security module, which checks the PSAMs'\nMACs over their answers. The payment server reads DATA/payment/psam-verdict-key.json (mode 0600).",
    usage: "[--out FILE] [--data DIR]",
    options: { ...dataOption, out: { type: "string" } },
    async run(v) {
      const out = str(v.out, join(dataDir(v.data as string | undefined), "payment", VERDICT_KEY_FILE));
      const issuer = await Issuer.open(issuerDir(v));
      try {
        await issuer.exportVerdictKey(out);
        console.log(`wrote the PSAM verdict master key for the payment server's security module: ${out}`);
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "export-clearing-keys",
    summary:
      "Write clearing's security module keys: every purchase and load master key version (to check card\nsignatures and S3s), each loyalty programme's redeem master keys (to check points redemptions)\nand the batch master key (to check PSAM batches). Clearing reads\nDATA/clearing/keys.json (mode 0600). The keys are never printed. A load key version held in a\nPKCS#11 token is written as a reference to the token: clearing checks those loads in the token.",
    usage: `--out FILE [--issuer-id ID (default ${DEMO_ISSUER_ID})] [--data DIR]`,
    options: { ...dataOption, out: { type: "string" }, "issuer-id": { type: "string" } },
    async run(v) {
      if (typeof v.out !== "string") throw new UsageError("--out FILE is required");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const k = await issuer.exportClearingKeys(v.out, str(v["issuer-id"], DEMO_ISSUER_ID));
        console.log(
          `wrote clearing's keys for issuer ${k.issuerId} (purchase key versions ${Object.keys(k.purchaseKeys).join(", ")}, load key versions ${Object.keys(k.loadKeys).join(", ")}` +
            (k.tokenLoadKeys ? ` and ${Object.keys(k.tokenLoadKeys.labels).join(", ")} in token ${k.tokenLoadKeys.token.tokenLabel} (by reference)` : "") +
            `, batch master): ${v.out}`,
        );
      } catch (e) {
        if (e instanceof RangeError) throw new UsageError(e.message);
        throw e;
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "list-cards",
    summary: "List the cards this issuer personalised and the value credited to each.",
    usage: "[--data DIR]",
    options: { ...dataOption },
    async run(v) {
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const rows = await issuer.listCards();
        console.log(["purse id".padEnd(18), "currency", "expiry".padEnd(10), "key", "credited"].join("  "));
        for (const r of rows)
          console.log([r.purse_id.padEnd(18), String(r.currency).padEnd(8), r.expiry, String(r.key_version).padEnd(3), formatMinor(r.credited, 2)].join("  "));
      } finally {
        await issuer.close();
      }
    },
  },
]);
