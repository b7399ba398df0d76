// netpurse-operator: the payment operator's commands.

import { join } from "node:path";
import { confirmationModeFromJSON, ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import { PsamSlotState, TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { PaymentServiceDefinition, PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { int, operatorChannel, runCommands, str, UsageError } from "../../lib/cli.js";
import { CertificateAuthority, pkiPaths, REVOCATION_REASONS, type RevocationReason } from "../../lib/pki/authority.js";
import { DEFAULT_TRUST_DOMAIN, KINDS, requireIdentity } from "../../lib/pki/identity.js";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { hexOf, txnId } from "../../lib/ids.js";
import { formatMoney } from "../../lib/money.js";
import { table } from "../../lib/table.js";
import { registerBank, registerMerchant } from "./operator.js";

/** An operator's own certificate (DATA/pki/operator/ID.crt, default ID "operator"), or --insecure. */
const OPERATOR_OPTIONS = { data: { type: "string" }, pki: { type: "string" }, as: { type: "string" }, insecure: { type: "boolean" } } as const;
const OPERATOR_USAGE = "[--as OPERATOR-ID] [--pki DIR (default DATA/pki)] [--insecure]";

await runCommands("netpurse-operator", "Operator tools: the installation's certificates, merchants, banks, the terminal pool, transaction records.", [
  {
    name: "pki",
    summary: [
      "The installation's certificate authority (DATA/pki): a key and certificate per service, with its",
      "identity as a SPIFFE ID (spiffe://TRUST-DOMAIN/KIND/ID), and a revocation list every service reads.",
      "  pki init [--trust-domain netpurse.local]            make the authority (once)",
      "  pki issue --kind KIND --id ID [--host NAME]...        a key (mode 0600) and certificate for a service",
      "  pki revoke (--kind KIND --id ID | --serial HEX) [--reason key-compromise|superseded|cessation-of-operation|affiliation-changed]",
      "  pki list                                             every certificate issued, and which are revoked",
      `KIND is one of ${KINDS.join(", ")}. Services read the revocation list at start and when it changes.`,
    ].join("\n"),
    usage: "init|issue|revoke|list [options] [--data DIR]",
    options: {
      data: { type: "string" },
      "trust-domain": { type: "string" },
      kind: { type: "string" },
      id: { type: "string" },
      host: { type: "string", multiple: true },
      serial: { type: "string" },
      reason: { type: "string" },
      days: { type: "string" },
    },
    async run(v, positionals) {
      const dir = join(dataDir(v.data as string | undefined), "pki");
      const verb = positionals[0];
      const days = v.days === undefined ? undefined : int(v.days, 0, "days");
      if (verb === "init") {
        const ca = await CertificateAuthority.init(dir, { trustDomain: str(v["trust-domain"], DEFAULT_TRUST_DOMAIN), ...(days ? { validityDays: days } : {}) });
        console.log(`made the certificate authority of ${ca.trustDomain} in ${dir} (its key: ca.key, mode 0600)`);
      } else if (verb === "issue") {
        if (typeof v.kind !== "string" || typeof v.id !== "string") throw new UsageError("--kind and --id are required");
        const ca = await CertificateAuthority.open(dir);
        const identity = requireIdentity(v.kind, v.id, ca.trustDomain);
        const e = await ca.issue(identity, { hosts: (v.host as string[] | undefined) ?? [], ...(days ? { validityDays: days } : {}) });
        console.log(`issued ${e.spiffeId}, serial ${e.serial}, valid until ${e.notAfter}: ${pkiPaths(dir).cert(identity)} (key mode 0600)`);
      } else if (verb === "revoke") {
        const reason = str(v.reason, "unspecified");
        if (!(reason in REVOCATION_REASONS)) throw new UsageError(`--reason must be one of ${Object.keys(REVOCATION_REASONS).join(", ")}`);
        const what =
          typeof v.serial === "string"
            ? { serial: v.serial.toLowerCase() }
            : typeof v.kind === "string" && typeof v.id === "string"
              ? { kind: v.kind, id: v.id }
              : undefined;
        if (!what) throw new UsageError("give --kind and --id, or --serial");
        const revoked = await (await CertificateAuthority.open(dir)).revoke(what, reason as RevocationReason);
        if (revoked.length === 0) throw new UsageError("no valid certificate matches; 'netpurse-operator pki list' shows them");
        for (const e of revoked) console.log(`revoked ${e.spiffeId} serial ${e.serial}`);
        console.log(`the revocation list ${pkiPaths(dir).crl} is updated; running services read it within seconds`);
      } else if (verb === "list") {
        const issued = await (await CertificateAuthority.open(dir)).list();
        console.log(
          table(
            ["identity", "serial", "valid until", "revoked"],
            issued.map((e) => [e.spiffeId, e.serial, e.notAfter, e.revoked ? `${e.revoked.at} (${e.revoked.reason})` : ""]),
          ),
        );
      } else {
        throw new UsageError(`unknown pki command ${JSON.stringify(verb ?? "")}: init, issue, revoke or list`);
      }
    },
  },
  {
    name: "add-merchant",
    summary:
      "Register a merchant: a fresh key shared between the payment server (DATA/payment/merchants.json)\nand the merchant's validation service (DATA/merchant-validation/keys.json), both mode 0600.",
    usage: "--id MERCHANT --name NAME [--mode psam-verifies] [--data DIR]",
    options: { id: { type: "string" }, name: { type: "string" }, mode: { type: "string" }, data: { type: "string" } },
    async run(v) {
      if (typeof v.id !== "string" || typeof v.name !== "string") throw new UsageError("--id and --name are required");
      const mode = confirmationModeFromJSON(`CONFIRMATION_MODE_${str(v.mode, "psam-verifies").toUpperCase().replace(/-/g, "_")}`);
      if (mode === ConfirmationMode.UNRECOGNIZED) throw new UsageError(`unknown --mode ${String(v.mode)}`);
      const data = dataDir(v.data as string | undefined);
      await registerMerchant({ paymentDir: join(data, "payment"), validationDir: join(data, "merchant-validation"), merchantId: v.id, name: v.name, mode });
      console.log(`registered merchant ${v.id}; restart its validation service to load the new key`);
    },
  },
  {
    name: "add-bank",
    summary:
      "Register a bank at the load server: a fresh key shared between the load server (DATA/load/banks.json)\nand the bank (DATA/bank/bank.json), both mode 0600.",
    usage: "--id BANK [--data DIR]",
    options: { id: { type: "string" }, data: { type: "string" } },
    async run(v) {
      if (typeof v.id !== "string") throw new UsageError("--id is required");
      const data = dataDir(v.data as string | undefined);
      await registerBank({ loadDir: join(data, "load"), bankDir: join(data, "bank"), bankId: v.id });
      console.log(`registered bank ${v.id}; restart the load server and the bank to load the new key`);
    },
  },
  {
    name: "terminals",
    summary: "Show the terminal hosts attached to the concentrator, their PSAMs and their state.",
    usage: `[--concentrator HOST:PORT] (default ${defaultAddress("concentrator")}) ${OPERATOR_USAGE}`,
    options: { concentrator: { type: "string" }, ...OPERATOR_OPTIONS },
    async run(v) {
      const channel = openChannel(str(v.concentrator, defaultAddress("concentrator")), await operatorChannel(v, "concentrator"), {
        maxMessageBytes: 256 * 1024,
      });
      try {
        const r = await clientFactory().create(TerminalConcentratorServiceDefinition, channel).listTerminals({}, { deadline: CLI_DEADLINE_MS });
        const rows = r.terminals.flatMap((t) =>
          t.slots.map((s) => [
            t.terminalId,
            String(s.slot),
            hexOf(s.psamId?.value),
            PsamSlotState[s.state].replace("PSAM_SLOT_STATE_", ""),
            String(s.psamCounter),
            String(s.pendingDebits.length),
            String(s.batchCount),
          ]),
        );
        console.log(table(["terminal", "slot", "PSAM", "state", "counter", "open debits", "batch"], rows));
        for (const p of r.paymentServers) console.log(`payment server ${p.paymentServerId}: ${p.jobsInFlight} jobs in flight, ${p.psamsLeased} PSAMs leased`);
      } finally {
        channel.close();
      }
    },
  },
  {
    name: "purchase",
    summary: "Show the payment server's record of a transaction and every step it logged.",
    usage: `TRANSACTION_ID [--payment HOST:PORT] (default ${defaultAddress("payment")}) ${OPERATOR_USAGE}`,
    options: { payment: { type: "string" }, ...OPERATOR_OPTIONS },
    async run(v, positionals) {
      const id = positionals[0];
      if (!id) throw new UsageError("give the transaction id");
      const channel = openChannel(str(v.payment, defaultAddress("payment")), await operatorChannel(v, "payment"));
      try {
        const { purchase: p } = await clientFactory()
          .create(PaymentServiceDefinition, channel)
          .getPurchase({ transactionId: txnId(id) }, { deadline: CLI_DEADLINE_MS });
        console.log(
          `${id}: ${PurchaseState[p!.state].replace("PURCHASE_STATE_", "")}, ${formatMoney(p!.amount!)} to ${p!.merchantId?.value}, purse ${hexOf(p!.purseId?.value)}, PSAM ${hexOf(p!.psamId?.value)} counter ${p!.psamCounter}`,
        );
        console.log(
          table(
            ["time", "step", "detail"],
            p!.events.map((e) => [e.time!.toISOString(), e.step, e.detail]),
          ),
        );
      } finally {
        channel.close();
      }
    },
  },
]);
