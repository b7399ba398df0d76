// The emulator in a process of its own, driven over its IPC channel. A
// process that uses the pcsclite binding must not serve the emulated cards
// itself: the binding calls pcscd synchronously on the JavaScript thread
// (SCardEstablishContext when a context is made, SCardCancel and
// SCardReleaseContext when one is closed), and pcscd can make such a call
// wait until a card has answered vpcd (it does at start-up, while it polls
// each reader once): the card, on the same blocked thread, never answers.
// So tests and benchmarks that use pcsclite run the cards here, in a child.
//
//   const e = await startEmulatorProcess({ dir, cards: [cardFile], psams: [psamFile], pcscd: true });
//   e.readers     // [{ kind, file, friendlyName, name /* PC/SC */, port }], as netpurse-emulator numbers them
//   e.pcscd       // Pcscd (stop, restart, pid) when pcscd: true: run by THIS process, not the child
//   await e.control.remove("netpurse card 1 00 00"); await e.control.insert(...); await e.control.whenReady();
//   await e.close()
//
// The control requests work on any netpurse-emulator started with an IPC
// channel (the Launcher's children have one): EmulatorControl wraps the
// ChildProcess. "restartPcscd" needs the child to run pcscd (--pcscd).

import type { ChildProcess } from "node:child_process";
import { join } from "node:path";
import type { Logger } from "../../lib/log.js";
import { Launcher, SCRIPTS } from "../network/launcher.js";
import { readerSlots, type EmulatedReaders, type ReaderSlot } from "./emulator.js";
import { Pcscd, virtualReaders, DEFAULT_PORT_BASE } from "./pcscd.js";

export type EmulatorRequest =
  | { id: number; op: "remove" | "insert" | "whenReady"; reader?: string }
  | { id: number; op: "takeOutAfter"; reader?: string; ins: number }
  | { id: number; op: "restartPcscd" };
export type EmulatorReply = { id: number; ok: true } | { id: number; ok: false; error: string };

function isRequest(m: unknown): m is EmulatorRequest {
  const r = m as Partial<EmulatorRequest> | null;
  return (
    typeof r === "object" &&
    r !== null &&
    typeof r.id === "number" &&
    ["remove", "insert", "whenReady", "takeOutAfter", "restartPcscd"].includes(r.op as string)
  );
}

/** In netpurse-emulator: answers control requests on its IPC channel, if it has one. Returns how to stop. */
export function serveControl(emulated: EmulatedReaders): () => void {
  if (!process.send) return () => {};
  const cards = (reader: string | undefined) => {
    const found = emulated.readers.filter((r) => reader === undefined || r.name === reader || r.friendlyName === reader);
    if (found.length === 0) throw new Error(`no reader ${JSON.stringify(reader)}; the readers: ${emulated.readers.map((r) => r.name).join(", ")}`);
    return found.map((r) => r.card);
  };
  const handle = async (req: EmulatorRequest): Promise<void> => {
    switch (req.op) {
      case "remove":
        await Promise.all(cards(req.reader).map((c) => c.remove()));
        return;
      case "insert":
        for (const c of cards(req.reader)) c.insert();
        return;
      case "whenReady":
        await Promise.all(cards(req.reader).map((c) => c.whenReady()));
        return;
      case "takeOutAfter":
        for (const c of cards(req.reader)) c.takeOutAfter(req.ins);
        return;
      case "restartPcscd":
        if (!emulated.pcscd) throw new Error("this emulator runs no pcscd (start it with --pcscd DIR)");
        await emulated.pcscd.restart();
        return;
    }
  };
  const onMessage = (m: unknown) => {
    if (!isRequest(m)) return;
    handle(m).then(
      () => process.send?.({ id: m.id, ok: true } satisfies EmulatorReply),
      (e: unknown) => process.send?.({ id: m.id, ok: false, error: (e as Error).message } satisfies EmulatorReply),
    );
  };
  process.on("message", onMessage);
  return () => process.off("message", onMessage);
}

/** The parent's side: requests to a netpurse-emulator child over its IPC channel. */
export class EmulatorControl {
  private next = 1;

  constructor(private readonly child: ChildProcess) {}

