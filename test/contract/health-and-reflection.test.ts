// Every netpurse server serves grpc.health.v1 and server reflection, so that
// grpcurl and `buf curl` list and call every RPC without .proto files. This
// drives the real buf CLI against each server.

import { expect } from "chai";
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { startNetwork, type Network } from "../support/network.js";

const run = promisify(execFile);
const BUF = new URL("../../node_modules/.bin/buf", import.meta.url).pathname;
const curl = (...args: string[]) => run(BUF, ["curl", "--protocol", "grpc", "--http2-prior-knowledge", ...args], { timeout: 20_000 });

describe("contract: health and reflection on every server (buf curl)", function () {
  this.timeout(120_000);
  let net: Network;
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

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
      const { stdout } = await curl("--list-methods", `http://${address}`);
      for (const rpc of rpcs) expect(stdout, name).to.contain(`/${rpc}`);
      expect(stdout, name).to.contain("grpc.health.v1.Health/Check");
    }
  });

  it("answers SERVING to health checks, overall and per service", async () => {
    for (const [name, address] of servers()) {
      const { stdout } = await curl(`http://${address}/grpc.health.v1.Health/Check`);
      expect(JSON.parse(stdout), name).to.deep.equal({ status: "SERVING" });
    }
    const { stdout } = await curl("-d", '{"service":"netpurse.payment.v1.PaymentService"}', `http://${net.payment.address}/grpc.health.v1.Health/Check`);
    expect(JSON.parse(stdout)).to.deep.equal({ status: "SERVING" });
  });

  it("calls an RPC from JSON, and shows a precise error for bad input", async () => {
    const { stdout } = await curl("-d", '{"product_id":"song-1"}', `http://${net.merchant.address}/netpurse.merchant.v1.MerchantService/CreateOrder`);
    const { offer } = JSON.parse(stdout) as { offer: { amount: unknown } };
    expect(offer.amount).to.deep.equal({ amountMinor: "99", currency: 978, exponent: 2 });
    const bad = await curl(
      "-d",
      '{"transaction_id":{"value":"nope"}}',
      `http://${net.payment.address}/netpurse.payment.v1.PaymentService/ProcessDrawRequest`,
    ).catch((e: { stderr: string }) => e);
    expect(bad.stderr).to.contain("invalid_argument");
    expect(bad.stderr).to.contain("transaction_id");
    const { stdout: account } = await curl("-d", '{"account_id":"nobody"}', `http://${net.bank.address}/netpurse.bank.v1.BankService/GetAccount`).catch(
      (e: { stderr: string }) => ({ stdout: e.stderr }),
    );
    expect(account).to.contain("not_found");
  });
});
