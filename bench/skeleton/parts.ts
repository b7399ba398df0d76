// What the skeleton's processes share: their gRPC services (raw bytes, the
// shapes ts-proto generates, so the project's own server bootstrap and
// client factory take them), the frames on the two streams, the durable
// append, the count of what each server received, and the security each
// process takes from its options.

import { randomBytes } from "node:crypto";
import { open, type FileHandle } from "node:fs/promises";
import type { Channel } from "nice-grpc";
import { clientFactory } from "../../lib/grpc/client.js";
import { invalidField } from "../../lib/grpc/errors.js";
import { service, type ServiceEntry, type Transport } from "../../lib/grpc/server.js";
import type { Kind } from "../../lib/pki/identity.js";
import { Security, type ChannelSecurity } from "../../lib/pki/security.js";
import { countFsync } from "../../lib/stats.js";
import { RawBytes } from "../raw-bytes.js";
import { SKELETON_MODES, type SkeletonMode, type Task } from "./wire.js";

const unary = (name: string) => ({ name, requestType: RawBytes, requestStream: false, responseType: RawBytes, responseStream: false, options: {} }) as const;
const bidi = (name: string) => ({ name, requestType: RawBytes, requestStream: true, responseType: RawBytes, responseStream: true, options: {} }) as const;

export const SkeletonMerchantDefinition = {
  name: "Merchant",
  fullName: "netpurse.bench.skeleton.Merchant",
  methods: { createOrder: unary("CreateOrder"), completeOrder: unary("CompleteOrder") },
} as const;

export const SkeletonValidationDefinition = {
  name: "Validation",
  fullName: "netpurse.bench.skeleton.Validation",
  methods: { issueTransactionKeys: unary("IssueTransactionKeys"), validateConfirmation: unary("ValidateConfirmation") },
} as const;

export const SkeletonPaymentDefinition = {
  name: "Payment",
  fullName: "netpurse.bench.skeleton.Payment",
  methods: { processDrawRequest: unary("ProcessDrawRequest"), completePurchase: unary("CompletePurchase") },
} as const;

export const SkeletonConcentratorDefinition = {
  name: "Concentrator",
  fullName: "netpurse.bench.skeleton.Concentrator",
  methods: { attachTerminal: bidi("AttachTerminal"), connectPaymentServer: bidi("ConnectPaymentServer") },
} as const;

/** Every skeleton server also answers what it has counted so far, as JSON, to an operator. */
export const TallyDefinition = {
  name: "Tally",
  fullName: "netpurse.bench.skeleton.Tally",
  methods: { read: unary("Read") },
} as const;

/** What a server received, by name (bench/skeleton/wire.ts tallyKey): calls at their callee, stream messages at the concentrator. */
export class Tally {
  private readonly counts: Record<string, number> = {};

  add(key: string): void {
    this.counts[key] = (this.counts[key] ?? 0) + 1;
  }

  service(): ServiceEntry {
    return service(TallyDefinition, { read: async () => Buffer.from(JSON.stringify(this.counts)) }, { all: ["operator"] });
  }
}

/** Reads a skeleton server's tally. */
export async function readTally(channel: Channel): Promise<Record<string, number>> {
  const answer = await clientFactory().create(TallyDefinition, channel).read(new Uint8Array(), { deadline: 5_000 });
  return JSON.parse(Buffer.from(answer).toString("utf8")) as Record<string, number>;
}

/**
 * An append-only file whose every record is on disk before the append
 * resolves: one write, one fdatasync, counted as a durable sync
 * (lib/stats.ts). Appends are not grouped: each is its own sync, so the
 * count per purchase is exact.
 */
export class DurableLog {
  private readonly records = new Map<number, Buffer>();

  private constructor(private readonly file: FileHandle) {}

  static async open(path: string): Promise<DurableLog> {
    return new DurableLog(await open(path, "a", 0o600));
  }

