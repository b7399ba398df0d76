// `netpurse readers`: the PC/SC readers on this machine and what is in each
// — a netpurse card (purse id and balance), a netpurse PSAM, another card,
// or nothing — asked of the cards themselves through pcscd.

import { selectCommand, SW } from "../../lib/apdu/apdu.js";
import { exchange } from "../../lib/apdu/transport.js";
import { formatMoney } from "../../lib/money.js";
import { PcscReaders } from "../../lib/pcsc/readers.js";
import { CardUnreachable, PcscTransport } from "../../lib/pcsc/transport.js";
import { PSAM_AID, PsamIns, PSAM_CLA, PsamStatusResponse } from "../../lib/protocol/psam.js";
import { table } from "../../lib/table.js";
import { PurseReader } from "../card/purse-reader.js";

export interface ReaderSurvey {
  reader: string;
  /** "netpurse card", "netpurse PSAM", "other card", "empty" or "in use". */
  holds: string;
  detail: string;
  atr: string;
}

/** What one reader holds, by selecting the purse and then the PSAM application. */
async function survey(readers: PcscReaders, name: string): Promise<ReaderSurvey> {
  const view = readers.view(name);
  if (!view?.present) return { reader: name, holds: "empty", detail: "", atr: "" };
  const transport = new PcscTransport(readers, { name }, { releaseAfterMs: 0 });
  try {
    const atr = (await transport.reset()).toString("hex");
    try {
      const purse = new PurseReader(transport);
      await purse.connect();
      const p = await purse.readPurse();
      const detail = `purse ${p.purseId.toString("hex")}, balance ${formatMoney({ amountMinor: p.balance, currency: p.currency, exponent: p.exponent })}, expires ${p.expiry}`;
      return { reader: name, holds: "netpurse card", detail, atr };
    } catch (e) {
      if (e instanceof CardUnreachable) throw e;
    }
    await transport.reset();
    if ((await exchange(transport, selectCommand(PSAM_AID))).sw === SW.OK) {
      const r = await exchange(transport, { cla: PSAM_CLA, ins: PsamIns.READ_STATUS, p1: 0, p2: 0, data: Buffer.alloc(0), le: 256 });
      const st = r.sw === SW.OK ? PsamStatusResponse.decode(r.data) : undefined;
      const detail = st ? `PSAM ${st.psamId.toString("hex")}, counter ${st.psamCounter}, batch ${st.batchNumber} (${st.batchCount} records)` : "";
      return { reader: name, holds: "netpurse PSAM", detail, atr };
    }
    return { reader: name, holds: "other card", detail: "answers neither the purse nor the PSAM application", atr };
  } catch (e) {
    const message = (e as Error).message;
    // A terminal host keeps its PSAMs, and the daemon its card while it works: pcscd reports a sharing violation.
    const detail = /sharing violation/i.test(message) ? "held by another program (a terminal host keeps its PSAMs)" : `cannot reach the card: ${message}`;
    return { reader: name, holds: "in use", detail, atr: view.atr?.toString("hex") ?? "" };
  } finally {
    await transport.close();
  }
}

/** Every reader pcscd knows, and what is in it. */
export async function surveyReaders(): Promise<ReaderSurvey[]> {
  const readers = await PcscReaders.open();
  try {
    if (!readers.serviceUp)
      throw new CardUnreachable("the PC/SC service (pcscd) is not running: start it (systemctl start pcscd, or netpurse-emulator --pcscd)");
    const out: ReaderSurvey[] = [];
    for (const r of readers.list()) out.push(await survey(readers, r.name));
    return out;
  } finally {
    await readers.close();
  }
}

export function readersTable(rows: ReaderSurvey[]): string {
  if (!rows.length) return "no PC/SC readers: plug one in, or serve virtual ones with netpurse-emulator";
  return table(
    ["reader", "holds", "detail", "ATR"],
    rows.map((r) => [r.reader, r.holds, r.detail, r.atr]),
  );
}
