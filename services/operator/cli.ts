// netpurse-operator: the payment operator's commands.

import { join } from "node:path";
import { confirmationModeFromJSON, ConfirmationMode, type Money } from "../../gen/netpurse/card/v1/card.js";
import { batchNotClosedReasonToJSON, PsamSlotState, TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { PaymentServiceDefinition, PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { int, operatorChannel, runCommands, str, UsageError } from "../../lib/cli.js";
import { CertificateAuthority, pkiPaths, REVOCATION_REASONS, type RevocationReason } from "../../lib/pki/authority.js";
import { DEFAULT_TRUST_DOMAIN, KINDS, requireIdentity } from "../../lib/pki/identity.js";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { hexOf, merchantId as merchantIdOf, psamId as psamIdOf, txnId } from "../../lib/ids.js";
import { formatMoney } from "../../lib/money.js";
import { addressList } from "../../lib/address-list.js";
import { closeBatchesAtEvery, listAtEvery } from "../concentrator/at-every.js";
import { table } from "../../lib/table.js";
import { registerBank, registerMerchant } from "./operator.js";
import { ClearingServiceDefinition, type Batch } from "../../gen/netpurse/clearing/v1/clearing.js";
import { DEFAULT_ACQUIRER } from "../clearing/merchants.js";
import { writeFileAtomic } from "../../lib/files.js";
import {
  audit,
  batchReport,
  type ClearingClient,
  cardFilesIn,
  everyPage,
  listQuarantined,
  PAGE_SIZE,
  quarantineReport,
  readCardsAtHand,
  settlementCsv,
  readSettlement,
  settlementReport,
  statementReport,
} from "./clearing-report.js";

/** An operator's own certificate (DATA/pki/operator/ID.crt, default ID "operator"), or --insecure. */
const OPERATOR_OPTIONS = { data: { type: "string" }, pki: { type: "string" }, as: { type: "string" }, insecure: { type: "boolean" } } as const;
const OPERATOR_USAGE = "[--as OPERATOR-ID] [--pki DIR (default DATA/pki)] [--insecure]";

/** The concentrators of --concentrator (one address, or several separated by commas), each a client with its channel to close. */
async function concentratorsOf(v: Record<string, unknown>) {
  const security = await operatorChannel(v, "concentrator");
  return addressList(str(v.concentrator, defaultAddress("concentrator")), "concentrator address").map((address) => {
    const channel = openChannel(address, security, { maxMessageBytes: 256 * 1024 });
    return { address, client: clientFactory().create(TerminalConcentratorServiceDefinition, channel), close: () => channel.close() };
  });
}

/** The clearing service's options: where it is, and the operator's identity. */
const CLEARING_OPTIONS = { clearing: { type: "string" }, ...OPERATOR_OPTIONS } as const;
const CLEARING_USAGE = `[--clearing HOST:PORT (default ${defaultAddress("clearing")})] ${OPERATOR_USAGE}`;

/** Calls clearing as the operator, and closes the channel whatever happens. */
async function withClearing<T>(v: Record<string, unknown>, use: (c: ClearingClient) => Promise<T>): Promise<T> {
  const channel = openChannel(str(v.clearing, defaultAddress("clearing")), await operatorChannel(v, "clearing"), { maxMessageBytes: 4 * 1024 * 1024 });
  try {
    return await use(clientFactory().create(ClearingServiceDefinition, channel));
  } finally {
    channel.close();
  }
}

/** A settlement day option: YYYY-MM-DD, or empty for the day open now. */
function dayOption(v: unknown): string {
  const day = str(v, "");
  if (day && !/^\d{4}-\d{2}-\d{2}$/.test(day)) throw new UsageError(`--day must be YYYY-MM-DD, got ${JSON.stringify(day)}`);
  return day;
}

await runCommands(
  "netpurse-operator",
  "Operator tools: the installation's certificates, merchants, banks, the terminal pool, transaction records, and clearing's settlement and audit.",
  [
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
          const ca = await CertificateAuthority.init(dir, {
            trustDomain: str(v["trust-domain"], DEFAULT_TRUST_DOMAIN),
            ...(days ? { validityDays: days } : {}),
          });
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
        "Register a merchant: a fresh key shared between the payment server (DATA/payment/merchants.json)\nand the merchant's validation service (DATA/merchant-validation/keys.json), both mode 0600, and\nclearing's entry for it (DATA/clearing/merchants.json): its acquirer, and the currency it sells in.",
      usage: `--id MERCHANT --name NAME [--mode psam-verifies] [--acquirer ID (default ${DEFAULT_ACQUIRER})] [--currency 978] [--exponent 2] [--data DIR]`,
      options: {
        id: { type: "string" },
        name: { type: "string" },
        mode: { type: "string" },
        acquirer: { type: "string" },
        currency: { type: "string" },
        exponent: { type: "string" },
        data: { type: "string" },
      },
      async run(v) {
        if (typeof v.id !== "string" || typeof v.name !== "string") throw new UsageError("--id and --name are required");
        const mode = confirmationModeFromJSON(`CONFIRMATION_MODE_${str(v.mode, "psam-verifies").toUpperCase().replace(/-/g, "_")}`);
        if (mode === ConfirmationMode.UNRECOGNIZED) throw new UsageError(`unknown --mode ${String(v.mode)}`);
        const data = dataDir(v.data as string | undefined);
        const acquirerId = str(v.acquirer, DEFAULT_ACQUIRER);
        await registerMerchant({
          paymentDir: join(data, "payment"),
          validationDir: join(data, "merchant-validation"),
          merchantId: v.id,
          name: v.name,
          mode,
          clearing: { dir: join(data, "clearing"), acquirerId, currency: int(v.currency, 978, "currency"), exponent: int(v.exponent, 2, "exponent") },
        });
        console.log(
          `registered merchant ${v.id}, paid through acquirer ${acquirerId}; restart its validation service to load its key (clearing reads its registry within seconds)`,
        );
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
      summary: "Show the terminal hosts attached to the concentrators, their PSAMs and their state, and the payment servers' streams.",
      usage: `[--concentrator HOST:PORT[,HOST:PORT...]] (default ${defaultAddress("concentrator")}) ${OPERATOR_USAGE}`,
      options: { concentrator: { type: "string" }, ...OPERATOR_OPTIONS },
      async run(v) {
        const at = await concentratorsOf(v);
        try {
          const { lists, unanswered } = await listAtEvery(at, { deadline: CLI_DEADLINE_MS });
          const several = at.length > 1;
          const rows = lists.flatMap(({ address, list }) =>
            list.terminals.flatMap((t) =>
              t.slots.map((s) => [
                ...(several ? [address] : []),
                t.terminalId,
                String(s.slot),
                hexOf(s.psamId?.value),
                PsamSlotState[s.state].replace("PSAM_SLOT_STATE_", ""),
                String(s.psamCounter),
                String(s.pendingDebits.length),
                String(s.batchCount),
                s.reader || "(software)",
              ]),
            ),
          );
          console.log(table([...(several ? ["concentrator"] : []), "terminal", "slot", "PSAM", "state", "counter", "open debits", "batch", "reader"], rows));
          for (const { address, list } of lists)
            for (const p of list.paymentServers)
              console.log(
                `payment server ${p.paymentServerId}${p.replicaId ? ` replica ${p.replicaId}` : ""}${several ? ` at ${address}` : ""}: ${p.jobsInFlight} jobs in flight, ${p.psamsLeased} PSAMs leased`,
              );
          for (const u of unanswered) console.log(`concentrator ${u.address} did not answer: ${u.error}`);
        } finally {
          for (const c of at) c.close();
        }
      },
    },
    {
      name: "close-batch",
      summary: [
        "Close PSAM batches now: every attached terminal host's, one host's (--terminal) or one PSAM's (--psam).",
        "Each host closes the batches (an empty one is left open: it uses no batch number), keeps them in its",
        "outbox and sends them to clearing at once. Prints each batch closed.",
      ].join("\n"),
      usage: `[--terminal ID] [--psam HEX] [--concentrator HOST:PORT[,HOST:PORT...]] (default ${defaultAddress("concentrator")}) ${OPERATOR_USAGE}`,
      options: { terminal: { type: "string" }, psam: { type: "string" }, concentrator: { type: "string" }, ...OPERATOR_OPTIONS },
      async run(v) {
        const psam = typeof v.psam === "string" ? v.psam.toLowerCase() : undefined;
        if (psam !== undefined && !/^[0-9a-f]{8}$/.test(psam)) throw new UsageError(`--psam must be a PSAM id of 8 hex digits, got ${JSON.stringify(v.psam)}`);
        const at = await concentratorsOf(v);
        try {
          // Each terminal host is attached to one concentrator of the list: every one is asked.
          const { response: r, unanswered } = await closeBatchesAtEvery(
            at,
            { terminalId: str(v.terminal, ""), psamId: psam === undefined ? undefined : { value: Buffer.from(psam, "hex") } },
            { deadline: CLI_DEADLINE_MS },
          );
          for (const u of unanswered) console.log(`concentrator ${u.address} did not answer (its terminal hosts' batches were not closed): ${u.error}`);
          const rows = r.closed.map((b) => [b.terminalId, hexOf(b.psamId?.value), String(b.batchNumber), String(b.count), b.total ? formatMoney(b.total) : ""]);
          console.log(rows.length ? table(["terminal", "PSAM", "batch", "records", "total (minor units)"], rows) : "no batch closed");
          for (const n of r.notClosed) {
            const why = batchNotClosedReasonToJSON(n.reason).replace("BATCH_NOT_CLOSED_REASON_", "").toLowerCase().replace(/_/g, " ");
            console.log(`not closed: ${n.terminalId}${n.psamId ? ` PSAM ${hexOf(n.psamId.value)}` : ""}: ${why}`);
          }
          if (rows.length) console.log("the terminal hosts send the closed batches to clearing now");
        } finally {
          for (const c of at) c.close();
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
    {
      name: "settlement",
      summary: [
        "Show a settlement day's positions (per issuer, acquirer, merchant and bank) and the payouts to make.",
        "  --day YYYY-MM-DD   the day (default: the day open now, UTC)",
        "  --close            close the day first: nothing more is posted to it, its figures are final",
        "  --csv FILE         also write the positions and payouts to FILE as CSV (RFC 4180, one header row)",
      ].join("\n"),
      usage: `[--day YYYY-MM-DD] [--close] [--csv FILE] ${CLEARING_USAGE}`,
      options: { day: { type: "string" }, close: { type: "boolean" }, csv: { type: "string" }, ...CLEARING_OPTIONS },
      async run(v) {
        const day = dayOption(v.day);
        const settlement = await withClearing(v, async (c) => {
          const which = day || (await c.getSettlement({ day: "" }, { deadline: CLI_DEADLINE_MS })).settlement!.day;
          if (v.close === true) await c.closeSettlementDay({ day: which }, { deadline: CLI_DEADLINE_MS });
          return readSettlement(c, which, CLI_DEADLINE_MS);
        });
        console.log(settlementReport(settlement));
        if (typeof v.csv === "string") {
          await writeFileAtomic(v.csv, settlementCsv(settlement));
          console.log(`\nwrote ${settlement.positions.length} positions and ${settlement.payouts.length} payouts to ${v.csv}`);
        }
      },
    },
    {
      name: "audit",
      summary: [
        "Check clearing's ledger: every transaction balances, the card debits proven equal the merchant",
        "credits, the issuer's float equals the loads less the purchases, nothing is posted twice, and each",
        "card at hand holds its opening value plus its loads less its purchases as the ledger sees them.",
        "Lists everything quarantined with its reason. Exit status 1 when any check fails.",
        "  --card FILE   a software card to check (repeatable; default every DATA/cards/*.card.json). Only read:",
        "                its balance comes from its file, its opening value from the issuer (DATA/issuer).",
      ].join("\n"),
      usage: `[--card FILE]... ${CLEARING_USAGE} [--data DIR]`,
      options: { card: { type: "string", multiple: true }, ...CLEARING_OPTIONS },
      async run(v) {
        const data = dataDir(v.data as string | undefined);
        const given = Array.isArray(v.card) ? v.card.filter((f): f is string => typeof f === "string") : [];
        const cards = await readCardsAtHand(given.length ? given : await cardFilesIn(join(data, "cards")), join(data, "issuer"));
        const r = await withClearing(v, (c) => audit(c, cards, CLI_DEADLINE_MS));
        console.log(r.report);
        if (!r.ok) process.exitCode = 1;
      },
    },
    {
      name: "merchant-statement",
      summary: "Show what clearing pays a merchant: its posted purchases, newest first, and its totals.",
      usage: `MERCHANT [--day YYYY-MM-DD (default every day)] ${CLEARING_USAGE}`,
      options: { day: { type: "string" }, ...CLEARING_OPTIONS },
      async run(v, positionals) {
        const id = positionals[0];
        if (!id) throw new UsageError("give the merchant id");
        const day = dayOption(v.day);
        await withClearing(v, async (c) => {
          let first: { acquirerId: string; total: Money[]; purchases: number } | undefined;
          const lines = await everyPage(async (pageToken) => {
            const r = await c.getMerchantStatement({ merchantId: merchantIdOf(id), day, pageSize: PAGE_SIZE, pageToken }, { deadline: CLI_DEADLINE_MS });
            first ??= r;
            return { items: r.lines, next: r.nextPageToken };
          });
          console.log(statementReport({ merchantId: id, day, acquirerId: first!.acquirerId, total: first!.total, purchases: first!.purchases }, lines));
        });
      },
    },
    {
      name: "batch",
      summary: "Show what clearing made of a PSAM's batch (accepted or rejected, posted, quarantined) and its quarantined records.",
      usage: `--psam HEX8 --number N ${CLEARING_USAGE}`,
      options: { psam: { type: "string" }, number: { type: "string" }, ...CLEARING_OPTIONS },
      async run(v) {
        if (typeof v.psam !== "string" || !/^[0-9a-fA-F]{8}$/.test(v.psam)) throw new UsageError("--psam must be the PSAM id, 8 hex digits");
        if (v.number === undefined) throw new UsageError("--number N is required");
        const batchNumber = int(v.number, 0, "number");
        if (batchNumber < 1) throw new UsageError("--number must be 1 or more");
        await withClearing(v, async (c) => {
          let batch: Batch | undefined;
          const quarantined = await everyPage(async (pageToken) => {
            const r = await c.getBatch({ psamId: psamIdOf(v.psam as string), batchNumber, pageSize: PAGE_SIZE, pageToken }, { deadline: CLI_DEADLINE_MS });
            batch ??= r.batch;
            return { items: r.quarantinedRecords, next: r.nextPageToken };
          });
          console.log(batchReport(batch!, quarantined));
        });
      },
    },
    {
      name: "quarantined",
      summary: "List everything clearing did not pay, oldest first: quarantined records and loads, rejected batches, each with its reason.",
      usage: CLEARING_USAGE,
      options: { ...CLEARING_OPTIONS },
      async run(v) {
        console.log(quarantineReport(await withClearing(v, (c) => listQuarantined(c, CLI_DEADLINE_MS))));
      },
    },
  ],
);
