// Where each part keeps its files under the data folder, and the demo data
// the main job sets up on first run: issuer keys, PSAMs for a terminal host,
// the payment server's key to check the PSAMs' verdicts, one registered demo
// shop per confirmation mode, the load server's security module, a demo bank
// with an account and its holder's password, clearing's keys and merchant
// registry, and a personalised card.

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { ConfirmationMode, confirmationModeFromJSON } from "../../gen/netpurse/card/v1/card.js";
import { readJson, writeFileAtomic, writeJsonAtomic } from "../../lib/files.js";
import { defaultAddress } from "../../lib/config.js";
import { AUTHENTICATION_CURRENCY } from "../../lib/money.js";
import { DEMO_SITE, PROGRAMME_HSM_FILE, writeDemoSite } from "../benefits/site.js";
import { Issuer } from "../issuer/issuer.js";
import type { ShopFile } from "../merchant/shop.js";
import { addMerchantToClearing, clearingMerchantsPath, registerBank, registerMerchant } from "../operator/operator.js";
import { readClearingMerchants } from "../clearing/merchants.js";
import { VERDICT_KEY_FILE } from "../payment/security-module.js";
import { BANK_MIGRATIONS, BankStore } from "../bank/store.js";
import { hashPassword } from "../bank/credentials.js";
import { openStore } from "../../lib/store/postgres.js";
import { demoIdentities, ensurePki, psamRegistryPath } from "./pki.js";

/**
 * The demo benefits site: registered with the payment operator as a merchant
 * (it is paid in points and authentications), its programme's security
 * module, and its site.json with the demo card's holder as a member.
 */
async function ensureDemoSite(p: ReturnType<typeof paths>, issuer: Issuer, loyalty: DemoLoyalty, cardPath: string, say: (line: string) => void): Promise<void> {
  const dir = p.site(DEMO_SITE.merchantId);
  const hsm = join(dir, PROGRAMME_HSM_FILE);
  if (!existsSync(hsm)) {
    const made = await issuer.provisionProgrammeHsm({ path: hsm, programme: DEMO_SITE.programme.code });
    say(`issuer: provisioned programme ${DEMO_SITE.programme.code}'s security module ${made.hsmId} with its earn master keys`);
  }
  if (!(await readClearingMerchants(clearingMerchantsPath(p.clearing))).has(DEMO_SITE.merchantId)) {
    await registerMerchant({
      paymentDir: p.payment,
      validationDir: p.validation,
      merchantId: DEMO_SITE.merchantId,
      name: DEMO_SITE.name,
      mode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
      clearing: { dir: p.clearing, currency: EUR, exponent: 2 },
    });
    say(`operator: registered benefits site ${DEMO_SITE.merchantId} with a fresh shared key`);
  }
  const { purseId } = await readJson<{ purseId: string }>(cardPath);
  const site = await writeDemoSite(dir, {
    memberPurseIds: [purseId],
    enrolled: loyalty.enrolled.map((merchantId) => ({ merchantId, pointsPerUnit: loyalty.pointsPerUnit })),
  });
  if (site.written) say(`benefits: wrote ${DEMO_SITE.name}'s rewards and its member Ana Silva, holder of card ${purseId}`);
}

