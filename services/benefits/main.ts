import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { DATABASE_HELP, DATABASE_OPTIONS, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity, storeConfig } from "../../lib/service-main.js";
import { ORDER_HELP, ORDER_OPTIONS, orderSettings } from "../merchant/server.js";
import { startBenefits } from "./server.js";
import { BENEFITS_DB, readSite } from "./site.js";

await runService({
  program: "netpurse-benefits",
  summary:
    "Benefits site of a loyalty programme: sells its rewards for points or a card's authentication (MerchantService), grants points to enrolled merchants' buyers and signs their credit to the card (BenefitsService).",
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
    `  --listen HOST:PORT         address to serve on (default ${defaultAddress("benefits")})`,
    "  --data DIR                 netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --id SITE                  the site's merchant id; its folder is DATA/benefits/SITE (default skyways)",
    "  --dir DIR                  the site's folder instead: site.json (programme, rewards, enrolled merchants, members),",
    "                             programme-hsm.json (the programme's security module) and benefits.db",
    `  --validation HOST:PORT     merchant validation service (default ${defaultAddress("merchantValidation")})`,
    `  --payment-server HOST:PORT payment server named in offers (default ${defaultAddress("payment")})`,
    "  --advertise HOST:PORT      this server's address named in offers and grants (default: the bound address)",
    ORDER_HELP,
    DATABASE_HELP,
    "                             (on PostgreSQL the site's tables are in schema benefits_SITE: its merchant id, lower-cased)",
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "benefits", opt(v, "id", "skyways")));
    const { merchantId } = await readSite(dir);
    return startBenefits({
      // The site is a merchant at the payment operator: one identity for its offers, its validation calls and its server.
      security: await serviceSecurity(v, { kind: "merchant", id: merchantId }),
      listen: opt(v, "listen", defaultAddress("benefits")),
      dir,
      store: storeConfig(v, join(dir, BENEFITS_DB)),
      validation: opt(v, "validation", defaultAddress("merchantValidation")),
      paymentServer: opt(v, "payment-server", defaultAddress("payment")),
      ...(typeof v.advertise === "string" ? { advertise: v.advertise } : {}),
      ...orderSettings(v),
    });
  },
});