  /** Takes the card out of `reader` (PC/SC or friendly name; every reader if undefined). */
  remove(reader?: string): Promise<void> {
    return this.request({ op: "remove", ...(reader === undefined ? {} : { reader }) });
  }

  /** Puts the card back. */
  insert(reader?: string): Promise<void> {
    return this.request({ op: "insert", ...(reader === undefined ? {} : { reader }) });
  }

  /** Waits until vpcd talks to the card (each card if undefined). */
  whenReady(reader?: string): Promise<void> {
    return this.request({ op: "whenReady", ...(reader === undefined ? {} : { reader }) });
  }

  /** Fault injection: the card in `reader` is taken out after its next command with this INS, before it answers. */
  takeOutAfter(reader: string, ins: number): Promise<void> {
    return this.request({ op: "takeOutAfter", reader, ins });
  }

  /** Restarts the pcscd the child runs (--pcscd). */
  restartPcscd(): Promise<void> {
    return this.request({ op: "restartPcscd" });
  }

  private request(r: { op: EmulatorRequest["op"]; reader?: string; ins?: number }, timeoutMs = 30_000): Promise<void> {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      const done = (e?: Error) => {
        clearTimeout(timer);
        this.child.off("message", onMessage);
        this.child.off("exit", onExit);
        if (e) reject(e);
        else resolve();
      };
      const onMessage = (m: unknown) => {
        const reply = m as Partial<EmulatorReply>;
        if (reply?.id !== id) return;
        done(reply.ok ? undefined : new Error(`netpurse-emulator: ${(reply as { error?: string }).error ?? "failed"}`));
      };
      const onExit = () => done(new Error(`netpurse-emulator exited before it answered ${r.op}`));
      const timer = setTimeout(() => done(new Error(`netpurse-emulator did not answer ${r.op} within ${timeoutMs} ms`)), timeoutMs);
      this.child.on("message", onMessage);
      this.child.once("exit", onExit);
      this.child.send({ id, ...r });
    });
  }
}

export interface EmulatorProcess {
  readers: ReaderSlot[];
  /** The pcscd this process runs for the child's readers (pcscd: true), else undefined. */
  pcscd: Pcscd | undefined;
  control: EmulatorControl;
  pid: number | undefined;
  /** Where the child's output goes. */
  logFile: string;
  /** Stops the child (its cards leave the readers), then pcscd. */
  close(): Promise<void>;
}

/**
 * Starts netpurse-emulator as a child for card and PSAM files. With pcscd: true this process runs
 * pcscd (shim as asked, default on) in `dir` and returns once pcscd sees every card. `dir` holds
 * pcscd's folder (dir/pcscd) and the child's log (dir/logs).
 */
export async function startEmulatorProcess(o: {
  dir: string;
  cards?: string[];
  psams?: string[];
  pcscd?: boolean;
  portBase?: number;
  shim?: boolean;
  log?: Logger;
}): Promise<EmulatorProcess> {
  const portBase = o.portBase ?? DEFAULT_PORT_BASE;
  const readers = readerSlots({ ...(o.cards ? { cards: o.cards } : {}), ...(o.psams ? { psams: o.psams } : {}) }, portBase);
  const pcscd = o.pcscd
    ? await Pcscd.start({
        dir: join(o.dir, "pcscd"),
        readers: virtualReaders(
          readers.map((r) => r.friendlyName),
          portBase,
        ),
        ...(o.shim === undefined ? {} : { shim: o.shim }),
        ...(o.log ? { log: o.log } : {}),
      })
    : undefined;
  const launcher = new Launcher(join(o.dir, "logs"));
  const close = async () => {
    await launcher.stopAll();
    await pcscd?.close();
  };
  try {
    const args = [...readers.flatMap((r) => [r.kind === "card" ? "--card" : "--psam", r.file]), "--port-base", String(portBase)];
    const started = await launcher.start("emulator", SCRIPTS.emulator, args);
    const control = new EmulatorControl(started.child);
    if (pcscd) await control.whenReady();
    return { readers, pcscd, control, pid: started.child.pid, logFile: started.logFile, close };
  } catch (e) {
    await close();
    throw e;
  }
}
