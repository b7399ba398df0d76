import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { intOpt, opt, runService } from "../../lib/service-main.js";
import { startMerchant } from "./server.js";

await runService({
  program: "netpurse-merchant",
  summary: "Merchant server of a demo shop of digital goods: creates orders and payment offers, releases goods against validated confirmations.",
  options: {
    listen: { type: "string" },
    data: { type: "string" },
    dir: { type: "string" },
    id: { type: "string" },
    validation: { type: "string" },
    "payment-server": { type: "string" },
    advertise: { type: "string" },
    "offer-ttl-ms": { type: "string" },
  },
  help: [
    `  --listen HOST:PORT         address to serve on (default ${defaultAddress("merchant")})`,
    "  --data DIR                 netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --id MERCHANT              merchant id; its folder is DATA/merchants/MERCHANT (default demo-shop)",
    "  --dir DIR                  the merchant's folder instead: shop.json (catalogue) and merchant.db",
    `  --validation HOST:PORT     merchant validation service (default ${defaultAddress("merchantValidation")})`,
    `  --payment-server HOST:PORT payment server named in offers (default ${defaultAddress("payment")})`,
    "  --advertise HOST:PORT      this server's address named in offers (default: the bound address)",
    "  --offer-ttl-ms N           how long an offer stays payable (default 900000)",
  ].join("\n"),
  start: (v) =>
    startMerchant({
      listen: opt(v, "listen", defaultAddress("merchant")),
      dir: opt(v, "dir", join(dataDir(v.data as string | undefined), "merchants", opt(v, "id", "demo-shop"))),
      validation: opt(v, "validation", defaultAddress("merchantValidation")),
      paymentServer: opt(v, "payment-server", defaultAddress("payment")),
      ...(typeof v.advertise === "string" ? { advertise: v.advertise } : {}),
      offerTtlMs: intOpt(v, "offer-ttl-ms", 15 * 60_000),
    }),
});