  async append(bytes: number): Promise<void> {
    let record = this.records.get(bytes);
    if (!record) {
      record = randomBytes(bytes);
      this.records.set(bytes, record);
    }
    await this.file.write(record);
    await this.file.datasync();
    countFsync();
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** A message of `bytes` bytes that starts with `head` (the bytes the skeleton reads), the rest random, as a sealed message would be. */
export function padded(head: Uint8Array, bytes: number): Buffer {
  const out = randomBytes(Math.max(bytes, head.length));
  out.set(head, 0);
  return out;
}

/** The transaction id a call carries in its first 16 bytes (the offer's, made by the merchant's CreateOrder). */
export function transactionOf(request: Uint8Array): string {
  if (request.length < 16) throw invalidField("request", `must start with a 16-byte transaction id, got ${request.length} bytes`);
  return Buffer.from(request.subarray(0, 16)).toString("hex");
}

// ---- the frames on the two streams -------------------------------------------
//
// byte 0 what (Frame), byte 1 the task, bytes 2-3 the PSAM slot (or, in a hello
// or welcome, the number of slots), bytes 4-7 the job id; the rest pads the
// frame to the real message's size.

export const Frame = { HELLO: 1, WELCOME: 2, JOB: 3, RESULT: 4, RELEASE: 5 } as const;
export type FrameKind = (typeof Frame)[keyof typeof Frame];

const TASKS: Task[] = ["issue", "verify"];

export interface Framed {
  kind: FrameKind;
  task: Task | undefined;
  slot: number;
  job: number;
}

export function frame(f: Framed, bytes: number): Buffer {
  const head = Buffer.alloc(8);
  head[0] = f.kind;
  head[1] = f.task === undefined ? 0 : TASKS.indexOf(f.task) + 1;
  head.writeUInt16BE(f.slot, 2);
  head.writeUInt32BE(f.job, 4);
  return padded(head, bytes);
}

export function unframe(b: Uint8Array): Framed {
  if (b.length < 8) throw new Error(`a skeleton frame has at least 8 bytes, got ${b.length}`);
  const v = Buffer.from(b.buffer, b.byteOffset, b.length);
  return { kind: v.readUInt8(0) as FrameKind, task: TASKS[v.readUInt8(1) - 1], slot: v.readUInt16BE(2), job: v.readUInt32BE(4) };
}

// ---- options every skeleton process takes ----------------------------------------

export const SKELETON_OPTIONS = { pki: { type: "string" }, mode: { type: "string" } } as const;

export const SKELETON_HELP = [
  "  --pki DIR                TLS as the network runs it, with the identities in DIR (a throwaway CA the benchmark",
  "                           made); without it, plaintext on loopback",
  `  --mode MODE              ${SKELETON_MODES.join(" or ")} (default PSAM_VERIFIES): which purchase's sizes and steps`,
].join("\n");

export function modeOption(values: Record<string, unknown>): SkeletonMode {
  const m = values.mode ?? "PSAM_VERIFIES";
  const mode = SKELETON_MODES.find((x) => x === m);
  if (!mode) throw new Error(`--mode must be one of ${SKELETON_MODES.join(", ")}, got ${JSON.stringify(m)}`);
  return mode;
}

/** The identities of the skeleton's processes: the kinds the real parts have. */
export const SKELETON_IDENTITIES = {
  concentrator: { kind: "concentrator", id: "concentrator-1" },
  terminal: { kind: "terminal", id: "terminal-1" },
  payment: { kind: "payment", id: "payment-1" },
  validation: { kind: "validation", id: "validation-1" },
  operator: { kind: "operator", id: "operator" },
  merchant: (merchantId: string) => ({ kind: "merchant", id: merchantId }),
} as const satisfies Record<string, { kind: Kind; id: string } | ((id: string) => { kind: Kind; id: string })>;

/** A process's links: TLS as its identity with the PKI folder's certificates, or plaintext on loopback. */
export class SkeletonSecurity {
  private constructor(private readonly security: Security | undefined) {}

  static async of(values: Record<string, unknown>, identity: { kind: Kind; id: string }): Promise<SkeletonSecurity> {
    const pki = values.pki;
    return new SkeletonSecurity(typeof pki === "string" ? await Security.forService(pki, identity) : undefined);
  }

  /** Its server: client certificates required inside the operator's network, asked for where cardholders call, as the real part's. */
  server(clientCerts: "require" | "request"): Transport {
    return this.security ? this.security.server(clientCerts) : { local: true };
  }

  /** A channel to a server that must prove it is of `kind`. */
  channel(kind: Kind): ChannelSecurity {
    return this.security ? this.security.channel({ kind }) : { insecure: true };
  }
}
