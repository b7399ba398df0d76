import { defaultAddress } from "../../lib/config.js";
import { intOpt, opt, runService } from "../../lib/service-main.js";
import { startConcentrator } from "./server.js";

await runService({
  program: "netpurse-concentrator",
  summary: "Terminal concentrator: terminal hosts with PSAMs attach here; payment servers send PSAM jobs through it.",
  options: { listen: { type: "string" }, id: { type: "string" }, "keepalive-ms": { type: "string" }, "ps-window": { type: "string" } },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("concentrator")})`,
    "  --id NAME                concentrator id (default concentrator-1)",
    "  --keepalive-ms N         ping interval on every stream (default 10000)",
    "  --ps-window N            most jobs in flight per payment server (default 1024)",
  ].join("\n"),
  start: (v) =>
    startConcentrator({
      listen: opt(v, "listen", defaultAddress("concentrator")),
      concentratorId: opt(v, "id", "concentrator-1"),
      keepaliveIntervalMs: intOpt(v, "keepalive-ms", 10_000),
      paymentServerWindow: intOpt(v, "ps-window", 1024),
    }),
});
