// Addresses and folders every part agrees on. Everything binds to loopback
// unless configured otherwise.

import { resolve } from "node:path";

export const DEFAULT_HOST = "127.0.0.1";

/** Default ports (issue #2): merchant 7410, validation 7411, payment 7420, concentrator 7430; 7470 is the one suggested for the client daemon's opt-in TCP listener (it serves its Unix socket by default). */
export const DEFAULT_PORTS = {
  merchant: 7410,
  merchantValidation: 7411,
  payment: 7420,
  concentrator: 7430,
  bank: 7440,
  load: 7450,
  clearing: 7460,
  cardholder: 7470,
  /** The demo loyalty programme's benefits site (netpurse-benefits). */
  benefits: 7480,
  /** The PostgreSQL server npm start runs for several payment servers when given no --database. */
  postgres: 7490,
} as const;

export function defaultAddress(part: keyof typeof DEFAULT_PORTS): string {
  return `${DEFAULT_HOST}:${DEFAULT_PORTS[part]}`;
}

/** The data folder: --data, else $NETPURSE_DATA, else ./.data. */
export function dataDir(option?: string): string {
  return resolve(option ?? process.env.NETPURSE_DATA ?? ".data");
}
