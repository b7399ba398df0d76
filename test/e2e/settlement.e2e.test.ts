// The operator's clearing commands as an operator runs them: bin/netpurse-operator
// as its own process against a running network, after a load and purchases in
// several confirmation modes whose batches reached clearing. What they print
// must be what was paid: the settlement's figures and CSV, the audit of the
// ledger and of the card, a merchant's statement, a batch. And `npm start
// -- --once` ends its demo with the settlement and a clean audit.

import { slowIt } from "../support/fixtures.js";
import { expect } from "chai";
import { execFile, spawn } from "node:child_process";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { ClientError, Status } from "nice-grpc";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import type { CardFile } from "../../client/card/software-card.js";
import { readState } from "../../lib/apdu/state-log.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { reasonName, reasonOf } from "../../lib/grpc/errors.js";
import { hexOf, merchantId } from "../../lib/ids.js";
import { formatMinor, money } from "../../lib/money.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import { Security } from "../../lib/pki/security.js";
import { commandFailure, tempDir } from "../support/fixtures.js";
import { EUR, openAccount } from "../support/load.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { defined } from "../support/offers.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;
const OPERATOR = join(ROOT, "bin/netpurse-operator");

/** A CSV text (RFC 4180, as settlement --csv writes it) as rows of fields. */
function parseCsv(text: string): string[][] {
  const rows: string[][] = [];
  let row: string[] = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const ch = text[i]!;
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (ch === '"') {
        quoted = false;
      } else {
        field += ch;
      }
    } else if (ch === '"') {
      quoted = true;
    } else if (ch === ",") {
      row.push(field);
      field = "";
    } else if (ch === "\r" && text[i + 1] === "\n") {
      row.push(field);
      rows.push(row);
      row = [];
      field = "";
      i++;
    } else {
      field += ch;
    }
  }
  if (field || row.length) throw new Error(`the CSV does not end with CRLF: ${JSON.stringify(text.slice(-40))}`);
  return rows;
}

