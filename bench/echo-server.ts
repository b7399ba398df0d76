// The echo server process of the benchmark's baseline: started by the
// Launcher like any netpurse service, on the same server bootstrap.

import { createLogger } from "../lib/log.js";
import { service, startGrpcServer } from "../lib/grpc/server.js";
import { opt, runService } from "../lib/service-main.js";
import { EchoDefinition, echoImplementation } from "./echo-service.js";

await runService({
  program: "netpurse-bench-echo",
  summary: "Benchmark baseline: a unary gRPC echo of raw bytes on netpurse's server bootstrap.",
  options: { listen: { type: "string" } },
  help: "  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)",
  start: async (v) => {
    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [service(EchoDefinition, echoImplementation, { all: "public" })],
      transport: { local: true }, // a baseline on loopback
      log: createLogger("netpurse-bench-echo"),
    });
    return { address: server.address, close: () => server.shutdown() };
  },
});
