import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { intOpt, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity } from "../../lib/service-main.js";
import { CONCENTRATOR_DEFAULTS as D, startConcentrator } from "./server.js";

await runService({
  program: "netpurse-concentrator",
  summary: "Terminal concentrator: terminal hosts with PSAMs attach here; payment servers send PSAM jobs through it.",
  options: {
    listen: { type: "string" },
    id: { type: "string" },
    data: { type: "string" },
    "psam-registry": { type: "string" },
    "keepalive-ms": { type: "string" },
    "ps-window": { type: "string" },
    "max-lease-ms": { type: "string" },
    "max-leases": { type: "string" },
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("concentrator")})`,
    "  --id NAME                concentrator id (default concentrator-1)",
    "  --psam-registry FILE     the issuer's PSAM registry (default DATA/concentrator/psams.json)",
    `  --keepalive-ms N         ping interval on every stream (default ${D.keepaliveIntervalMs})`,
    `  --ps-window N            most jobs in flight per payment server (default ${D.paymentServerWindow})`,
    `  --max-lease-ms N         a PSAM lease held longer is taken back (default ${D.maxLeaseMs})`,
    `  --max-leases N           most PSAMs one payment server (its replicas together) holds at once, besides its fair share
                           (default ${D.maxLeasesPerPaymentServer})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) =>
    startConcentrator({
      security: await serviceSecurity(v, { kind: "concentrator", id: opt(v, "id", "concentrator-1") }),
      psamRegistry: opt(v, "psam-registry", join(dataDir(v.data as string | undefined), "concentrator", "psams.json")),
      maxLeaseMs: intOpt(v, "max-lease-ms", D.maxLeaseMs),
      maxLeasesPerPaymentServer: intOpt(v, "max-leases", D.maxLeasesPerPaymentServer),
      listen: opt(v, "listen", defaultAddress("concentrator")),
      concentratorId: opt(v, "id", "concentrator-1"),
      keepaliveIntervalMs: intOpt(v, "keepalive-ms", D.keepaliveIntervalMs),
      paymentServerWindow: intOpt(v, "ps-window", D.paymentServerWindow),
    }),
});
