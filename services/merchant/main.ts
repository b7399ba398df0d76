import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { readJson } from "../../lib/files.js";
import { DATABASE_HELP, DATABASE_OPTIONS, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity, storeConfig } from "../../lib/service-main.js";
import type { ShopFile } from "./shop.js";
import { ORDER_HELP, ORDER_OPTIONS, orderSettings, startMerchant } from "./server.js";

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
    ...ORDER_OPTIONS,
    ...DATABASE_OPTIONS,
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT         address to serve on (default ${defaultAddress("merchant")})`,
    "  --data DIR                 netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --id MERCHANT              merchant id; its folder is DATA/merchants/MERCHANT (default demo-shop)",
    "  --dir DIR                  the merchant's folder instead: shop.json (catalogue; with `loyalty`, the programme's benefits\n                             site that grants its buyers points, docs/loyalty.md) and merchant.db",
    `  --validation HOST:PORT     merchant validation service (default ${defaultAddress("merchantValidation")})`,
    `  --payment-server HOST:PORT payment server named in offers (default ${defaultAddress("payment")}); or its replicas,
                             balanced and health-checked: a list IP:PORT,IP:PORT,… or dns:///NAME:PORT`,
    "  --advertise HOST:PORT      this server's address named in offers (default: the bound address)",
    ORDER_HELP,
    DATABASE_HELP,
    "                             (on PostgreSQL the shop's tables are in schema merchant_ID: its merchant id, lower-cased)",
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "merchants", opt(v, "id", "demo-shop")));
    const { merchantId } = await readJson<ShopFile>(join(dir, "shop.json"));
    return startMerchant({
      security: await serviceSecurity(v, { kind: "merchant", id: merchantId }),
      listen: opt(v, "listen", defaultAddress("merchant")),
      dir,
      store: storeConfig(v, join(dir, "merchant.db")),
      validation: opt(v, "validation", defaultAddress("merchantValidation")),
      paymentServer: opt(v, "payment-server", defaultAddress("payment")),
      ...(typeof v.advertise === "string" ? { advertise: v.advertise } : {}),
      ...orderSettings(v),
    });
  },
});
