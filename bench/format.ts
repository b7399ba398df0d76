// Number formats and markdown tables shared by the benchmark's reports.

export const ms = (v: number) => (Number.isFinite(v) ? v.toFixed(1) : "n/a");
export const rate = (v: number) => v.toFixed(1);
export const mib = (v: number | undefined) => (v === undefined ? "n/a" : v.toFixed(0));
export const pct = (v: number | undefined) => (v === undefined ? "n/a" : v.toFixed(0));
/** A count per purchase: whole numbers as they are, others to two decimals. */
export const perPurchase = (v: number | undefined) => (v === undefined || !Number.isFinite(v) ? "n/a" : String(Number(v.toFixed(2))));
export const whole = (v: number) => (Number.isFinite(v) ? v.toFixed(0) : "n/a");
export const ratio = (a: number, b: number | undefined) => (b !== undefined && Number.isFinite(a / b) ? (a / b).toFixed(2) : "n/a");

export function markdown(header: string[], rows: string[][]): string {
  const line = (cells: string[]) => `| ${cells.join(" | ")} |`;
  return [line(header), line(header.map(() => "---:")), ...rows.map(line)].join("\n");
}
