// vsmartcard vpcd's framing, shared by the card's link (vpcd-link.ts) and
// the tests' fake vpcd: each frame is a 2-byte big-endian length and a
// payload. A 1-byte payload is a control, a longer one an APDU.

/** The longest short command APDU: header, Lc, 255 bytes of data, Le. Anything longer is answered 6700 unread. */
export const MAX_COMMAND_BYTES = 4 + 1 + 255 + 1;

/** vpcd's controls: power off, power on, reset (no answer), get ATR (answered with the ATR). */
export const VpcdControl = { POWER_OFF: 0x00, POWER_ON: 0x01, RESET: 0x02, GET_ATR: 0x04 } as const;

/** What arrives from vpcd: a payload, or a frame too long to be a command, skipped without being buffered. */
export type Frame = { kind: "payload"; bytes: Buffer } | { kind: "oversized"; length: number };

/** Splits vpcd's byte stream into frames, holding at most one frame of `maxPayload` bytes. */
export class FrameReader {
  private buffered = Buffer.alloc(0);
  /** Bytes still to drop of an oversized frame. */
  private skipping = 0;

  constructor(private readonly maxPayload = MAX_COMMAND_BYTES) {}

  push(chunk: Buffer): Frame[] {
    let data = chunk;
    if (this.skipping > 0) {
      const n = Math.min(this.skipping, data.length);
      this.skipping -= n;
      data = data.subarray(n);
    }
    let b = this.buffered.length > 0 ? Buffer.concat([this.buffered, data]) : data;
    const frames: Frame[] = [];
    while (b.length >= 2) {
      const length = b.readUInt16BE(0);
      if (length > this.maxPayload) {
        frames.push({ kind: "oversized", length });
        const n = Math.min(b.length - 2, length);
        this.skipping = length - n;
        b = b.subarray(2 + n);
        continue;
      }
      if (b.length < 2 + length) break;
      frames.push({ kind: "payload", bytes: Buffer.from(b.subarray(2, 2 + length)) });
      b = b.subarray(2 + length);
    }
    // A copy, so that a large chunk is not kept alive by the few bytes left of it.
    this.buffered = Buffer.from(b);
    return frames;
  }
}

/** One frame to vpcd: 2-byte big-endian length, then the payload. */
export function vpcdFrame(payload: Uint8Array): Buffer {
  const out = Buffer.alloc(2 + payload.length);
  out.writeUInt16BE(payload.length, 0);
  out.set(payload, 2);
  return out;
}
