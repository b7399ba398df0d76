// netpurse-issuer: the issuer's commands. Keys stay in the private keys
// file; nothing here prints key material.

import { join } from "node:path";
import { dataDir } from "../../lib/config.js";
import { runCommands, UsageError, int, str } from "../../lib/cli.js";
import { formatMinor, parseMinor } from "../../lib/money.js";
import { DEMO_ISSUER_ID, Issuer } from "./issuer.js";
import { VERDICT_KEY_FILE } from "../payment/security-module.js";

const dataOption = { data: { type: "string" } } as const;
const issuerDir = (v: Record<string, unknown>) => join(dataDir(v.data as string | undefined), "issuer");

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
    name: "personalise-card",
    summary:
      "Personalise a software stored-value card: diversified keys, purse data and an initial value\nrecorded as an issuer credit. The card file is private (mode 0600).",
    usage: "--out FILE [--value 100.00] [--max-balance 500.00] [--currency 978] [--exponent 2] [--expiry YYYY-MM-DD] [--key-version N] [--data DIR]",
    options: {
      ...dataOption,
      out: { type: "string" },
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
        });
        console.log(
          `personalised card ${card.purseId} (key version ${card.keyVersion}) with ${formatMinor(card.balance, exponent)}, expires ${card.expiry}: ${v.out}`,
        );
      } finally {
        await issuer.close();
      }
    },
  },
  {
    name: "provision-psam",
    summary:
      "Provision a software PSAM with every purchase key version, its batch key and its verdict key.\nPut it in a terminal host's folder: DATA/terminals/ID/psams/NAME.psam.json (mode 0600).",
    usage: "--out FILE --terminal ID [--currency 978] [--psam-id HEX8] [--batch-capacity N] [--data DIR]",
    options: {
      ...dataOption,
      out: { type: "string" },
      terminal: { type: "string" },
      currency: { type: "string" },
      "psam-id": { type: "string" },
      "batch-capacity": { type: "string" },
    },
    async run(v) {
      if (typeof v.out !== "string") throw new UsageError("--out FILE is required");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const p = await issuer.provisionPsam({
          path: v.out,
          ...(typeof v.terminal === "string" ? { terminalId: v.terminal } : {}),
          currency: int(v.currency, 978, "currency"),
          ...(typeof v["psam-id"] === "string" ? { psamId: v["psam-id"] } : {}),
          batchCapacity: int(v["batch-capacity"], 256, "batch-capacity"),
        });
        console.log(`provisioned PSAM ${p.psamId} (key versions ${Object.keys(p.purchaseKeys).join(", ")}, currency ${p.currency}): ${v.out}`);
        console.log(
          typeof v.terminal === "string"
            ? `assigned to terminal ${v.terminal}; export the PSAM registry for the concentrator: netpurse-issuer export-psam-registry`
            : "assigned to no terminal: the concentrator accepts it once 'netpurse-issuer assign-psam' and 'export-psam-registry' say where it is",
        );
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
    summary:
      "Provision the load server's software host security module with every load master key version.\nIts file is DATA/load/hsm.json (mode 0600); the load server reads it at start.",
    usage: "[--out FILE] [--hsm-id HEX8] [--data DIR]",
    options: { ...dataOption, out: { type: "string" }, "hsm-id": { type: "string" } },
    async run(v) {
      const out = str(v.out, join(dataDir(v.data as string | undefined), "load", "hsm.json"));
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const h = await issuer.provisionHsm({ path: out, ...(typeof v["hsm-id"] === "string" ? { hsmId: v["hsm-id"] } : {}) });
        console.log(`provisioned security module ${h.hsmId} (load key versions ${Object.keys(h.loadKeys).join(", ")}): ${out}`);
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
      "Write clearing's security module keys: every purchase and load master key version (to check card\nsignatures and S3s) and the batch master key (to check PSAM batches). Clearing reads\nDATA/clearing/keys.json (mode 0600). The keys are never printed.",
    usage: `--out FILE [--issuer-id ID (default ${DEMO_ISSUER_ID})] [--data DIR]`,
    options: { ...dataOption, out: { type: "string" }, "issuer-id": { type: "string" } },
    async run(v) {
      if (typeof v.out !== "string") throw new UsageError("--out FILE is required");
      const issuer = await Issuer.open(issuerDir(v));
      try {
        const k = await issuer.exportClearingKeys(v.out, str(v["issuer-id"], DEMO_ISSUER_ID));
        console.log(
          `wrote clearing's keys for issuer ${k.issuerId} (purchase key versions ${Object.keys(k.purchaseKeys).join(", ")}, load key versions ${Object.keys(k.loadKeys).join(", ")}, batch master): ${v.out}`,
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
