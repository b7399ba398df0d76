// Every netpurse server serves grpc.health.v1 and server reflection, so that
// grpcurl and `buf curl` list and call every RPC without .proto files. This
// drives the real buf CLI against each server, over TLS as an operator would
// (--cacert, --cert, --key), and plaintext for the cardholder's loopback daemon.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { pkiPaths } from "../../lib/pki/authority.js";
import { startNetwork, type Network } from "../support/network.js";

const run = promisify(execFile);
const BUF = new URL("../../node_modules/.bin/buf", import.meta.url).pathname;
let tls: string[] = [];
/** buf curl over TLS with the operator's certificate, or plaintext for an http:// URL (the daemon on loopback). */
const curl = (...args: string[]) => {
  const plain = args.some((a) => a.startsWith("http://"));
  return run(BUF, ["curl", "--protocol", "grpc", ...(plain ? ["--http2-prior-knowledge"] : tls), ...args], { timeout: 20_000 });
};

describe("contract: health and reflection on every server (buf curl)", function () {
  this.timeout(120_000);
  let net: Network;
  before(async () => {
    net = await startNetwork();
    await net.security.of("operator", "operator");
    const p = pkiPaths(net.security.dir);
    tls = ["--cacert", p.caCert, "--cert", p.cert({ kind: "operator", id: "operator" }), "--key", p.key({ kind: "operator", id: "operator" })];
  });
  after(async () => net?.close());

  /** Every server speaks TLS but the cardholder's daemon, on loopback. */
  const url = (address: string) => `${address === net.daemon.address ? "http" : "https"}://${address}`;

  const servers = (): [string, string, string[]][] => [
    ["payment", net.payment.address, ["ProcessDrawRequest", "CompletePurchase", "ReportCardSignature", "GetPurchase"]],
    ["concentrator", net.concentrator.address, ["AttachTerminal", "ConnectPaymentServer", "ListTerminals"]],
    ["merchant", net.merchant.address, ["ListProducts", "CreateOrder", "CompleteOrder", "GetOrder"]],
    ["merchant validation", net.validation.address, ["IssueTransactionKeys", "ValidateConfirmation"]],
    ["client daemon", net.daemon.address, ["GetCard", "ListCardTransactions", "PayOffer", "LoadCard", "SyncCard"]],
    ["bank", net.bank.address, ["CreateLoadOffer", "ConfirmLoad", "GetAccount"]],
    ["load", net.load.address, ["ProcessLoadRequest", "CompleteLoad", "ReportCardHistory", "GetLoad"]],
  ];

  it("lists every RPC of every server through reflection", async () => {
    for (const [name, address, rpcs] of servers()) {
      const { stdout } = await curl("--list-methods", `${url(address)}`);
      for (const rpc of rpcs) expect(stdout, name).to.contain(`/${rpc}`);
      expect(stdout, name).to.contain("grpc.health.v1.Health/Check");
    }
  });

  it("answers SERVING to health checks, overall and per service", async () => {
    for (const [name, address] of servers()) {
      const { stdout } = await curl(`${url(address)}/grpc.health.v1.Health/Check`);
      expect(JSON.parse(stdout), name).to.deep.equal({ status: "SERVING" });
    }
    const { stdout } = await curl("-d", '{"service":"netpurse.payment.v1.PaymentService"}', `https://${net.payment.address}/grpc.health.v1.Health/Check`);
    expect(JSON.parse(stdout)).to.deep.equal({ status: "SERVING" });
  });

  it("calls an RPC from JSON, and shows a precise error for bad input", async () => {
    const { stdout } = await curl("-d", '{"product_id":"song-1"}', `https://${net.merchant.address}/netpurse.merchant.v1.MerchantService/CreateOrder`);
    const { offer } = JSON.parse(stdout) as { offer: { amount: unknown } };
    expect(offer.amount).to.deep.equal({ amountMinor: "99", currency: 978, exponent: 2 });
    const bad = await curl(
      "-d",
      '{"transaction_id":{"value":"nope"}}',
      `https://${net.payment.address}/netpurse.payment.v1.PaymentService/ProcessDrawRequest`,
    ).catch((e: { stderr: string }) => e);
    expect(bad.stderr).to.contain("invalid_argument");
    expect(bad.stderr).to.contain("transaction_id");
    const { stdout: account } = await curl("-d", '{"account_id":"nobody"}', `https://${net.bank.address}/netpurse.bank.v1.BankService/GetAccount`).catch(
      (e: { stderr: string }) => ({ stdout: e.stderr }),
    );
    expect(account).to.contain("not_found");
  });
});
