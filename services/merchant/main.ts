import { join } from "node:path";
import { dataDir, defaultAddress } from "../../lib/config.js";
import { readJson } from "../../lib/files.js";
import { intOpt, opt, runService, SECURITY_HELP, SECURITY_OPTIONS, serviceSecurity } from "../../lib/service-main.js";
import type { ShopFile } from "./shop.js";
import { MERCHANT_DEFAULTS, startMerchant } from "./server.js";

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
    "expiry-grace-ms": { type: "string" },
    "retention-ms": { type: "string" },
    "max-unpaid-orders": { type: "string" },
    "sweep-every-ms": { type: "string" },
    ...SECURITY_OPTIONS,
  },
  help: [
    `  --listen HOST:PORT         address to serve on (default ${defaultAddress("merchant")})`,
    "  --data DIR                 netpurse data folder (default $NETPURSE_DATA or ./.data)",
    "  --id MERCHANT              merchant id; its folder is DATA/merchants/MERCHANT (default demo-shop)",
    "  --dir DIR                  the merchant's folder instead: shop.json (catalogue; with `loyalty`, the programme's benefits\n                             site that grants its buyers points, docs/loyalty.md) and merchant.db",
    `  --validation HOST:PORT     merchant validation service (default ${defaultAddress("merchantValidation")})`,
    `  --payment-server HOST:PORT payment server named in offers (default ${defaultAddress("payment")})`,
    "  --advertise HOST:PORT      this server's address named in offers (default: the bound address)",
    `  --offer-ttl-ms N           how long an offer stays payable, at most 3600000: the validation service grants a session key
                             for at most 1 hour, and the payment server refuses a new draw request after it (default ${MERCHANT_DEFAULTS.offerTtlMs})`,
    `  --expiry-grace-ms N        how long after its offer's expiry an unpaid order stays OFFERED before it becomes EXPIRED
                             (default ${MERCHANT_DEFAULTS.expiryGraceMs}); a valid debit result M still pays an EXPIRED order`,
    `  --retention-ms N           how long an EXPIRED order is kept before it is deleted (default ${MERCHANT_DEFAULTS.retentionMs}, 7 days)`,
    `  --max-unpaid-orders N      the most unpaid (OFFERED) orders at once; CreateOrder beyond it is RESOURCE_EXHAUSTED
                             (default ${MERCHANT_DEFAULTS.maxUnpaidOrders})`,
    `  --sweep-every-ms N         how often unpaid orders are expired and expired ones deleted (default ${MERCHANT_DEFAULTS.sweepEveryMs})`,
    SECURITY_HELP,
  ].join("\n"),
  start: async (v) => {
    const dir = opt(v, "dir", join(dataDir(v.data as string | undefined), "merchants", opt(v, "id", "demo-shop")));
    const { merchantId } = await readJson<ShopFile>(join(dir, "shop.json"));
    return startMerchant({
      security: await serviceSecurity(v, { kind: "merchant", id: merchantId }),
      listen: opt(v, "listen", defaultAddress("merchant")),
      dir,
      validation: opt(v, "validation", defaultAddress("merchantValidation")),
      paymentServer: opt(v, "payment-server", defaultAddress("payment")),
      ...(typeof v.advertise === "string" ? { advertise: v.advertise } : {}),
      offerTtlMs: intOpt(v, "offer-ttl-ms", MERCHANT_DEFAULTS.offerTtlMs),
      expiryGraceMs: intOpt(v, "expiry-grace-ms", MERCHANT_DEFAULTS.expiryGraceMs),
      retentionMs: intOpt(v, "retention-ms", MERCHANT_DEFAULTS.retentionMs),
      maxUnpaidOrders: intOpt(v, "max-unpaid-orders", MERCHANT_DEFAULTS.maxUnpaidOrders),
      sweepEveryMs: intOpt(v, "sweep-every-ms", MERCHANT_DEFAULTS.sweepEveryMs),
    });
  },
});
