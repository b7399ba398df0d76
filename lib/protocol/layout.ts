// Fixed byte layouts of the card and PSAM messages. Each message is declared
// once as an ordered list of fields; encoding, decoding, length checks and the
// tables in docs/apdu.md all follow from that one declaration.

export interface Field<T> {
  size: number;
  /** What the field holds, for error messages and documentation. */
  kind: string;
  write(value: T, buf: Buffer, offset: number): void;
  read(buf: Buffer, offset: number): T;
}

export class LayoutError extends Error {}

export const u8: Field<number> = {
  size: 1,
  kind: "uint8",
  write: (v, b, o) => void b.writeUInt8(v, o),
  read: (b, o) => b.readUInt8(o),
};

export const u16: Field<number> = {
  size: 2,
  kind: "uint16 big-endian",
  write: (v, b, o) => void b.writeUInt16BE(v, o),
  read: (b, o) => b.readUInt16BE(o),
};

export const u32: Field<number> = {
  size: 4,
  kind: "uint32 big-endian",
  write: (v, b, o) => void b.writeUInt32BE(v, o),
  read: (b, o) => b.readUInt32BE(o),
};

/** A non-negative safe integer as 8 bytes big-endian (batch totals). */
export const u64: Field<number> = {
  size: 8,
  kind: "uint64 big-endian",
  write: (v, b, o) => {
    if (!Number.isSafeInteger(v) || v < 0) throw new LayoutError(`not a non-negative safe integer: ${v}`);
    b.writeBigUInt64BE(BigInt(v), o);
  },
  read: (b, o) => {
    const v = b.readBigUInt64BE(o);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new LayoutError(`uint64 beyond 2^53: ${v}`);
    return Number(v);
  },
};

export function bytes(size: number): Field<Buffer> {
  return {
    size,
    kind: `${size} bytes`,
    write: (v, b, o) => {
      if (v.length !== size) throw new LayoutError(`expected ${size} bytes, got ${v.length}`);
      Buffer.from(v).copy(b, o);
    },
    read: (b, o) => Buffer.from(b.subarray(o, o + size)),
  };
}

/** A calendar date "YYYY-MM-DD" as 4 bytes of BCD YYYYMMDD. */
export const bcdDate: Field<string> = {
  size: 4,
  kind: "date, BCD YYYYMMDD",
  write: (v, b, o) => {
    const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(v);
    if (!m) throw new LayoutError(`not a YYYY-MM-DD date: ${v}`);
    Buffer.from(m[1]! + m[2]! + m[3]!, "hex").copy(b, o);
  },
  read: (b, o) => {
    const hex = b.subarray(o, o + 4).toString("hex");
    if (!/^\d{8}$/.test(hex)) throw new LayoutError(`not a BCD date: ${hex}`);
    return `${hex.slice(0, 4)}-${hex.slice(4, 6)}-${hex.slice(6, 8)}`;
  },
};

/** A UUID as its 16 bytes. */
export const uuid: Field<string> = {
  size: 16,
  kind: "UUID, 16 bytes",
  write: (v, b, o) => uuidToBytes(v).copy(b, o),
  read: (b, o) => bytesToUuid(b.subarray(o, o + 16)),
};

/** An ASCII identifier of up to `size` characters, padded with zero bytes. */
export function ascii(size: number): Field<string> {
  return {
    size,
    kind: `ASCII, ${size} bytes zero-padded`,
    write: (v, b, o) => {
      const raw = Buffer.from(v, "ascii");
      if (raw.length > size || !/^[\x20-\x7e]*$/.test(v)) throw new LayoutError(`not ASCII of at most ${size} characters: ${v}`);
      b.fill(0, o, o + size);
      raw.copy(b, o);
    },
    read: (b, o) => {
      const raw = b.subarray(o, o + size);
      const end = raw.indexOf(0);
      return raw.subarray(0, end < 0 ? size : end).toString("ascii");
    },
  };
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

export function isUuid(s: string): boolean {
  return UUID_RE.test(s);
}

function uuidToBytes(s: string): Buffer {
  if (!isUuid(s)) throw new LayoutError(`not a canonical lower-case UUID: ${s}`);
  return Buffer.from(s.replace(/-/g, ""), "hex");
}

function bytesToUuid(b: Uint8Array): string {
  const h = Buffer.from(b).toString("hex");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

// A field's value type is read back with `infer`, which needs `any` here: Field<unknown> would
// not accept a Field<number> (its encode takes the narrower type).
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Fields = Record<string, Field<any>>;
export type Value<F extends Fields> = { [K in keyof F]: F[K] extends Field<infer T> ? T : never };

export interface Layout<F extends Fields> {
  name: string;
  fields: F;
  size: number;
  encode(value: Value<F>): Buffer;
  decode(buf: Uint8Array): Value<F>;
  /** Byte offset of a field, for documentation and targeted edits (step 618). */
  offset(field: keyof F): number;
}

/** Declares a fixed layout; field order is the byte order. */
export function layout<F extends Fields>(name: string, fields: F): Layout<F> {
  const entries = Object.entries(fields);
  const offsets = new Map<string, number>();
  let size = 0;
  for (const [k, f] of entries) {
    offsets.set(k, size);
    size += f.size;
  }
  return {
    name,
    fields,
    size,
    encode(value) {
      const buf = Buffer.alloc(size);
      for (const [k, f] of entries) {
        try {
          f.write((value as Record<string, unknown>)[k], buf, offsets.get(k)!);
        } catch (e) {
          throw new LayoutError(`${name}.${k}: ${(e as Error).message}`);
        }
      }
      return buf;
    },
    decode(input) {
      const buf = Buffer.from(input);
      if (buf.length !== size) throw new LayoutError(`${name} must be ${size} bytes, got ${buf.length}`);
      const out: Record<string, unknown> = {};
      for (const [k, f] of entries) {
        try {
          out[k] = f.read(buf, offsets.get(k)!);
        } catch (e) {
          throw new LayoutError(`${name}.${k}: ${(e as Error).message}`);
        }
      }
      return out as Value<F>;
    },
    offset(field) {
      return offsets.get(field as string)!;
    },
  };
}
