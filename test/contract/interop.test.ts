// The gRPC ecosystem's own conventions, checked from a client that uses no
// netpurse code: plain @grpc/grpc-js with the services loaded from the
// descriptor set, status details decoded with protobufjs from the
// google.rpc wire format. Errors carry google.rpc.Status details (ErrorInfo,
// BadRequest, RetryInfo) and a deadline set the standard way (grpc-timeout)
// is honoured by the server.

import * as grpc from "@grpc/grpc-js";
import { loadFileDescriptorSetFromBuffer } from "@grpc/proto-loader";
import { expect } from "chai";
import { readFileSync } from "node:fs";
import protobuf from "protobufjs";
import { ProcessDrawRequestRequest } from "../../gen/netpurse/payment/v1/payment.js";
import { pkiPaths } from "../../lib/pki/authority.js";
import { drawRequestFor, openCard } from "../support/card-client.js";
import { startNetwork, type Network } from "../support/network.js";

// The google.rpc messages as they travel (field numbers of google/rpc/status.proto and error_details.proto).
const RPC = protobuf.parse(`
  syntax = "proto3";
  package google.rpc;
  message Any { string type_url = 1; bytes value = 2; }
  message Status { int32 code = 1; string message = 2; repeated Any details = 3; }
  message ErrorInfo { string reason = 1; string domain = 2; map<string, string> metadata = 3; }
  message FieldViolation { string field = 1; string description = 2; }
  message BadRequest { repeated FieldViolation field_violations = 1; }
  message Duration { int64 seconds = 1; int32 nanos = 2; }
  message RetryInfo { Duration retry_delay = 1; }
`).root;

interface Details {
  code: number;
  errorInfo?: { reason: string; domain: string };
  badRequest?: { fieldViolations: { field: string; description: string }[] };
  retryInfo?: { retryDelay: { seconds: number; nanos: number } };
}

/** Reads google.rpc.Status from the grpc-status-details-bin trailer of a failed call. */
function details(e: grpc.ServiceError): Details {
  const bin = e.metadata.get("grpc-status-details-bin")[0];
  if (!Buffer.isBuffer(bin)) throw new Error("no grpc-status-details-bin in the trailer");
  const status = RPC.lookupType("google.rpc.Status").toObject(RPC.lookupType("google.rpc.Status").decode(bin), { longs: Number }) as {
    code: number;
    details: { typeUrl: string; value: Buffer }[];
  };
  const out: Details = { code: status.code };
  for (const d of status.details) {
    const name = d.typeUrl.slice(d.typeUrl.lastIndexOf("/") + 1);
    const type = RPC.lookupType(name.replace("google.rpc.", ""));
    const value = type.toObject(type.decode(d.value), { longs: Number, defaults: true }) as never;
    if (name === "google.rpc.ErrorInfo") out.errorInfo = value;
    if (name === "google.rpc.BadRequest") out.badRequest = value;
    if (name === "google.rpc.RetryInfo") out.retryInfo = value;
  }
  return out;
}

type Unary = (req: unknown, md: grpc.Metadata, opts: grpc.CallOptions, cb: (e: grpc.ServiceError | null, r?: unknown) => void) => void;

describe("contract: errors and deadlines for a plain gRPC client (no netpurse code)", function () {
  this.timeout(60_000);
  let net: Network;
  let payment: grpc.Client & Record<string, Unary>;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }], holdTimeoutMs: 30_000 });
    const definition = loadFileDescriptorSetFromBuffer(readFileSync(new URL("../../gen/descriptor.binpb", import.meta.url)), { keepCase: true });
    const pkg = grpc.loadPackageDefinition(definition) as unknown as {
      netpurse: {
        payment: {
          v1: { PaymentService: new (address: string, creds: grpc.ChannelCredentials, options: grpc.ChannelOptions) => grpc.Client & Record<string, Unary> };
        };
      };
    };
    // TLS as any gRPC client does it: the installation's CA, and an operator's certificate (GetPurchase is for operators).
    await net.security.of("operator", "operator");
    const p = pkiPaths(net.security.dir);
    const op = { kind: "operator", id: "operator" } as const;
    const credentials = grpc.credentials.createSsl(readFileSync(p.caCert), readFileSync(p.key(op)), readFileSync(p.cert(op)));
    payment = new pkg.netpurse.payment.v1.PaymentService(net.payment.address, credentials, { "grpc.ssl_target_name_override": "localhost" });
  });
  after(async () => {
    payment?.close();
    await net?.close();
  });

  const call = (method: string, req: unknown, deadlineMs = 10_000) =>
    new Promise<{ error: grpc.ServiceError | null; ms: number }>((resolve) => {
      const started = Date.now();
      const fn = payment[method];
      if (!fn) throw new Error(`no method ${method}`);
      fn.call(payment, req, new grpc.Metadata(), { deadline: Date.now() + deadlineMs }, (error) => resolve({ error, ms: Date.now() - started }));
    });

  it("a malformed field: INVALID_ARGUMENT with ErrorInfo (netpurse reason and domain) and BadRequest naming the field", async () => {
    const { error } = await call("ProcessDrawRequest", { transaction_id: { value: "order-1" } });
    expect(error?.code).to.equal(grpc.status.INVALID_ARGUMENT);
    const d = details(error!);
    expect(d.code).to.equal(grpc.status.INVALID_ARGUMENT);
    expect(d.errorInfo).to.deep.include({ reason: "ERROR_REASON_INVALID_FIELD", domain: "netpurse.card.v1" });
    expect(d.badRequest?.fieldViolations[0]?.field).to.equal("transaction_id");
    expect(d.retryInfo).to.equal(undefined); // the same request again cannot succeed
  });

  it("an unknown transaction: NOT_FOUND with ErrorInfo NOT_FOUND", async () => {
    const { error } = await call("GetPurchase", { transaction_id: { value: "0b6f1c1e-8c3d-4c39-9a57-2f7d4c1d9e20" } });
    expect(error?.code).to.equal(grpc.status.NOT_FOUND);
    expect(details(error!).errorInfo?.reason).to.equal("ERROR_REASON_NOT_FOUND");
  });

  it("honours the caller's grpc-timeout: RESOURCE_EXHAUSTED with RetryInfo just before the deadline, not the server's own 10 s wait", async () => {
    const card = await openCard(net.cardPath);
    const first = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    await net.clients.payment.processDrawRequest(await drawRequestFor(card, first)); // PSAM_VERIFIES holds the only PSAM
    const second = (await net.clients.merchant.createOrder({ productId: "song-1" })).offer!;
    // The sealed request is made with the card's own tools; it travels as protobuf bytes through plain grpc-js.
    const bytes = Buffer.from(ProcessDrawRequestRequest.encode(await drawRequestFor(await openCard(net.cardPath), second)).finish());
    const started = Date.now();
    const error = await new Promise<grpc.ServiceError | null>((resolve) =>
      payment.makeUnaryRequest(
        "/netpurse.payment.v1.PaymentService/ProcessDrawRequest",
        (b: Buffer) => b,
        (b: Buffer) => b,
        bytes,
        new grpc.Metadata(),
        { deadline: Date.now() + 2_000 },
        (e) => resolve(e),
      ),
    );
    const ms = Date.now() - started;
    expect(error?.code, error?.details).to.equal(grpc.status.RESOURCE_EXHAUSTED);
    const d = details(error!);
    expect(d.errorInfo?.reason).to.equal("ERROR_REASON_NO_PSAM_FREE");
    expect(d.retryInfo?.retryDelay.seconds).to.equal(1);
    expect(ms).to.be.within(1_000, 2_000);
  });
});
