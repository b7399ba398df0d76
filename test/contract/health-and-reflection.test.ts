// Every netpurse server serves grpc.health.v1 and server reflection, so that
// grpcurl and `buf curl` list and call every RPC without .proto files. This
// drives the real buf CLI against each server, over TLS as an operator would
// (--cacert, --cert, --key), and plaintext over its Unix socket for the
// cardholder's daemon (--unix-socket), as the README shows.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { pkiPaths } from "../../lib/pki/authority.js";
import { DEMO_SITE } from "../../services/benefits/site.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";
import { copyFile } from "node:fs/promises";
import { join } from "node:path";
import { startPaymentServer } from "../../services/payment/server.js";
import { VERDICT_KEY_FILE } from "../../services/payment/security-module.js";
import { tempDir } from "../support/fixtures.js";

const run = promisify(execFile);
const BUF = new URL("../../node_modules/.bin/buf", import.meta.url).pathname;
let tls: string[] = [];
const curl = (...args: string[]) => run(BUF, ["curl", "--protocol", "grpc", ...args], { timeout: 20_000 });
/**
 * How buf curl reaches a server: over TLS with the operator's certificate; or, for the daemon (unix:PATH),
 * plaintext over its socket (--unix-socket), where the URL's host names nothing but the :authority.
 */
const reach = (address: string) =>
  address.startsWith("unix:")
    ? { flags: ["--http2-prior-knowledge", "--unix-socket", address.slice("unix:".length)], url: "http://localhost" }
    : { flags: tls, url: `https://${address}` };

