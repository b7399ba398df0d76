// CSV as RFC 4180 has it: one header row, CRLF line ends, a field quoted
// when it holds a comma, a double quote, CR or LF, quotes inside doubled.

/** One field, quoted only when it must be. */
export function csvField(value: string | number | bigint): string {
  const s = String(value);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** A whole CSV text: the header row, then each row, every line ended by CRLF. */
export function csv(header: string[], rows: (string | number | bigint)[][]): string {
  return [header, ...rows].map((r) => r.map(csvField).join(",") + "\r\n").join("");
}
