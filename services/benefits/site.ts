// A benefits site's folder (DATA/benefits/ID): site.json (the programme, the
// rewards, the enrolled merchants and the members), programme-hsm.json (the
// programme's security module) and benefits.db (orders and grants). The
// rewards are sold as a shop's products, priced in points or in an
// authentication, and a confirmed order releases what the reward gives,
// matched to the member whose card paid (docs/loyalty.md).

import { randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { confirmationModeFromJSON, ConfirmationMode, ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { RewardKind, type Reward } from "../../gen/netpurse/benefits/v1/benefits.js";
import { NetpurseError, Status } from "../../lib/grpc/errors.js";
import { hexOf, isName } from "../../lib/ids.js";
import { AUTHENTICATION_CURRENCY, isProgrammeCode, MAX_CARD_AMOUNT, money } from "../../lib/money.js";
import { readJson, writeJsonAtomic } from "../../lib/files.js";
import type { ReleaseGoods, ShopFile } from "../merchant/shop.js";

/** The site's description, rewards, enrolments and members: DATA/benefits/ID/site.json. */
export interface SiteFile {
  /** The site's merchant id at the payment operator (its certificate: merchant/ID); also the bank id of a points credit. */
  merchantId: string;
  name: string;
  /** A ConfirmationMode name; the payment operator must have registered the site with the same. */
  confirmationMode: string;
  programme: { code: number; name: string };
  rewards: SiteReward[];
  /** Merchants whose purchases earn points, and how many: points per currency unit paid (the rate times the amount, rounded down). */
  enrolled: { merchantId: string; pointsPerUnit: number }[];
  /** The site's member accounts and the cards linked to each. */
  members: Member[];
}

export interface SiteReward {
  /** The product id of CreateOrder: 1..64 characters of [A-Za-z0-9._-]. */
  rewardId: string;
  name: string;
  description: string;
  /** "points": redeemed with `points` from the card; "authentication": the card proves itself with a draw of 0 in 999. */
  kind: "points" | "authentication";
  points?: number;
}

export interface Member {
  memberId: string;
  name: string;
  /** The purse ids (16 hex digits) of the member's cards. */
  purseIds: string[];
  /** What an authentication shows the member, e.g. "booking NP4821 LIS→AMS 12 Dec". */
  booking?: string;
}

export const SITE_FILE = "site.json";
/** The programme's security module: a SoftwareHsm file whose loadKeys are the programme's earn master keys (netpurse-issuer provision-programme-hsm). */
export const PROGRAMME_HSM_FILE = "programme-hsm.json";
export const BENEFITS_DB = "benefits.db";

/** The most points a merchant may grant per whole currency unit. */
const MAX_POINTS_PER_UNIT = 1_000_000;

/** Reads and checks site.json: a mistake in it stops the site at start, naming the entry. */
export async function readSite(dir: string): Promise<SiteFile> {
  const path = join(dir, SITE_FILE);
  return checkSite(await readJson<SiteFile>(path), path);
}

export function checkSite(s: SiteFile, path = SITE_FILE): SiteFile {
  const fail = (what: string) => {
    throw new Error(`${path}: ${what}`);
  };
  if (!isName(s.merchantId ?? "", 16)) fail("merchantId must be 1..16 characters of [A-Za-z0-9._-] (it is the bank id of a points credit)");
  if (!s.name) fail("name is missing");
  if (confirmationModeFromJSON(s.confirmationMode) === ConfirmationMode.UNRECOGNIZED) fail(`unknown confirmationMode "${s.confirmationMode}"`);
  if (!isProgrammeCode(s.programme?.code)) fail("programme.code must be a programme code 1000..65535");
  const rewardIds = new Set<string>();
  for (const r of s.rewards ?? []) {
    if (!isName(r.rewardId ?? "", 64) || rewardIds.has(r.rewardId)) fail(`reward id "${r.rewardId}" is malformed or repeated`);
    rewardIds.add(r.rewardId);
    if (r.kind === "points" && !(Number.isInteger(r.points) && r.points! >= 1 && r.points! <= MAX_CARD_AMOUNT))
      fail(`reward ${r.rewardId}: points must be 1..${MAX_CARD_AMOUNT}`);
    if (r.kind === "authentication" && r.points !== undefined) fail(`reward ${r.rewardId}: an authentication reward has no points`);
    if (r.kind !== "points" && r.kind !== "authentication") fail(`reward ${r.rewardId}: kind must be "points" or "authentication"`);
  }
  for (const e of s.enrolled ?? []) {
    if (!isName(e.merchantId ?? "", 16)) fail(`enrolled merchant id "${e.merchantId}" is malformed`);
    if (!Number.isInteger(e.pointsPerUnit) || e.pointsPerUnit < 1 || e.pointsPerUnit > MAX_POINTS_PER_UNIT)
      fail(`enrolled merchant ${e.merchantId}: pointsPerUnit must be a whole number 1..${MAX_POINTS_PER_UNIT}`);
  }
  const purses = new Set<string>();
  for (const m of s.members ?? []) {
    if (!m.memberId || !m.name) fail("a member needs a memberId and a name");
    for (const p of m.purseIds ?? []) {
      if (!/^[0-9a-f]{16}$/.test(p)) fail(`member ${m.memberId}: purse id "${p}" must be 16 lower-case hex digits`);
      if (purses.has(p)) fail(`purse ${p} is linked to two members`);
      purses.add(p);
    }
  }
  return { ...s, rewards: s.rewards ?? [], enrolled: s.enrolled ?? [], members: s.members ?? [] };
}

/** A reward's price: points of the programme (exponent 0), or 0 in 999 for an authentication. */
export const priceOfReward = (site: SiteFile, r: SiteReward) =>
  r.kind === "points" ? money(r.points!, site.programme.code, 0) : money(0, AUTHENTICATION_CURRENCY, 0);

/** The rewards as ListRewards gives them. */
export function rewardsOf(site: SiteFile): Reward[] {
  return site.rewards.map((r) => ({
    rewardId: r.rewardId,
    name: r.name,
    description: r.description,
    kind: r.kind === "points" ? RewardKind.REWARD_KIND_POINTS : RewardKind.REWARD_KIND_AUTHENTICATION,
    price: priceOfReward(site, r),
  }));
}

/** The site as a shop: one product per reward, priced in its own unit. */
export function shopOfSite(site: SiteFile): ShopFile {
  return {
    merchantId: site.merchantId,
    name: site.name,
    confirmationMode: site.confirmationMode,
    currency: site.programme.code,
    exponent: 0,
    products: site.rewards.map((r) => {
      const price = priceOfReward(site, r);
      return {
        productId: r.rewardId,
        name: r.name,
        description: r.description,
        priceMinor: Number(price.amountMinor),
        currency: price.currency,
        exponent: 0,
      };
    }),
  };
}

/** The member a card (purse id, hex) is linked to. */
export function memberOf(site: SiteFile, purseHex: string): Member | undefined {
  return site.members.find((m) => m.purseIds.includes(purseHex));
}

const voucherCode = () => randomBytes(8).toString("hex").toUpperCase().match(/.{4}/g)!.join("-");

/**
 * What a confirmed reward releases, for the card of the validated
 * confirmation. An authentication shows the member's account, so it needs a
 * member (else PERMISSION_DENIED, NOT_A_MEMBER: nothing is released). A
 * points reward is a voucher: the points on the card were the entitlement,
 * so any card gets it, naming the member when the card is linked to one.
 */
export function releaseReward(site: SiteFile): ReleaseGoods {
  return async (order, product, validated) => {
    const reward = site.rewards.find((r) => r.rewardId === product.productId)!;
    const purse = hexOf(validated.purseId?.value);
    const member = memberOf(site, purse);
    if (reward.kind === "authentication") {
      if (!member) {
        throw new NetpurseError(
          Status.PERMISSION_DENIED,
          ErrorReason.ERROR_REASON_NOT_A_MEMBER,
          `card ${purse} is linked to no member account of ${site.name}: nothing to show for order ${order.transactionId}`,
        );
      }
      return { goods: `member ${member.memberId} ${member.name}: ${member.booking ?? "no booking on file"}` };
    }
    const holder = member ? ` for member ${member.memberId} ${member.name}` : "";
    return { goods: `${reward.name} voucher ${voucherCode()}${holder}` };
  };
}

/** The demo site (docs/loyalty.md): Skyways benefits, of programme 1001 "Skyways Miles". */
export const DEMO_SITE = {
  merchantId: "skyways",
  name: "Skyways benefits",
  programme: { code: 1001, name: "Skyways Miles" },
} as const;

/**
 * Writes the demo site's site.json into `dir` (DATA/benefits/skyways) unless
 * it exists: its rewards, the merchants enrolled and one member, Ana Silva,
 * with the cards `memberPurseIds` (the demo card's purse id). The
 * programme's security module (programme-hsm.json) is the issuer's to write.
 */
export async function writeDemoSite(
  dir: string,
  o: { memberPurseIds: string[]; enrolled: { merchantId: string; pointsPerUnit: number }[]; confirmationMode?: string },
): Promise<{ written: boolean; path: string }> {
  const path = join(dir, SITE_FILE);
  if (existsSync(path)) return { written: false, path };
  const site: SiteFile = {
    ...DEMO_SITE,
    programme: { ...DEMO_SITE.programme },
    confirmationMode: o.confirmationMode ?? "CONFIRMATION_MODE_PSAM_VERIFIES",
    rewards: [
      { rewardId: "lounge", name: "Lounge pass", description: "One visit to a Skyways lounge", kind: "points", points: 2_000 },
      { rewardId: "upgrade", name: "Cabin upgrade", description: "One flight one cabin up", kind: "points", points: 15_000 },
      { rewardId: "booking", name: "See your booking", description: "Your account and bookings, with your card as the key", kind: "authentication" },
    ],
    enrolled: o.enrolled,
    members: [{ memberId: "100234", name: "Ana Silva", purseIds: o.memberPurseIds, booking: "booking NP4821 LIS→AMS 12 Dec" }],
  };
  await writeJsonAtomic(path, checkSite(site, path));
  return { written: true, path };
}
