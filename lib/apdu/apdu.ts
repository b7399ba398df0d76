// ISO/IEC 7816-4 command and response APDUs (short form only: Lc, Le <= 256).

/** Status words used by netpurse's card and PSAM applications (docs/apdu.md). */
export const SW = {
  OK: 0x9000,
  WRONG_LENGTH: 0x6700,
  SECURITY_STATUS_NOT_SATISFIED: 0x6982,
  CONDITIONS_NOT_SATISFIED: 0x6985,
  WRONG_DATA: 0x6a80,
  FUNCTION_NOT_SUPPORTED: 0x6a81,
  FILE_NOT_FOUND: 0x6a82,
  RECORD_NOT_FOUND: 0x6a83,
  NOT_ENOUGH_MEMORY: 0x6a84,
  WRONG_P1P2: 0x6a86,
  REFERENCED_DATA_NOT_FOUND: 0x6a88,
  INS_NOT_SUPPORTED: 0x6d00,
  CLA_NOT_SUPPORTED: 0x6e00,
  // Proprietary (ISO leaves 9XXX to applications): a PSAM's refusals of a card.
  CARD_EXPIRED: 0x9401,
  CURRENCY_NOT_ACCEPTED: 0x9402,
  CARD_BLOCKED: 0x9403,
  INSUFFICIENT_BALANCE: 0x9404,
  AMOUNT_OUT_OF_RANGE: 0x9405,
  BATCH_FULL: 0x9406,
  TOO_MANY_OPEN_DEBITS: 0x9407,
} as const;

export type StatusWord = number;

export function swHex(sw: StatusWord): string {
  return sw.toString(16).toUpperCase().padStart(4, "0");
}

export interface CommandApdu {
  cla: number;
  ins: number;
  p1: number;
  p2: number;
  data: Buffer;
  /** Expected response length; undefined for none, 256 for "as much as there is" (encoded 00). */
  le?: number;
}

export interface ResponseApdu {
  data: Buffer;
  sw: StatusWord;
}

/** Raised when a command's bytes are not a well-formed short APDU. */
export class MalformedApdu extends Error {}

export function encodeCommand(c: CommandApdu): Buffer {
  if (c.data.length > 255) throw new RangeError(`APDU data too long for short form: ${c.data.length}`);
  const parts: number[] = [c.cla, c.ins, c.p1, c.p2];
  if (c.data.length > 0) parts.push(c.data.length);
  const head = Buffer.from(parts);
  const le = c.le === undefined ? Buffer.alloc(0) : Buffer.from([c.le === 256 ? 0 : c.le]);
  return Buffer.concat([head, c.data, le]);
}

export function decodeCommand(bytes: Uint8Array): CommandApdu {
  const b = Buffer.from(bytes);
  if (b.length < 4) throw new MalformedApdu(`APDU shorter than its header: ${b.length} bytes`);
  const [cla, ins, p1, p2] = [b[0]!, b[1]!, b[2]!, b[3]!];
  if (b.length === 4) return { cla, ins, p1, p2, data: Buffer.alloc(0) }; // case 1
  if (b.length === 5) return { cla, ins, p1, p2, data: Buffer.alloc(0), le: b[4] === 0 ? 256 : b[4] }; // case 2
  const lc = b[4]!;
  if (lc === 0) throw new MalformedApdu("extended-length APDUs are not supported");
  if (b.length === 5 + lc) return { cla, ins, p1, p2, data: b.subarray(5, 5 + lc) }; // case 3
  if (b.length === 6 + lc) return { cla, ins, p1, p2, data: b.subarray(5, 5 + lc), le: b[5 + lc] === 0 ? 256 : b[5 + lc] }; // case 4
  throw new MalformedApdu(`APDU length ${b.length} does not match Lc ${lc}`);
}

export function encodeResponse(r: ResponseApdu): Buffer {
  const out = Buffer.alloc(r.data.length + 2);
  r.data.copy(out);
  out.writeUInt16BE(r.sw, r.data.length);
  return out;
}

export function decodeResponse(bytes: Uint8Array): ResponseApdu {
  const b = Buffer.from(bytes);
  if (b.length < 2) throw new MalformedApdu(`response shorter than a status word: ${b.length} bytes`);
  return { data: b.subarray(0, b.length - 2), sw: b.readUInt16BE(b.length - 2) };
}

/** A response carrying only a status word. */
export function status(sw: StatusWord): ResponseApdu {
  return { data: Buffer.alloc(0), sw };
}

/** Thrown inside a card application to answer with an error status word. */
export class ApduError extends Error {
  constructor(
    readonly sw: StatusWord,
    message: string,
  ) {
    super(`${message} (SW ${swHex(sw)})`);
  }
}

/** ISO SELECT by DF name (AID). */
export function selectCommand(aid: Uint8Array): CommandApdu {
  return { cla: 0x00, ins: 0xa4, p1: 0x04, p2: 0x00, data: Buffer.from(aid), le: 256 };
}

/** Builds an ATR for T=1 with the given historical bytes, TCK included. */
export function buildAtr(historical: Uint8Array): Buffer {
  if (historical.length > 15) throw new RangeError("at most 15 historical bytes");
  // TS=3B (direct convention), T0 announces TD1 and the historical bytes,
  // TD1=80 announces TD2 (T=0), TD2=01 says T=1, then TCK.
  const body = Buffer.concat([Buffer.from([0x80 | historical.length, 0x80, 0x01]), Buffer.from(historical)]);
  let tck = 0;
  for (const b of body) tck ^= b;
  return Buffer.concat([Buffer.from([0x3b]), body, Buffer.from([tck])]);
}
