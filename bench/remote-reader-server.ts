// The remote reader server process of the benchmark's chatty baseline:
// started by the Launcher like any netpurse service, on the same server
// bootstrap.

import { createLogger } from "../lib/log.js";
import { service, startGrpcServer } from "../lib/grpc/server.js";
import { intOpt, opt, runService } from "../lib/service-main.js";
import { RemoteReader, RemoteReaderDefinition } from "./remote-reader.js";

await runService({
  program: "netpurse-bench-remote-reader",
  summary: "Benchmark baseline: a server holding PSAMs that drives each cardholder's card one APDU per round trip.",
  options: { listen: { type: "string" }, psams: { type: "string" }, "amount-minor": { type: "string" }, merchant: { type: "string" } },
  help: [
    "  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)",
    "  --psams DIR              folder of software PSAM files (*.psam.json), one slot each",
    "  --amount-minor N         what each purchase costs, in the PSAMs' currency's minor unit (default 99)",
    "  --merchant ID            merchant id the PSAMs sign for (default demo-shop)",
  ].join("\n"),
  start: async (v) => {
    const psams = opt(v, "psams", "");
    if (!psams) throw new Error("--psams DIR is required");
    const reader = await RemoteReader.open(psams, { amountMinor: intOpt(v, "amount-minor", 99), merchantId: opt(v, "merchant", "demo-shop") });
    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [service(RemoteReaderDefinition, reader.service, { all: "public" })],
      transport: { local: true }, // a baseline on loopback
      log: createLogger("netpurse-bench-remote-reader"),
    });
    return { address: server.address, close: () => server.shutdown() };
  },
});