describe("end to end: the operator's settlement, audit and statements", function () {
  this.timeout(180_000);
  let net: Network;
  /** What the test paid, per merchant: transaction ids and minor units. */
  const paid = new Map<string, { ids: string[]; minor: number }>();
  let loadedMinor = 0;
  let files = { dir: "", cleanup: async () => {} };

  const operator = (...args: string[]) =>
    run(OPERATOR, [...args, "--clearing", net.clearingServer.address, "--data", net.data], {
      env: { ...process.env, NETPURSE_DATA: net.data },
      timeout: 60_000,
    });

  async function pay(shop: string, product: string): Promise<PaymentOffer> {
    const { offer } = await net.merchants[shop]!.createOrder({ productId: product });
    const o = defined(offer, "the shop's offer");
    await net.clients.cardholder.payOffer({ offer: o, approvedAmount: o.amount }, { deadline: 30_000 });
    const p = paid.get(shop) ?? { ids: [], minor: 0 };
    p.ids.push(defined(o.transactionId, "the transaction id").value);
    p.minor += Number(defined(o.amount, "the amount").amountMinor);
    paid.set(shop, p);
    return o;
  }
  const purchasesMade = () => [...paid.values()].reduce((n, p) => n + p.ids.length, 0);
  const totalPaid = () => [...paid.values()].reduce((n, p) => n + p.minor, 0);

  before(async () => {
    files = await tempDir("netpurse-settlement-");
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }], cardValue: 5_000 });
    // A load from a bank account, then purchases in three modes (the card's proof reaches the PSAM later in MERCHANT_COMPARES).
    const holder = await openAccount(net, { accountId: "alice", deposit: 50_000 });
    const amount = money(2_000, EUR, 2);
    await net.clients.cardholder.loadCard(
      { bankAddress: net.bank.address, accountId: holder.accountId, amount, approvedAmount: amount, bankAccessToken: holder.token },
      { deadline: 30_000 },
    );
    loadedMinor = 2_000;
    await pay("demo-shop", "ebook-grpc");
    await pay("demo-shop", "song-1");
    await pay("server-shop", "ebook-smart-cards");
    await pay("merchant-shop", "song-1");
    // Every PSAM's batch to clearing; a proof that reached its PSAM after a close lands in the next batch, so close until all are posted.
    let lastClose = 0;
    await waitFor(
      async () => {
        if (Date.now() - lastClose > 1_000) {
          await net.clients.concentrator.closeBatches({});
          lastClose = Date.now();
        }
        const s = defined((await net.clearing.getSettlement({ day: "" })).settlement, "the settlement");
        return s.purchases === purchasesMade() && s.loads === 1;
      },
      30_000,
      "clearing to post the purchases and the load",
    );
  });
  after(async () => {
    await net?.close();
    await files.cleanup();
  });

  it("settlement prints the day's positions and payouts, and --csv writes the same figures", async () => {
    const csvFile = join(files.dir, "settlement.csv");
    const { stdout } = await operator("settlement", "--csv", csvFile);
    expect(stdout).to.match(new RegExp(`settlement day \\d{4}-\\d{2}-\\d{2} \\(open\\): ${purchasesMade()} purchases, 1 load\\n`));
    for (const [shop, p] of paid) {
      expect(stdout).to.match(new RegExp(`merchant\\s+${shop}\\s+EUR ${formatMinor(p.minor, 2).replace(".", "\\.")}\\s`), shop);
      expect(stdout).to.match(new RegExp(`acquirer demo-acquirer\\s+merchant ${shop}\\s+EUR ${formatMinor(p.minor, 2).replace(".", "\\.")}`), shop);
    }
    expect(stdout).to.contain(`wrote `).and.to.contain(csvFile);

    const rows = parseCsv(await readFile(csvFile, "utf8"));
    const header = rows[0]!;
    expect(header).to.deep.equal([
      "day",
      "record",
      "party_kind",
      "party_id",
      "counterparty_kind",
      "counterparty_id",
      "currency",
      "receivable",
      "payable",
      "net",
      "transactions",
      "amount",
      "points",
    ]);
    const records = rows.slice(1).map((r) => Object.fromEntries(header.map((h, i) => [h, r[i]!])));
    const minor = (s: string | undefined) => Math.round(Number(s) * 100);
    for (const [shop, p] of paid) {
      const position = defined(
        records.find((r) => r.record === "position" && r.party_kind === "merchant" && r.party_id === shop),
        `${shop}'s position`,
      );
      expect({ receivable: minor(position.receivable), transactions: Number(position.transactions), currency: position.currency }, shop).to.deep.equal({
        receivable: p.minor,
        transactions: p.ids.length,
        currency: "978",
      });
      const payout = defined(
        records.find((r) => r.record === "payout" && r.counterparty_id === shop),
        `the payout to ${shop}`,
      );
      expect([payout.party_kind, payout.party_id, minor(payout.amount)]).to.deep.equal(["acquirer", "demo-acquirer", p.minor]);
    }
    // What the acquirer pays its merchants is what the issuer pays the acquirer: every purchase made, to the cent.
    const toAcquirer = records.filter((r) => r.record === "payout" && r.counterparty_kind === "acquirer").reduce((n, r) => n + minor(r.amount), 0);
    expect(toAcquirer).to.equal(totalPaid());
    const bank = defined(
      records.find((r) => r.record === "position" && r.party_kind === "bank"),
      "the bank's position",
    );
    expect([bank.party_id, minor(bank.payable)]).to.deep.equal(["demo-bank", loadedMinor]);
    expect(records.every((r) => r.day === records[0]!.day)).to.equal(true);
  });

  it("audit prints every check ok with the card's balance and exits 0 on a clean network", async () => {
    const { stdout } = await operator("audit");
    const balance = defined((await net.clients.cardholder.getCard({})).purse?.balance, "the card's balance");
    expect(Number(balance.amountMinor)).to.equal(5_000 + loadedMinor - totalPaid());
    const purse = (JSON.parse(await readFile(net.cardPath, "utf8")) as { purseId: string }).purseId;
    expect(stdout).to.contain(`card ${purse} (${net.cardPath}): balance EUR ${formatMinor(balance.amountMinor, 2)}, opening value EUR 50.00`);
    const checks = stdout.split("\n").filter((l) => /^(ok|FAILED)\s/.test(l));
    expect(checks.length).to.be.at.least(6);
    expect(checks.filter((l) => !l.startsWith("ok"))).to.deep.equal([]);
    expect(checks.some((l) => l.includes(`card ${purse}`))).to.equal(true);
    expect(stdout).to.contain("audit clean").and.to.contain("nothing quarantined");
  });

  it("audit exits 1 and names the card whose balance disagrees with the ledger", async () => {
    const copy = join(files.dir, "changed.card.json");
    const card = await readState<CardFile>(net.cardPath);
    await writeFile(copy, JSON.stringify({ ...card, balance: card.balance + 100 }));
    const failed = await commandFailure(operator("audit", "--card", copy));
    expect(failed.code).to.equal(1);
    const line = defined(
      failed.stdout.split("\n").find((l) => l.startsWith("FAILED")),
      "a FAILED check",
    );
    expect(line)
      .to.contain(`card ${card.purseId}`)
      .and.to.contain(`card says ${card.balance + 100}`);
    expect(failed.stdout).to.contain("AUDIT FAILED");
    // The ledger's own checks still hold: only the card's fails.
    expect(failed.stdout.split("\n").filter((l) => l.startsWith("FAILED"))).to.have.length(1);
  });

  it("merchant-statement shows the merchant's purchases and total, and only its own", async () => {
    const demo = paid.get("demo-shop")!;
    const { stdout } = await operator("merchant-statement", "demo-shop");
    for (const id of demo.ids) expect(stdout).to.contain(id);
    for (const id of paid.get("server-shop")!.ids) expect(stdout).to.not.contain(id);
    expect(stdout).to.contain("paid through acquirer demo-acquirer");
    expect(stdout).to.contain(`${demo.ids.length} purchases, total EUR ${formatMinor(demo.minor, 2)}`);

    const unknown = await commandFailure(operator("merchant-statement", "no-such-shop"));
    expect(unknown.code).to.equal(1);
    expect(unknown.stderr).to.contain("NOT_FOUND [ERROR_REASON_UNKNOWN_MERCHANT]").and.to.contain("no-such-shop");
    const noId = await commandFailure(operator("merchant-statement"));
    expect(noId.code).to.equal(2);
    expect(noId.stderr).to.contain("give the merchant id");
  });

  it("batch shows an accepted batch's figures; quarantined says nothing was quarantined", async () => {
    const statement = await net.clearing.getMerchantStatement({ merchantId: merchantId("demo-shop") });
    const line = defined(statement.lines[0], "a statement line");
    const psam = hexOf(line.psamId?.value);
    const { stdout } = await operator("batch", "--psam", psam, "--number", String(line.batchNumber));
    expect(stdout).to.match(new RegExp(`PSAM ${psam} batch ${line.batchNumber}: ACCEPTED`));
    expect(stdout).to.match(/\d+ records?, total EUR \d+\.\d\d; \d+ posted, 0 quarantined/);
    expect(stdout).to.contain("sent by terminal-1");

    const missing = await commandFailure(operator("batch", "--psam", psam, "--number", "999"));
    expect(missing.code).to.equal(1);
    expect(missing.stderr).to.contain("NOT_FOUND");
    const bad = await commandFailure(operator("batch", "--psam", "xyz", "--number", "1"));
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain("--psam must be the PSAM id, 8 hex digits");

    expect((await operator("quarantined")).stdout).to.contain("nothing quarantined");
  });

  it("refuses callers that are not the installation's operators", async () => {
    // A merchant of this installation: its own statement only, no settlement, no audit, no one else's statement.
    const asMerchant = await net.security.of("merchant", "demo-shop");
    const channel = openChannel(net.clearingServer.address, asMerchant.channel({ kind: "clearing" }));
    try {
      const clearing = clientFactory().create(ClearingServiceDefinition, channel);
      const refusal = async (call: Promise<unknown>) => {
        const e = await call.then(
          () => undefined,
          (x: unknown) => x,
        );
        expect(e).to.be.instanceOf(ClientError);
        return { code: Status[(e as ClientError).code], reason: reasonName(reasonOf(e) ?? 0) };
      };
      const denied = { code: "PERMISSION_DENIED", reason: "ERROR_REASON_NOT_ALLOWED" };
      expect(await refusal(clearing.getSettlement({ day: "" }))).to.deep.equal(denied);
      expect(await refusal(clearing.runAudit({ cards: [] }))).to.deep.equal(denied);
      expect(await refusal(clearing.listQuarantined({}))).to.deep.equal(denied);
      expect(await refusal(clearing.closeSettlementDay({ day: "2000-01-01" }))).to.deep.equal(denied);
      expect(await refusal(clearing.getMerchantStatement({ merchantId: merchantId("server-shop") }))).to.deep.equal(denied);
      expect((await clearing.getMerchantStatement({ merchantId: merchantId("demo-shop") })).purchases).to.equal(paid.get("demo-shop")!.ids.length);
    } finally {
      channel.close();
    }

    // The CLI with an operator certificate of another installation does not get through the handshake.
    const { dir: foreign, cleanup } = await tempDir("netpurse-foreign-pki-");
    try {
      const ca = await CertificateAuthority.init(foreign);
      await ca.issue({ kind: "operator", id: "operator" });
      await Security.forService(foreign, { kind: "operator", id: "operator" }); // a genuine operator identity, of the wrong installation
      const refused = await commandFailure(operator("settlement", "--pki", foreign));
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.match(/netpurse-operator settlement: UNAVAILABLE/);
      expect(refused.stdout).to.equal("");
    } finally {
      await cleanup();
    }
  });

  it("settlement --close closes the day: its figures are final, and a bad --day is a usage error", async () => {
    const { stdout } = await operator("settlement", "--close");
    expect(stdout).to.match(new RegExp(`settlement day \\d{4}-\\d{2}-\\d{2} \\(closed at [0-9T:.Z-]+\\): ${purchasesMade()} purchases, 1 load\\n`));
    const day = /settlement day (\S+)/.exec(stdout)![1]!;
    expect((await operator("settlement", "--day", day)).stdout).to.contain(`settlement day ${day} (closed at`);
    const bad = await commandFailure(operator("settlement", "--day", "31/12/2030"));
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.contain("--day must be YYYY-MM-DD");
  });
});

