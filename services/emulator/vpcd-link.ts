// The card's end of its vpcd connection, in a worker thread of its own (see
// virtual-card.ts for why): connects to vpcd, reconnects with a back-off
// while the card is in, answers vpcd's controls itself (get ATR from the ATR
// it was given; power off, on and reset are passed on so that the card
// application forgets its session), and passes each command APDU to the card
// application on the main thread, one at a time, in order.

import { connect, type Socket } from "node:net";
import { parentPort, workerData } from "node:worker_threads";
import { FrameReader, MAX_COMMAND_BYTES, VpcdControl, vpcdFrame, type Frame } from "./vpcd-frames.js";

/** What the main thread sends the link. */
export type ToLink = { type: "response"; seq: number; bytes: Uint8Array } | { type: "atr"; atr: Uint8Array } | { type: "stop" };

/** What the link tells the main thread. */
export type FromLink =
  | { type: "connect" }
  | { type: "ready" }
  | { type: "disconnect"; reason: string }
  | { type: "power"; control: number }
  | { type: "apdu"; seq: number; bytes: Uint8Array }
  | { type: "refused"; frame: string; answered: string };

export interface LinkData {
  host: string;
  port: number;
  atr: Uint8Array;
  minBackoffMs: number;
  maxBackoffMs: number;
}

/** 6700, wrong length: what an oversized frame gets. */
const WRONG_LENGTH = Buffer.from([0x67, 0x00]);

function runLink(port: NonNullable<typeof parentPort>, data: LinkData): void {
  const post = (m: FromLink) => port.postMessage(m);
  let atr = Buffer.from(data.atr);
  let wanted = true;
  let socket: Socket | undefined;
  let timer: NodeJS.Timeout | undefined;
  let backoffMs = data.minBackoffMs;
  let seq = 0;
  /** APDUs given to the card application, by sequence number, waiting for its answer. */
  const pending = new Map<number, (answer: Buffer | undefined) => void>();

  port.on("message", (m: ToLink) => {
    if (m.type === "response") {
      pending.get(m.seq)?.(Buffer.from(m.bytes));
      pending.delete(m.seq);
    } else if (m.type === "atr") {
      atr = Buffer.from(m.atr);
    } else {
      wanted = false;
      clearTimeout(timer);
      if (socket) socket.destroy();
      else port.close();
    }
  });

  const dial = () => {
    timer = undefined;
    if (!wanted) return;
    const s = connect({ host: data.host, port: data.port, noDelay: true });
    socket = s;
    const frames = new FrameReader();
    let work: Promise<void> = Promise.resolve();
    let connected = false;
    let ready = false;
    let reason = "closed by vpcd";
    s.on("connect", () => {
      connected = true;
      post({ type: "connect" });
    });
    s.on("data", (chunk: Buffer) => {
      for (const frame of frames.push(chunk)) {
        work = work.then(async () => {
          if (s.destroyed) return;
          if (!ready) {
            ready = true;
            backoffMs = data.minBackoffMs;
            post({ type: "ready" });
          }
          const answer = await handle(frame);
          if (answer && !s.destroyed) s.write(vpcdFrame(answer));
        });
      }
    });
    s.on("error", (e: NodeJS.ErrnoException) => {
      reason = e.code ?? e.message;
    });
    s.on("close", () => {
      if (socket === s) socket = undefined;
      // Answers still owed to this connection go nowhere.
      for (const resolve of pending.values()) resolve(undefined);
      pending.clear();
      if (!wanted) reason = "removed";
      if (connected) post({ type: "disconnect", reason });
      if (!wanted) {
        port.close();
        return;
      }
      // Refused (pcscd not up yet) or dropped (pcscd stopped): try again, a little later each time.
      timer = setTimeout(dial, backoffMs);
      backoffMs = Math.min(backoffMs * 2, data.maxBackoffMs);
    });
  };

  /** The answer to one frame, if it gets one. */
  const handle = async (frame: Frame): Promise<Buffer | undefined> => {
    if (frame.kind === "oversized") {
      post({ type: "refused", frame: `a ${frame.length}-byte frame, longer than any short command APDU (${MAX_COMMAND_BYTES})`, answered: "6700" });
      return WRONG_LENGTH;
    }
    const payload = frame.bytes;
    if (payload.length === 0) {
      post({ type: "refused", frame: "an empty frame", answered: "nothing" });
      return undefined;
    }
    if (payload.length === 1) {
      const control = payload[0]!;
      switch (control) {
        case VpcdControl.POWER_OFF:
        case VpcdControl.POWER_ON:
        case VpcdControl.RESET:
          post({ type: "power", control });
          return undefined;
        case VpcdControl.GET_ATR:
          // vpcd polls presence with this, often: answered here, never a reset.
          return atr;
        default:
          post({ type: "refused", frame: `unknown control byte ${payload.toString("hex")}`, answered: "nothing" });
          return undefined;
      }
    }
    const id = ++seq;
    return new Promise<Buffer | undefined>((resolve) => {
      pending.set(id, resolve);
      post({ type: "apdu", seq: id, bytes: payload });
    });
  };

  dial();
}

if (parentPort) runLink(parentPort, workerData as LinkData);