export function paths(data: string) {
  return {
    issuer: join(data, "issuer"),
    terminal: (id: string) => join(data, "terminals", id),
    payment: join(data, "payment"),
    validation: join(data, "merchant-validation"),
    merchant: (id: string) => join(data, "merchants", id),
    cards: join(data, "cards"),
    client: join(data, "client"),
    bank: join(data, "bank"),
    load: join(data, "load"),
    clearing: join(data, "clearing"),
    site: (id: string) => join(data, "benefits", id),
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

/** The demo bank and the cardholder's account at it (the account stands in for a bank's core system). */
export const DEMO_BANK = { bankId: "demo-bank", accountId: "demo-account", holder: "Demo Cardholder", depositMinor: 100_000 };

/** Where the demo account's password is kept (mode 0600), so that every run of the demo logs in with it: DATA/bank/demo-password. */
export const demoPasswordPath = (data: string) => join(paths(data).bank, "demo-password");

/** The demo account's password, as ensureDemoData made it. */
export async function demoBankPassword(data: string): Promise<string> {
  return (await readFile(demoPasswordPath(data), "utf8")).trim();
}

/**
 * The demo loyalty programme (docs/loyalty.md): its benefits site, where it
 * listens (the enrolled shops call it to grant points), the points each
 * enrolled shop grants per euro, and the points the card starts with.
 */
export interface DemoLoyalty {
  siteAddress: string;
  /** Merchant ids of the shops enrolled in the programme. */
  enrolled: string[];
  pointsPerUnit: number;
  cardPoints: number;
}

/** The demo programme: the four demo shops grant 250 Skyways Miles per euro; the card starts with none and earns them. */
export const DEMO_LOYALTY: DemoLoyalty = {
  siteAddress: defaultAddress("benefits"),
  enrolled: DEMO_SHOPS.map((d) => d.shop.merchantId),
  pointsPerUnit: 250,
  cardPoints: 0,
};

export interface DemoSetup {
  terminals: { id: string; psams: number }[];
  shops: ShopFile[];
  /** A loyalty programme with its benefits site, authentication and points PSAMs on the first terminal host; absent: none. */
  loyalty?: DemoLoyalty;
  /** `value` is an issuer credit at personalisation; the main job's card starts empty and is loaded from the bank. */
  card: { name: string; value: number; maxBalance: number; expiry: string };
  /** Concentrators the network runs (default 1): each needs its certificate. */
  concentrators?: number;
  /** The PostgreSQL database the services keep their state in (the bank's demo account is opened there); default: SQLite files. */
  database?: string;
}

export const DEFAULT_DEMO: DemoSetup = {
  terminals: [{ id: "terminal-1", psams: 4 }],
  shops: DEMO_SHOPS.map((d) => d.shop),
  card: { name: "demo", value: 0, maxBalance: 50_000, expiry: "2031-12-31" },
  loyalty: DEMO_LOYALTY,
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
    const programme = DEMO_SITE.programme;
    const newProgramme = demo.loyalty !== undefined && !issuer.programmes().some((x) => x.code === programme.code);
    if (newProgramme) {
      await issuer.createProgramme(programme.code, programme.name);
      say(`issuer: created loyalty programme ${programme.code} "${programme.name}" (redeem and earn master keys)`);
    }
    for (const t of demo.terminals) {
      for (let i = 0; i < t.psams; i++) {
        const file = join(p.terminal(t.id), "psams", `psam-${i}.psam.json`);
        if (existsSync(file)) {
          // A PSAM of an earlier version of the demo gets the verdict key it lacks (nothing else changes in it), and its terminal.
          const { psamId, added } = await issuer.addVerdictKey(file);
          if (added) say(`issuer: gave PSAM ${psamId} of ${t.id} its verdict key`);
          if (!(await issuer.psamRegistry()).psams.some((x) => x.psamId === psamId)) await issuer.assignPsam(psamId, t.id);
          continue;
        }
        const psam = await issuer.provisionPsam({ path: file, currency: EUR, terminalId: t.id });
        say(`issuer: provisioned PSAM ${psam.psamId} for ${t.id}`);
      }
    }
    // The authentication PSAM (currency 999) and the programme's points PSAM sit beside the money PSAMs of the first host.
    const host = demo.terminals[0];
    if (demo.loyalty && host) {
      for (const [name, currency] of [
        ["authentication-0", AUTHENTICATION_CURRENCY],
        [`points-${programme.code}-0`, programme.code],
      ] as const) {
        const file = join(p.terminal(host.id), "psams", `${name}.psam.json`);
        if (existsSync(file)) continue;
        const psam = await issuer.provisionPsam({ path: file, currency, terminalId: host.id });
        say(
          `issuer: provisioned ${currency === AUTHENTICATION_CURRENCY ? "authentication" : `points (programme ${currency})`} PSAM ${psam.psamId} for ${host.id}`,
        );
      }
    }
    const verdictKey = join(p.payment, VERDICT_KEY_FILE);
    if (!existsSync(verdictKey)) {
      await issuer.exportVerdictKey(verdictKey);
      say("issuer: gave the payment server's security module the verdict master key, to check the PSAMs' verdicts");
    }
    const clearingKeys = join(p.clearing, "keys.json");
    if (!existsSync(clearingKeys) || newProgramme) {
      await issuer.exportClearingKeys(clearingKeys);
      say("issuer: gave clearing's security module the purchase, load and batch master keys, to check what it pays");
    }
    const inClearing = await readClearingMerchants(clearingMerchantsPath(p.clearing));
    for (const shop of demo.shops) {
      const shopFile = join(p.merchant(shop.merchantId), "shop.json");
      const clearing = { dir: p.clearing, currency: shop.currency, exponent: shop.exponent };
      if (existsSync(shopFile)) {
        // A shop registered before clearing existed is entered in clearing's registry (its keys stay as they are).
        if (!inClearing.has(shop.merchantId)) {
          await addMerchantToClearing(p.clearing, { merchantId: shop.merchantId, name: shop.name, ...clearing });
          say(`operator: entered merchant ${shop.merchantId} in clearing's registry`);
        }
        continue;
      }
      await registerMerchant({
        paymentDir: p.payment,
        validationDir: p.validation,
        merchantId: shop.merchantId,
        name: shop.name,
        mode: confirmationModeFromJSON(shop.confirmationMode),
        clearing,
      });
      const enrolled = demo.loyalty?.enrolled.includes(shop.merchantId)
        ? { loyalty: { siteAddress: demo.loyalty.siteAddress, programme: programme.code, siteId: DEMO_SITE.merchantId } }
        : {};
      await writeJsonAtomic(shopFile, { ...shop, ...enrolled });
      say(`operator: registered merchant ${shop.merchantId} (${shop.confirmationMode.replace("CONFIRMATION_MODE_", "")}) with a fresh shared key`);
    }
    if (!existsSync(join(p.load, "hsm.json"))) {
      const hsm = await issuer.provisionHsm({ path: join(p.load, "hsm.json") });
      say(`issuer: provisioned the load server's security module ${hsm.hsmId} with the load master keys`);
    }
    if (!existsSync(join(p.bank, "bank.json"))) {
      await registerBank({ loadDir: p.load, bankDir: p.bank, bankId: DEMO_BANK.bankId });
      say(`operator: registered bank ${DEMO_BANK.bankId} at the load server with a fresh shared key`);
    }
    const bank = await openStore(demo.database ?? join(p.bank, "bank.db"), BANK_MIGRATIONS, { schema: "bank" });
    try {
      const books = new BankStore(bank);
      // The demo account's password: made once, kept for the next runs (the password only, never in bank.db, which keeps its hash).
      const passwordFile = demoPasswordPath(data);
      const madePassword = !existsSync(passwordFile);
      if (madePassword) await writeFileAtomic(passwordFile, `${randomBytes(12).toString("base64url")}\n`, { private: true });
      const password = await demoBankPassword(data);
      if (!(await books.account(DEMO_BANK.accountId))) {
        await books.open({
          accountId: DEMO_BANK.accountId,
          holder: DEMO_BANK.holder,
          currency: EUR,
          exponent: 2,
          openingMinor: DEMO_BANK.depositMinor,
          passwordHash: await hashPassword(password),
        });
        say(`bank: opened account ${DEMO_BANK.accountId} for ${DEMO_BANK.holder} with EUR ${(DEMO_BANK.depositMinor / 100).toFixed(2)}`);
      } else if (!(await books.passwordHash(DEMO_BANK.accountId))) {
        // A data folder from before the bank had logins.
        await books.setPasswordHash(DEMO_BANK.accountId, await hashPassword(password));
        say(`bank: gave account ${DEMO_BANK.accountId} a password`);
      }
      if (madePassword) say(`bank: the password of account ${DEMO_BANK.accountId} is ${password} (kept in ${passwordFile}, mode 0600)`);
    } finally {
      await bank.close();
    }
    await issuer.exportPsamRegistry(psamRegistryPath(data));
    const merchants = [...demo.shops.map((s) => s.merchantId), ...(demo.loyalty ? [DEMO_SITE.merchantId] : [])];
    await ensurePki(data, demoIdentities({ terminals: demo.terminals, merchants, bankId: DEMO_BANK.bankId, concentrators: demo.concentrators }), say);
    const cardPath = join(p.cards, `${demo.card.name}.card.json`);
    if (!existsSync(cardPath)) {
      const card = await issuer.personaliseCard({
        path: cardPath,
        currency: EUR,
        exponent: 2,
        initialValue: demo.card.value,
        maxBalance: demo.card.maxBalance,
        expiry: demo.card.expiry,
        ...(demo.loyalty ? { points: [{ programme: programme.code, value: demo.loyalty.cardPoints }] } : {}),
      });
      say(
        `issuer: personalised card ${card.purseId}${demo.card.value ? ` with EUR ${(demo.card.value / 100).toFixed(2)} (recorded as an issuer credit)` : ", empty"}` +
          (demo.loyalty ? `, with a points purse of programme ${programme.code}` : ""),
      );
    }
    if (demo.loyalty) await ensureDemoSite(p, issuer, demo.loyalty, cardPath, say);
    return { cardPath };
  } finally {
    await issuer.close();
  }
}
