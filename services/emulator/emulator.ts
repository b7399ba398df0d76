// Emulated PC/SC readers: netpurse's software cards and PSAMs behind real
// PC/SC readers (pcscd with vsmartcard's vpcd driver), so that every PC/SC
// client (pcsclite, opensc-tool, pcsc_scan, netpurse's own PC/SC transport)
// reaches them as it reaches a card in a USB reader. docs/readers.md.
//
// The API, for tests and for code that needs readers:
//
//   const r = await startEmulatedReaders({
//     dir,                                   // private folder: pcscd's configuration, shim, log
//     cards: [{ name: "netpurse card 1", app: await SoftwareCard.open(path) }, ...],
//     pcscd: true,                           // start our own pcscd (false: a system pcscd configured by hand)
//     portBase, shim, log,                   // optional: first vpcd port (0x8CA0), loopback/NODELAY shim (true), logger
//   });
//   r.readers   // [{ name: "netpurse card 1 00 00" (the PC/SC reader name), friendlyName, port, card: VirtualCard }]
//               //   card.remove() takes the card out, card.insert() puts it back, card.whenReady() waits for it
//   r.pcscd     // Pcscd when pcscd: true: stop(), restart(), pid, running, logPath (undefined otherwise)
//   await r.close()  // takes every card out and stops pcscd; always call it (after() of a test suite)
//
// With pcscd: true, startEmulatedReaders returns once pcscd is ready and has
// seen every card; with pcscd: false it returns at once and the cards connect
// whenever a pcscd with the matching configuration listens.
//
// The card applications run in this process; each card's vpcd connection
// runs in a worker thread, so that pcscd's presence polls are answered even
// while this process's main thread waits in a synchronous pcsclite call
// (virtual-card.ts). To run the cards in a process of their own instead:
// startEmulatorProcess (emulator-process.ts). Also here: readerSlots, the
// readers netpurse-emulator makes for card and PSAM files.

import { SoftwareCard } from "../../client/card/software-card.js";
import type { CardApplication } from "../../lib/apdu/transport.js";
import type { Logger } from "../../lib/log.js";
import { SoftwarePsam } from "../terminal/psam/software-psam.js";
import { Pcscd, pcscReaderName, virtualReaders, DEFAULT_PORT_BASE } from "./pcscd.js";
import { VirtualCard } from "./virtual-card.js";

/** A software card or PSAM file and the reader that serves it, as netpurse-emulator names and numbers them. */
export interface ReaderSlot {
  kind: "card" | "PSAM";
  file: string;
  /** reader.conf FRIENDLYNAME: "netpurse card N" or "netpurse PSAM N", each numbered from 1. */
  friendlyName: string;
  /** The PC/SC reader name: friendlyName + " 00 00". */
  name: string;
  port: number;
}

/** The readers for card and PSAM files: cards first, then PSAMs, ports from `portBase`, two apart. */
export function readerSlots(files: { cards?: string[]; psams?: string[] }, portBase = DEFAULT_PORT_BASE): ReaderSlot[] {
  const named = [
    ...(files.cards ?? []).map((file, i) => ({ kind: "card" as const, file, friendlyName: `netpurse card ${i + 1}` })),
    ...(files.psams ?? []).map((file, i) => ({ kind: "PSAM" as const, file, friendlyName: `netpurse PSAM ${i + 1}` })),
  ];
  const ports = virtualReaders(
    named.map((n) => n.friendlyName),
    portBase,
  );
  return named.map((n, i) => ({ ...n, name: pcscReaderName(n.friendlyName), port: ports[i]!.port }));
}

/** Opens the software card or PSAM a slot serves. */
export async function openSlot(slot: ReaderSlot): Promise<CardApplication> {
  return slot.kind === "card" ? SoftwareCard.open(slot.file) : SoftwarePsam.open(slot.file);
}

export interface EmulatedCard {
  /** The reader's name (reader.conf FRIENDLYNAME), e.g. "netpurse card 1"; PC/SC adds " 00 00". */
  name: string;
  app: CardApplication;
}

export interface EmulatedReader {
  /** The PC/SC reader name, as clients list it. */
  name: string;
  friendlyName: string;
  /** The vpcd port the card connects to on 127.0.0.1. */
  port: number;
  card: VirtualCard;
}

export interface EmulatedReaders {
  readers: EmulatedReader[];
  pcscd: Pcscd | undefined;
  close(): Promise<void>;
}

export interface EmulatedReadersOptions {
  dir: string;
  cards: EmulatedCard[];
  pcscd?: boolean;
  portBase?: number;
  shim?: boolean;
  log?: Logger;
  /** How long to wait for pcscd to see each card (ms, default 10 000). */
  readyTimeoutMs?: number;
}

export async function startEmulatedReaders(o: EmulatedReadersOptions): Promise<EmulatedReaders> {
  const layout = virtualReaders(
    o.cards.map((c) => c.name),
    o.portBase ?? DEFAULT_PORT_BASE,
  );
  const readers: EmulatedReader[] = layout.map((r, i) => ({
    name: pcscReaderName(r.name),
    friendlyName: r.name,
    port: r.port,
    card: new VirtualCard(o.cards[i]!.app, r.port, { name: r.name, ...(o.log ? { log: o.log } : {}) }),
  }));
  const pcscd = o.pcscd
    ? await Pcscd.start({ dir: o.dir, readers: layout, ...(o.shim === undefined ? {} : { shim: o.shim }), ...(o.log ? { log: o.log } : {}) })
    : undefined;
  const close = async () => {
    await Promise.all(readers.map((r) => r.card.remove()));
    await pcscd?.close();
  };
  for (const r of readers) r.card.insert();
  if (pcscd) {
    try {
      await Promise.all(readers.map((r) => r.card.whenReady(o.readyTimeoutMs)));
    } catch (e) {
      await close();
      throw e;
    }
  }
  return { readers, pcscd, close };
}