describe("end to end: npm start -- --once ends with the settlement and a clean audit", function () {
  this.timeout(180_000);

  slowIt("[slow] closes the batches, prints the settlement with the demo's purchases and load, runs a clean audit, and exits 0", async () => {
    const { dir, cleanup } = await tempDir("netpurse-once-");
    try {
      const once = async () => {
        const started = Date.now();
        const main = spawn(process.execPath, ["--import", "tsx", "services/network/main.ts", "--once", "--data", dir], {
          cwd: ROOT,
          stdio: ["ignore", "pipe", "pipe"],
        });
        let out = "";
        main.stdout.on("data", (d: Buffer) => (out += d.toString()));
        main.stderr.on("data", (d: Buffer) => (out += d.toString()));
        const code = await new Promise<number | null>((r) => main.once("exit", (c) => r(c)));
        return { code, out, ms: Date.now() - started };
      };
      const first = await once();
      expect(first.code, first.out).to.equal(0);
      expect(first.out).to.match(/closed batch \d+ of PSAM [0-9a-f]{8} on terminal-1: \d+ records?/);
      expect(first.out).to.contain("clearing posted 4 purchases, 1 load and 1 points redemption (");
      expect(first.out).to.match(/settlement day \d{4}-\d{2}-\d{2} \(open\): 4 purchases, 1 load\n/);
      for (const shop of ["demo-shop", "server-shop", "client-shop", "merchant-shop"])
        expect(first.out).to.match(new RegExp(`merchant\\s+${shop}\\s+EUR 2\\.50`));
      expect(first.out).to.contain("audit clean");
      expect(first.out).to.not.contain("FAILED");
      // A second run over the same data adds its own purchases to the same day and is clean again.
      const second = await once();
      expect(second.code, second.out).to.equal(0);
      const dayOf = (out: string) => /settlement day (\S+)/.exec(out)?.[1];
      // Unless midnight (UTC) came between the runs.
      if (dayOf(first.out) === dayOf(second.out)) expect(second.out).to.match(/\): 8 purchases, 2 loads/);
      expect(second.out).to.contain("audit clean");
      console.log(`      npm start -- --once: first run ${first.ms} ms (with the demo data set up), second ${second.ms} ms`);
    } finally {
      await cleanup();
    }
  });
});
