// netpurse-operator: the payment operator's commands.

import { join } from "node:path";
import { confirmationModeFromJSON, ConfirmationMode } from "../../gen/netpurse/card/v1/card.js";
import { PsamSlotState, TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { PaymentServiceDefinition, PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { runCommands, str, UsageError } from "../../lib/cli.js";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { clientFactory, openChannel, CLI_DEADLINE_MS } from "../../lib/grpc/client.js";
import { hexOf, txnId } from "../../lib/ids.js";
import { formatMoney } from "../../lib/money.js";
import { table } from "../../lib/table.js";
import { registerBank, registerMerchant } from "./operator.js";

await runCommands("netpurse-operator", "Operator tools: merchants, banks, the terminal pool, transaction records.", [
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
    usage: `[--concentrator HOST:PORT] (default ${defaultAddress("concentrator")})`,
    options: { concentrator: { type: "string" } },
    async run(v) {
      const channel = openChannel(str(v.concentrator, defaultAddress("concentrator")), { maxMessageBytes: 256 * 1024 });
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
    usage: `TRANSACTION_ID [--payment HOST:PORT] (default ${defaultAddress("payment")})`,
    options: { payment: { type: "string" } },
    async run(v, positionals) {
      const id = positionals[0];
      if (!id) throw new UsageError("give the transaction id");
      const channel = openChannel(str(v.payment, defaultAddress("payment")));
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
