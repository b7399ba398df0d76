// A settlement day's points redeemed, for people and for CSV: counted in
// points of each loyalty programme, never formatted as money and never in a
// money total (docs/clearing.md, "Loyalty points"). The operator's
// settlement report and the main job print it after the money positions and
// payouts.

import type { Settlement } from "../../gen/netpurse/clearing/v1/clearing.js";
import { table } from "../../lib/table.js";

/** The points section of a settlement report: a heading and a table by programme and merchant, or a line saying there were none. */
export function pointsRedeemedReport(s: Pick<Settlement, "pointsRedeemed" | "redemptions">): string {
  if (s.pointsRedeemed.length === 0) return "points redeemed: none";
  return [
    `points redeemed (loyalty programmes: points, not money; ${s.redemptions} ${s.redemptions === 1 ? "redemption" : "redemptions"}):`,
    table(
      ["programme", "merchant", "points", "redemptions"],
      s.pointsRedeemed.map((p) => [String(p.programme), p.merchantId, `${p.points} points`, String(p.redemptions)]),
    ),
  ].join("\n");
}

/**
 * The day's points redeemed as CSV rows of the settlement table's columns
 * (services/operator/clearing-report.ts settlementCsv): record
 * "points_redeemed", party the merchant, currency the programme code, points
 * the points (a whole number; the money column amount stays empty),
 * transactions the redemptions.
 */
export function pointsRedeemedCsvRows(s: Pick<Settlement, "day" | "pointsRedeemed">): string[][] {
  return s.pointsRedeemed.map((p) => [
    s.day,
    "points_redeemed",
    "merchant",
    p.merchantId,
    "",
    "",
    String(p.programme),
    "",
    "",
    "",
    String(p.redemptions),
    "",
    String(p.points),
  ]);
}