describe("contract: health and reflection on every server (buf curl)", function () {
  this.timeout(120_000);
  let net: Network;
  before(async () => {
    // With the demo loyalty programme: its benefits site is a server like the others.
    net = await startNetwork({ loyalty: {} });
    await net.security.of("operator", "operator");
    const p = pkiPaths(net.security.dir);
    tls = ["--cacert", p.caCert, "--cert", p.cert({ kind: "operator", id: "operator" }), "--key", p.key({ kind: "operator", id: "operator" })];
  });
  after(async () => net?.close());

  const servers = (): [string, string, string[]][] => [
    ["payment", net.payment.address, ["ProcessDrawRequest", "CompletePurchase", "ReportCardSignature", "GetPurchase"]],
    ["concentrator", net.concentrator.address, ["AttachTerminal", "ConnectPaymentServer", "ListTerminals"]],
    ["merchant", net.merchant.address, ["ListProducts", "CreateOrder", "CompleteOrder", "GetOrder"]],
    ["merchant validation", net.validation.address, ["IssueTransactionKeys", "ValidateConfirmation"]],
    ["client daemon", net.daemon.address, ["GetCard", "ListCardTransactions", "PayOffer", "LoadCard", "SyncCard"]],
    ["bank", net.bank.address, ["CreateLoadOffer", "ConfirmLoad", "GetAccount"]],
    ["load", net.load.address, ["ProcessLoadRequest", "CompleteLoad", "ReportCardHistory", "GetLoad"]],
    [
      "benefits site",
      site(),
      [
        ...["ListRewards", "GrantPoints", "IssuePointsCredit", "ConfirmPointsCredit"].map((rpc) => `netpurse.benefits.v1.BenefitsService/${rpc}`),
        ...["ListProducts", "CreateOrder", "CompleteOrder", "GetOrder"].map((rpc) => `netpurse.merchant.v1.MerchantService/${rpc}`),
      ],
    ],
  ];
  /** The demo programme's benefits site: one port for its MerchantService (its rewards) and its BenefitsService. */
  const site = () => net.sites[DEMO_SITE.merchantId]?.server.address ?? "no benefits site";

  it("lists every RPC of every server through reflection", async () => {
    for (const [name, address, rpcs] of servers()) {
      const { flags, url } = reach(address);
      const { stdout } = await curl(...flags, "--list-methods", url);
      // An RPC by its name, or by its service's full name where one port serves two services.
      for (const rpc of rpcs) expect(stdout, name).to.contain(rpc.includes("/") ? rpc : `/${rpc}`);
      expect(stdout, name).to.contain("grpc.health.v1.Health/Check");
    }
  });

  it("answers SERVING to health checks, overall and per service", async () => {
    for (const [name, address] of servers()) {
      const { flags, url } = reach(address);
      const { stdout } = await curl(...flags, `${url}/grpc.health.v1.Health/Check`);
      expect(JSON.parse(stdout), name).to.deep.equal({ status: "SERVING" });
    }
    const { stdout } = await curl(
      ...tls,
      "-d",
      '{"service":"netpurse.payment.v1.PaymentService"}',
      `https://${net.payment.address}/grpc.health.v1.Health/Check`,
    );
    expect(JSON.parse(stdout)).to.deep.equal({ status: "SERVING" });
    for (const name of ["netpurse.benefits.v1.BenefitsService", "netpurse.merchant.v1.MerchantService"]) {
      const { stdout: one } = await curl(...tls, "-d", JSON.stringify({ service: name }), `https://${site()}/grpc.health.v1.Health/Check`);
      expect(JSON.parse(one), name).to.deep.equal({ status: "SERVING" });
    }
  });

  it("a payment server linked to no concentrator answers NOT_SERVING, so that callers balancing over replicas skip it", async () => {
    const { dir, cleanup } = await tempDir();
    await copyFile(join(net.paths.payment, VERDICT_KEY_FILE), join(dir, VERDICT_KEY_FILE));
    const lonely = await startPaymentServer({
      security: await net.security.of("payment", "payment-1"),
      listen: "127.0.0.1:0",
      dir,
      concentrator: "127.0.0.1:1", // nothing listens there
    });
    try {
      const check = async (service = "") =>
        (
          JSON.parse((await curl(...tls, "-d", JSON.stringify({ service }), `https://${lonely.address}/grpc.health.v1.Health/Check`)).stdout) as {
            status: string;
          }
        ).status;
      // After the grace a stream being re-made gets (3 s), checked every second.
      await waitFor(async () => (await check()) === "NOT_SERVING", 8_000, "NOT_SERVING");
      expect(await check("netpurse.payment.v1.PaymentService")).to.equal("NOT_SERVING");
      // The network's own payment server, linked to its concentrator, serves.
      const { stdout } = await curl(...tls, `https://${net.payment.address}/grpc.health.v1.Health/Check`);
      expect(JSON.parse(stdout)).to.deep.equal({ status: "SERVING" });
    } finally {
      await lonely.close();
      await cleanup();
    }
  });

  it("calls an RPC from JSON, and shows a precise error for bad input", async () => {
    const { stdout } = await curl(...tls, "-d", '{"product_id":"song-1"}', `https://${net.merchant.address}/netpurse.merchant.v1.MerchantService/CreateOrder`);
    const { offer } = JSON.parse(stdout) as { offer: { amount: unknown } };
    expect(offer.amount).to.deep.equal({ amountMinor: "99", currency: 978, exponent: 2 });
    const bad = await curl(
      ...tls,
      "-d",
      '{"transaction_id":{"value":"nope"}}',
      `https://${net.payment.address}/netpurse.payment.v1.PaymentService/ProcessDrawRequest`,
    ).catch((e: { stderr: string }) => e);
    expect(bad.stderr).to.contain("invalid_argument");
    expect(bad.stderr).to.contain("transaction_id");
    const { stdout: account } = await curl(
      ...tls,
      "-d",
      '{"account_id":"nobody"}',
      `https://${net.bank.address}/netpurse.bank.v1.BankService/GetAccount`,
    ).catch((e: { stderr: string }) => ({ stdout: e.stderr }));
    // The bank reads an account only for its holder: without an access token, UNAUTHENTICATED.
    expect(account).to.contain("unauthenticated");
  });

  it("reads the card through the cardholder's daemon over its Unix socket, as the README shows", async () => {
    const { stdout } = await curl(
      "--http2-prior-knowledge",
      "--unix-socket",
      net.daemon.address.slice("unix:".length),
      "http://localhost/netpurse.cardholder.v1.CardholderService/GetCard",
    );
    const { purse } = JSON.parse(stdout) as { purse: { balance: unknown } };
    expect(purse.balance).to.deep.equal({ amountMinor: "10000", currency: 978, exponent: 2 });
  });
});
