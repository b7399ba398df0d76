// netpurse-emulator as the hardware suite runs it: the same software cards
// and PSAMs in the same emulated readers (startEmulatedReaders, one reader
// per file, cards first, no pcscd of its own: the suite runs pcscd), with
// every command APDU each card application processes counted by its INS
// byte. The parent asks for the counts over the IPC channel
// ({ id, op: "apduCounts" } → { id, apduCounts }), and drives the cards
// with the emulator's own control requests (whenReady, remove, insert).
// Counting at the card, not at whoever sends, tells how many APDUs a
// terminal host's PSAM really exchanged per purchase.
//
// node --import tsx bench/apdu-counting-emulator.ts --card FILE --psam FILE... [--port-base N]

import type { CardApplication } from "../lib/apdu/transport.js";
import { createLogger } from "../lib/log.js";
import { runService } from "../lib/service-main.js";
import { openSlot, readerSlots, startEmulatedReaders } from "../services/emulator/emulator.js";
import { serveControl } from "../services/emulator/emulator-process.js";
import { DEFAULT_PORT_BASE } from "../services/emulator/pcscd.js";

const PROGRAM = "bench-apdu-counting-emulator";

/** Command APDUs one card application processed, in all and by INS (hex), and its resets (power-ups). */
export interface ApduCount {
  /** The PC/SC reader name. */
  reader: string;
  kind: "card" | "PSAM";
  apdus: number;
  byIns: Record<string, number>;
  resets: number;
}

export interface ApduCountsRequest {
  id: number;
  op: "apduCounts";
}

export interface ApduCountsReply {
  id: number;
  apduCounts: ApduCount[];
}

/** The application, answering as before, with what it processes counted into `count`. */
function counted(app: CardApplication, count: ApduCount): CardApplication {
  return {
    reset() {
      count.resets++;
      return app.reset();
    },
    process(command) {
      count.apdus++;
      const ins = (command[1] ?? 0).toString(16).padStart(2, "0").toUpperCase();
      count.byIns[ins] = (count.byIns[ins] ?? 0) + 1;
      return app.process(command);
    },
  };
}

const isCountsRequest = (m: unknown): m is ApduCountsRequest =>
  typeof m === "object" && m !== null && (m as Partial<ApduCountsRequest>).op === "apduCounts" && typeof (m as Partial<ApduCountsRequest>).id === "number";

await runService({
  program: PROGRAM,
  summary: "netpurse-emulator's readers, every card's and PSAM's command APDUs counted (bench/apdu-counting-emulator.ts).",
  options: { card: { type: "string", multiple: true }, psam: { type: "string", multiple: true }, "port-base": { type: "string" } },
  help: [
    "  --card FILE              a software card file to serve; repeat for more",
    "  --psam FILE              a software PSAM file to serve; repeat for more",
    `  --port-base N            first vpcd port (default ${DEFAULT_PORT_BASE})`,
  ].join("\n"),
  start: async (v) => {
    const files = (name: string) => (v[name] as string[] | undefined) ?? [];
    const portBase = v["port-base"] === undefined ? DEFAULT_PORT_BASE : Number(v["port-base"]);
    const slots = readerSlots({ cards: files("card"), psams: files("psam") }, portBase);
    if (slots.length === 0) throw new Error("give at least one --card FILE or --psam FILE");
    const counts: ApduCount[] = slots.map((s) => ({ reader: s.name, kind: s.kind, apdus: 0, byIns: {}, resets: 0 }));
    const cards = await Promise.all(slots.map(async (s, i) => ({ name: s.friendlyName, app: counted(await openSlot(s), counts[i]!) })));
    const emulated = await startEmulatedReaders({ dir: "", cards, pcscd: false, portBase, log: createLogger(PROGRAM) });
    const stopControl = serveControl(emulated);
    const onMessage = (m: unknown) => {
      if (isCountsRequest(m)) process.send?.({ id: m.id, apduCounts: counts } satisfies ApduCountsReply);
    };
    process.on("message", onMessage);
    return {
      address: `127.0.0.1:${slots.map((s) => s.port).join(",")}`,
      close: async () => {
        process.off("message", onMessage);
        stopControl();
        await emulated.close();
      },
    };
  },
});
