// What a server address may name (lib/grpc/balancing.ts parseTarget): one
// server as always, a Unix socket, a DNS name or a list of replicas; what
// grpc-js is given for each; and the refusal, with its reason, of an address
// that names no server, also when a merchant's offer carries it.

import { expect } from "chai";
import { Status } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { payOffer, type PurchaseContext } from "../../client/purchase.js";
import { grpcTarget, InvalidTarget, parseTarget, replicasServiceConfig, tlsNameOf } from "../../lib/grpc/balancing.js";
import { NetpurseError } from "../../lib/grpc/errors.js";

const refusal = (address: string): string => {
  try {
    parseTarget(address);
  } catch (e) {
    expect(e, address).to.be.instanceOf(InvalidTarget);
    return (e as Error).message;
  }
  throw new Error(`${address} was taken`);
};

describe("unit: server addresses (targets) and what grpc-js is given", () => {
  it("passes one HOST:PORT on unchanged, as before", () => {
    for (const a of ["127.0.0.1:7420", "localhost:7420", "payments.example:7420", "[::1]:7420"]) {
      expect(parseTarget(a)).to.deep.equal({ kind: "address", address: a });
      expect(grpcTarget(parseTarget(a))).to.equal(a);
    }
  });

  it("takes a Unix socket, made absolute, as unix:///PATH", () => {
    const t = parseTarget("unix:/run/netpurse/daemon.sock");
    expect(t).to.deep.equal({ kind: "unix", path: "/run/netpurse/daemon.sock" });
    expect(grpcTarget(t)).to.equal("unix:///run/netpurse/daemon.sock");
    expect(grpcTarget(parseTarget("unix:///run/d.sock"))).to.equal("unix:///run/d.sock");
  });

  it("takes a list of IP:PORT (localhost as 127.0.0.1, IPv6 in brackets) as grpc-js's ipv4:/ipv6: list", () => {
    const t = parseTarget("127.0.0.1:7420, localhost:7421,10.0.0.7:7420");
    expect(t).to.deep.equal({
      kind: "list",
      family: "ipv4",
      backends: [
        { host: "127.0.0.1", port: 7420 },
        { host: "127.0.0.1", port: 7421 },
        { host: "10.0.0.7", port: 7420 },
      ],
    });
    expect(grpcTarget(t)).to.equal("ipv4:127.0.0.1:7420,127.0.0.1:7421,10.0.0.7:7420");
    expect(grpcTarget(parseTarget("[::1]:7420,[2001:db8::7]:7420"))).to.equal("ipv6:[::1]:7420,[2001:db8::7]:7420");
    expect(grpcTarget(parseTarget("ipv4:10.0.0.7:7420"))).to.equal("ipv4:10.0.0.7:7420");
    expect(grpcTarget(parseTarget("ipv6:[2001:db8::7]:7420,[::1]:7421"))).to.equal("ipv6:[2001:db8::7]:7420,[::1]:7421");
  });

  it("takes a DNS name as dns:///NAME:PORT, also written dns:NAME:PORT", () => {
    expect(parseTarget("dns:///payments.example:7420")).to.deep.equal({ kind: "dns", host: "payments.example", port: 7420 });
    expect(grpcTarget(parseTarget("dns:payments.example:7420"))).to.equal("dns:///payments.example:7420");
    expect(grpcTarget(parseTarget("dns:///[::1]:7420"))).to.equal("dns:///[::1]:7420");
  });

  it("refuses what names no server, saying what is wrong", () => {
    expect(refusal("10.0.0.7:7420,payments.example:7420")).to.match(/payments\.example is not an IP address.*dns:\/\/\/NAME:PORT/);
    expect(refusal("10.0.0.7:7420,[::1]:7420")).to.match(/IPv4 or IPv6 addresses, not both/);
    expect(refusal("10.0.0.7:7420,10.0.0.7:7420")).to.match(/10\.0\.0\.7:7420 is listed twice/);
    expect(refusal("10.0.0.7:7420,,10.0.0.8:7420")).to.match(/an empty entry/);
    expect(refusal("10.0.0.7,10.0.0.8:7420")).to.match(/"10\.0\.0\.7" is not HOST:PORT/);
    expect(refusal("10.0.0.7:0,10.0.0.8:7420")).to.match(/the port must be 1\.\.65535, not "0"/);
    expect(refusal("10.0.0.7:70000,10.0.0.8:7420")).to.match(/the port must be 1\.\.65535/);
    expect(refusal("::1:7420,::1:7421")).to.match(/IPv6 address goes in brackets/);
    expect(refusal("ipv4:[::1]:7420")).to.match(/::1 is not an IPv4 address/);
    expect(refusal("ipv6:10.0.0.7:7420")).to.match(/10\.0\.0\.7 is not an IPv6 address/);
    expect(refusal("dns:///payments.example")).to.match(/is not HOST:PORT/);
    expect(refusal("dns:///payments.example:")).to.match(/the port must be 1\.\.65535, not ""/);
    expect(refusal("dns://8.8.8.8/payments.example:7420")).to.match(/a DNS server of its own .* is not supported/);
  });

  it("names each replica for TLS by its address, localhost on loopback", () => {
    expect(tlsNameOf("127.0.0.1")).to.equal("localhost");
    expect(tlsNameOf("::1")).to.equal("localhost");
    expect(tlsNameOf("127.0.0.2")).to.equal("127.0.0.2");
    expect(tlsNameOf("10.0.0.7")).to.equal("10.0.0.7");
  });

  it("balances with round_robin under the health-checking policy, naming backends by address for a list only", () => {
    const list = JSON.parse(replicasServiceConfig({ kind: "list", family: "ipv4", backends: [{ host: "10.0.0.7", port: 7420 }] }, "")) as unknown;
    expect(list).to.deep.equal({
      loadBalancingConfig: [{ netpurse_replicas: { healthCheckConfig: { serviceName: "" }, nameBackendsByAddress: true, childPolicy: [{ round_robin: {} }] } }],
    });
    const dns = JSON.parse(replicasServiceConfig({ kind: "dns", host: "payments.example", port: 7420 }, "")) as {
      loadBalancingConfig: { netpurse_replicas: { nameBackendsByAddress: boolean } }[];
    };
    expect(dns.loadBalancingConfig.map((c) => c.netpurse_replicas.nameBackendsByAddress)).to.deep.equal([false]);
  });
});

