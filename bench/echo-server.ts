// The echo server process of the benchmark's baseline: started by the
// Launcher like any netpurse service, on the same server bootstrap.

import { createLogger } from "../lib/log.js";
import { service, startGrpcServer } from "../lib/grpc/server.js";
import { Security } from "../lib/pki/security.js";
import { opt, runService } from "../lib/service-main.js";
import { ECHO_IDENTITY, EchoDefinition, echoImplementation } from "./echo-service.js";

await runService({
  program: "netpurse-bench-echo",
  summary: "Benchmark baseline: a unary gRPC echo of raw bytes on netpurse's server bootstrap.",
  options: { listen: { type: "string" }, pki: { type: "string" } },
  help: [
    "  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)",
    `  --pki DIR                serve TLS as ${ECHO_IDENTITY.kind}/${ECHO_IDENTITY.id} with that folder's key and certificate, asking`,
    "                           for client certificates as every netpurse server does (default: plaintext on loopback)",
  ].join("\n"),
  start: async (v) => {
    const pki = typeof v.pki === "string" ? v.pki : undefined;
    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [service(EchoDefinition, echoImplementation, { all: "public" })],
      // A baseline on loopback, plaintext or with the TLS of netpurse's servers.
      transport: pki ? (await Security.forService(pki, ECHO_IDENTITY)).server("request") : { local: true },
      log: createLogger("netpurse-bench-echo"),
    });
    return { address: server.address, close: () => server.shutdown() };
  },
});
