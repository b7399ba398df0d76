import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { DATABASE_HELP, DATABASE_OPTIONS, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity, storeConfig } from "../../lib/service-main.js";
import { startMerchantValidation } from "./server.js";

await runService({
  program: "netpurse-merchant-validation",
  summary: "Merchant validation: checks payment confirmations with the keys merchants share with the payment operator.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    id: { type: "string" },
    "payment-server": { type: "string" },
    ...DATABASE_OPTIONS,
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT       address to serve on (default ${defaultAddress("merchantValidation")})`,
    "  --data DIR               netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --dir DIR                this service's folder (default DATA/merchant-validation): keys.json, validation.db",
    `  --payment-server HOST:PORT where card proofs are reported (default ${defaultAddress("payment")}); or the payment
                           server's replicas, balanced and health-checked: a list IP:PORT,IP:PORT,… or dns:///NAME:PORT`,
    "  --id NAME                this service's identity (default validation-1)",
    DATABASE_HELP,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "merchant-validation"));
    return startMerchantValidation({
      security: await serviceSecurity(v, { kind: "validation", id: opt(v, "id", "validation-1") }),
      listen: opt(v, "listen", defaultAddress("merchantValidation")),
      dir,
      store: storeConfig(v, join(dir, "validation.db")),
      paymentServer: opt(v, "payment-server", defaultAddress("payment")),
    });
  },
});
