// Writes the byte tables of docs/apdu.md from the layouts in lib/protocol/,
// so the document and the code cannot disagree. `--check` only compares
// (the unit tests run it).

import { readFileSync, writeFileSync } from "node:fs";
import type { Field, Fields, Layout } from "../lib/protocol/layout.js";
import * as purse from "../lib/protocol/purse.js";
import * as psam from "../lib/protocol/psam.js";
import * as load from "../lib/protocol/load.js";

const layouts: Layout<Fields>[] = [
  purse.InitializeForPurchaseResponse,
  purse.PurchaseCryptogramInput,
  purse.ReadPurseResponse,
  purse.DebitCommand,
  purse.DebitResponse,
  purse.LogRecord,
  load.InitializeForLoadCommand,
  load.InitializeForLoadResponse,
  load.LoadCommand,
  load.LoadResponse,
  psam.DrawAmountCommand,
  psam.DrawAmountResponse,
  psam.DrawAmountResponseWithSignature,
  psam.VerifyDebitCommand,
  psam.VerifyDebitResponse,
  psam.ReverseDebitCommand,
  psam.ReverseDebitResponse,
  psam.IssuedMacInput,
  psam.VerdictMacInput,
  psam.ReversalMacInput,
  psam.PsamStatusResponse,
  psam.PendingDebitRecord,
  psam.BatchRecord,
  psam.CloseBatchResponse,
];

export function table(l: Layout<Fields>): string {
  const rows = Object.entries(l.fields as Record<string, Field<unknown>>).map(([name, f]) => `| ${l.offset(name)} | ${f.size} | \`${name}\` | ${f.kind} |`);
  return [`| offset | length | field | encoding |`, `|---:|---:|---|---|`, ...rows, `|  | **${l.size}** | | total |`].join("\n");
}

export function render(doc: string): string {
  return doc.replace(/<!-- layout: (.+?) -->[\s\S]*?<!-- \/layout -->/g, (_m, name: string) => {
    const l = layouts.find((x) => x.name === name);
    if (!l) throw new Error(`docs/apdu.md names an unknown layout: ${name}`);
    return `<!-- layout: ${name} -->\n${table(l)}\n<!-- /layout -->`;
  });
}

const path = new URL("../docs/apdu.md", import.meta.url).pathname;
if (import.meta.url === `file://${process.argv[1]}`) {
  const doc = readFileSync(path, "utf8");
  const next = render(doc);
  if (process.argv.includes("--check")) {
    if (next !== doc) {
      console.error("docs/apdu.md is out of step with lib/protocol; run 'npm run docs:apdu'");
      process.exit(1);
    }
  } else {
    writeFileSync(path, next);
  }
}