describe("unit: an offer whose payment server address names no server", () => {
  /** A context whose every use fails the test: the offer must be refused before the card or any server is touched. */
  const untouched = new Proxy({} as PurchaseContext, {
    get: (_t, key) => {
      if (key === "now" || key === "then") return undefined;
      throw new Error(`the purchase touched ctx.${String(key)}`);
    },
  });
  const offer = (paymentServerAddress: string): PaymentOffer => ({
    transactionId: { value: "0b7e4f3a-2c1d-4e5f-8a9b-0c1d2e3f4a5b" },
    merchantId: { value: "demo-shop" },
    merchantName: "Demo shop",
    amount: { amountMinor: 500n, currency: 978, exponent: 2 },
    description: "an e-book",
    paymentServerAddress,
    merchantAddress: "127.0.0.1:7410",
    confirmationMode: 1,
    expiresAt: new Date(Date.now() + 60_000),
    keyNonce: Buffer.alloc(16),
    transactionSessionKey: Buffer.alloc(32),
    encryptedSessionKey: undefined,
  });

  it("is refused INVALID_ARGUMENT, reason INVALID_FIELD, field offer.payment_server_address, before the card is touched", async () => {
    const e = await payOffer(offer("10.0.0.7:7420,payments.example:7420"), untouched).then(
      () => undefined,
      (x: unknown) => x,
    );
    expect(e).to.be.instanceOf(NetpurseError);
    const n = e as NetpurseError;
    expect(n.code).to.equal(Status.INVALID_ARGUMENT);
    expect(n.reason).to.equal(ErrorReason.ERROR_REASON_INVALID_FIELD);
    expect(n.details).to.match(/^offer\.payment_server_address: 10\.0\.0\.7:7420,payments\.example:7420: payments\.example is not an IP address/);
  });

  it("refuses an offer that would have the daemon connect to a local socket or to more than 8 addresses", async () => {
    const refusal = async (address: string) => {
      const e = await payOffer(offer(address), untouched).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e, address).to.be.instanceOf(NetpurseError);
      return (e as NetpurseError).details;
    };
    expect(await refusal("unix:/run/something.sock")).to.match(/^offer\.payment_server_address: a Unix socket is no payment server's address/);
    const many = Array.from({ length: 1000 }, (_, i) => `10.0.${i >> 8}.${i & 255}:7420`).join(",");
    expect(await refusal(many)).to.match(/^offer\.payment_server_address: lists 1000 addresses; at most 8 payment server replicas/);
    // Eight is fine as far as the address goes: the offer is refused later, for its missing session key, not its address.
    const eight = Array.from({ length: 8 }, (_, i) => `10.0.0.${i + 1}:7420`).join(",");
    expect(await refusal(eight)).to.match(/^offer\.encrypted_session_key: missing/);
  });
});
