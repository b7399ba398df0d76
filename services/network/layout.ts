// Where each part keeps its files under the data folder, and the demo data
// the main job sets up on first run: issuer keys, PSAMs for a terminal host,
// one registered demo shop per confirmation mode and a personalised card.

import { existsSync } from "node:fs";
import { join } from "node:path";
import { confirmationModeFromJSON } from "../../gen/netpurse/card/v1/card.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import { Issuer } from "../issuer/issuer.js";
import type { ShopFile } from "../merchant/shop.js";
import { registerMerchant } from "../operator/operator.js";
import type { CardFile } from "../../client/card/software-card.js";

export function paths(data: string) {
  return {
    issuer: join(data, "issuer"),
    terminal: (id: string) => join(data, "terminals", id),
    payment: join(data, "payment"),
    validation: join(data, "merchant-validation"),
    merchant: (id: string) => join(data, "merchants", id),
    cards: join(data, "cards"),
    client: join(data, "client"),
  };
}

export const EUR = 978;

const CATALOGUE: ShopFile["products"] = [
  { productId: "ebook-smart-cards", name: "Smart Cards, Explained (e-book)", description: "A short guide to chip cards", priceMinor: 250 },
  { productId: "ebook-grpc", name: "gRPC in Practice (e-book)", description: "Protocol-first services", priceMinor: 990 },
  { productId: "song-1", name: "Stored Value Blues (MP3)", description: "One song", priceMinor: 99 },
];

function shop(merchantId: string, name: string, mode: string): ShopFile {
  return { merchantId, name, confirmationMode: `CONFIRMATION_MODE_${mode}`, currency: EUR, exponent: 2, products: CATALOGUE };
}

/** The demo shop of FIG. 5: the PSAM verifies the card's signature. */
export const DEMO_SHOP = shop("demo-shop", "Netpurse Demo Bookshop", "PSAM_VERIFIES");

/** One demo shop per confirmation mode, each on its own port. */
export const DEMO_SHOPS: { shop: ShopFile; port: number }[] = [
  { shop: DEMO_SHOP, port: 7410 },
  { shop: shop("server-shop", "Server Compares Books", "SERVER_COMPARES"), port: 7412 },
  { shop: shop("client-shop", "Client Compares Books", "CLIENT_COMPARES"), port: 7413 },
  { shop: shop("merchant-shop", "Merchant Compares Books", "MERCHANT_COMPARES"), port: 7414 },
];

export interface DemoSetup {
  terminals: { id: string; psams: number }[];
  shops: ShopFile[];
  card: { name: string; value: number; maxBalance: number; expiry: string };
}

export const DEFAULT_DEMO: DemoSetup = {
  terminals: [{ id: "terminal-1", psams: 4 }],
  shops: DEMO_SHOPS.map((d) => d.shop),
  card: { name: "demo", value: 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
};

/**
 * Creates what is missing for the demo network; leaves what exists alone,
 * so a second run reuses the same keys, PSAMs, merchant and card.
 */
export async function ensureDemoData(data: string, demo: DemoSetup = DEFAULT_DEMO, say: (line: string) => void = () => {}): Promise<{ cardPath: string }> {
  const p = paths(data);
  if ((await Issuer.createKeys(p.issuer, 1)).created) say("issuer: created master keys (purchase, load, authentication), key version 1");
  const issuer = await Issuer.open(p.issuer);
  try {
    for (const t of demo.terminals) {
      for (let i = 0; i < t.psams; i++) {
        const file = join(p.terminal(t.id), "psams", `psam-${i}.psam.json`);
        if (existsSync(file)) continue;
        const psam = await issuer.provisionPsam({ path: file, currency: EUR });
        say(`issuer: provisioned PSAM ${psam.psamId} for ${t.id}`);
      }
    }
    for (const shop of demo.shops) {
      const shopFile = join(p.merchant(shop.merchantId), "shop.json");
      if (existsSync(shopFile)) continue;
      await registerMerchant({ paymentDir: p.payment, validationDir: p.validation, merchantId: shop.merchantId, name: shop.name, mode: confirmationModeFromJSON(shop.confirmationMode) });
      await writeJsonAtomic(shopFile, shop);
      say(`operator: registered merchant ${shop.merchantId} (${shop.confirmationMode.replace("CONFIRMATION_MODE_", "")}) with a fresh shared key`);
    }
    const cardPath = join(p.cards, `${demo.card.name}.card.json`);
    if (!existsSync(cardPath) || (await cardTooLow(cardPath))) {
      const card = await issuer.personaliseCard({ path: cardPath, currency: EUR, exponent: 2, initialValue: demo.card.value, maxBalance: demo.card.maxBalance, expiry: demo.card.expiry });
      say(`issuer: personalised card ${card.purseId} with EUR ${(demo.card.value / 100).toFixed(2)} (recorded as an issuer credit)`);
    }
    return { cardPath };
  } finally {
    await issuer.close();
  }
}

/** A demo card too poor for the dearest demo product is replaced by a fresh one. */
async function cardTooLow(path: string): Promise<boolean> {
  const card = await readJson<CardFile>(path);
  return card.balance < 4 * Math.max(...CATALOGUE.map((x) => x.priceMinor));
}
