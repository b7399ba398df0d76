// What one purchase does on the wire and on disk, per confirmation mode: the
// protocol skeleton makes exactly these calls, stream messages and durable
// appends, of these sizes. The sizes are the encoded messages of a real
// purchase (test/bench/skeleton.test.ts measures them again and fails when
// the protocol has moved away from this table); the appends are the commits
// recovery depends on (bench/README.md, "The protocol skeleton", says why
// each one and no other).

import { DEMO_SHOPS } from "../../services/network/layout.js";
import { PROCESS } from "../network.js";

/** The modes the skeleton runs: the PSAM held across the cardholder's round trip, and the early-release mode with two round trips. */
export const SKELETON_MODES = ["PSAM_VERIFIES", "SERVER_COMPARES"] as const;
export type SkeletonMode = (typeof SKELETON_MODES)[number];

/** The demo shop of a mode: its merchant id names the merchant process, as in the stack suite. */
export function skeletonShop(mode: SkeletonMode): string {
  const shop = DEMO_SHOPS.find((d) => d.shop.confirmationMode === `CONFIRMATION_MODE_${mode}`)?.shop;
  if (!shop) throw new Error(`no demo shop in mode ${mode}`);
  return shop.merchantId;
}

/** The processes of a purchase, named as the stack suite names them (bench/network.ts PROCESS), so their figures compare row by row. */
export function skeletonProcesses(mode: SkeletonMode) {
  return {
    concentrator: PROCESS.concentrator,
    terminal: PROCESS.terminal,
    payment: PROCESS.payment,
    validation: PROCESS.validation,
    merchant: `merchant-${skeletonShop(mode)}`,
    /** The benchmark process: the cardholders and their cards. */
    bench: PROCESS.bench,
  } as const;
}

export type SkeletonRole = keyof ReturnType<typeof skeletonProcesses>;

/** A unary call of one purchase, as encoded on the wire (bytes of the protobuf message, before gRPC's 5-byte frame). */
export interface UnaryCall {
  caller: SkeletonRole;
  callee: SkeletonRole;
  /** The real RPC's method name; the skeleton's method has the same name. */
  method: "CreateOrder" | "IssueTransactionKeys" | "ProcessDrawRequest" | "CompletePurchase" | "CompleteOrder" | "ValidateConfirmation";
  requestBytes: number;
  responseBytes: number;
  /** On the timed path of the purchase (the offer, CreateOrder and the key it asks for, is made before the clock starts, as in the stack suite). */
  timed: boolean;
}

/** The PSAM jobs of a purchase: the DEBIT command, and the check of the card's answer. */
export type Task = "issue" | "verify";

/** A message on one of the two long-lived streams (payment server ↔ concentrator ↔ terminal host). */
export interface StreamMessage {
  from: SkeletonRole;
  to: SkeletonRole;
  kind: "job" | "result" | "release";
  /** The job's task, for jobs and results. */
  task?: Task;
  bytes: number;
}

/** One fdatasync'd append a process makes per purchase, and what it makes durable. */
export interface DurableAppend {
  process: SkeletonRole;
  /** The state change it stands for. */
  step: string;
  /** The record's size: the fields that step writes in the real service (columns and event row, or the JSON record). */
  bytes: number;
}

export interface PurchaseWire {
  calls: UnaryCall[];
  messages: StreamMessage[];
  appends: DurableAppend[];
}

/** A job and its result from the payment server to the terminal host and back: four messages. */
function job(task: Task, sizes: { job: [number, number]; result: [number, number] }): StreamMessage[] {
  return [
    { from: "payment", to: "concentrator", kind: "job", task, bytes: sizes.job[0] },
    { from: "concentrator", to: "terminal", kind: "job", task, bytes: sizes.job[1] },
    { from: "terminal", to: "concentrator", kind: "result", task, bytes: sizes.result[0] },
    { from: "concentrator", to: "payment", kind: "result", task, bytes: sizes.result[1] },
  ];
}

const RELEASE: StreamMessage = { from: "payment", to: "concentrator", kind: "release", bytes: 22 };

/** The appends every mode shares: the card's, the merchant's and the PSAM's. */
const COMMON_APPENDS: DurableAppend[] = [
  { process: "merchant", step: "order created (CreateOrder, before the offer leaves)", bytes: 120 },
  { process: "terminal", step: "PSAM: DRAW, its counter and the open debit (before the DEBIT command leaves the PSAM)", bytes: 240 },
  { process: "bench", step: "card: DEBIT, balance, counter and log record (before the card answers)", bytes: 240 },
  { process: "terminal", step: "PSAM: VERIFY DEBIT, the batch record (before the verdict leaves the PSAM)", bytes: 345 },
  { process: "merchant", step: "order paid, its receipt (before the goods are released)", bytes: 240 },
];

/**
 * Measured on a real purchase of a song (test/bench/skeleton.test.ts, TLS
 * on, the card's log full at 4 records, one purchase at a time): the demo
 * shop of each mode, demo-shop and server-shop, whose ids differ in length.
 */
export const PURCHASE: Record<SkeletonMode, PurchaseWire> = {
  PSAM_VERIFIES: {
    calls: [
      { caller: "bench", callee: "merchant", method: "CreateOrder", requestBytes: 8, responseBytes: 321, timed: false },
      { caller: "merchant", callee: "validation", method: "IssueTransactionKeys", requestBytes: 76, responseBytes: 156, timed: false },
      { caller: "bench", callee: "payment", method: "ProcessDrawRequest", requestBytes: 551, responseBytes: 158, timed: true },
      { caller: "bench", callee: "payment", method: "CompletePurchase", requestBytes: 115, responseBytes: 264, timed: true },
      { caller: "bench", callee: "merchant", method: "CompleteOrder", requestBytes: 177, responseBytes: 218, timed: true },
      { caller: "merchant", callee: "validation", method: "ValidateConfirmation", requestBytes: 219, responseBytes: 78, timed: true },
    ],
    // The PSAM is held from the DEBIT command to the verdict, and released once.
    messages: [...job("issue", { job: [189, 200], result: [210, 210] }), ...job("verify", { job: [127, 139], result: [124, 124] }), RELEASE],
    appends: [
      ...COMMON_APPENDS,
      { process: "payment", step: "draw request received (before the PSAM job)", bytes: 490 },
      { process: "payment", step: "DEBIT command issued (before the answer)", bytes: 240 },
      { process: "payment", step: "card's answer and the PSAM's verdict (after the PSAM is released with it, before the answer)", bytes: 350 },
    ],
  },
  SERVER_COMPARES: {
    calls: [
      { caller: "bench", callee: "merchant", method: "CreateOrder", requestBytes: 8, responseBytes: 322, timed: false },
      { caller: "merchant", callee: "validation", method: "IssueTransactionKeys", requestBytes: 77, responseBytes: 157, timed: false },
      { caller: "bench", callee: "payment", method: "ProcessDrawRequest", requestBytes: 556, responseBytes: 158, timed: true },
      { caller: "bench", callee: "payment", method: "CompletePurchase", requestBytes: 115, responseBytes: 265, timed: true },
      { caller: "bench", callee: "merchant", method: "CompleteOrder", requestBytes: 178, responseBytes: 218, timed: true },
      { caller: "merchant", callee: "validation", method: "ValidateConfirmation", requestBytes: 222, responseBytes: 77, timed: true },
    ],
    // The PSAM is released with the DEBIT command; the card's proof goes to it after the answer, on a lease of its own.
    messages: [...job("issue", { job: [193, 204], result: [222, 222] }), RELEASE, ...job("verify", { job: [127, 139], result: [126, 126] }), RELEASE],
    appends: [
      ...COMMON_APPENDS,
      { process: "payment", step: "draw request received (before the PSAM job)", bytes: 495 },
      { process: "payment", step: "DEBIT command issued, with the expected card signature (before the answer)", bytes: 290 },
      { process: "payment", step: "card's answer matches the expected signature: proven (before the answer)", bytes: 340 },
      { process: "payment", step: "the PSAM recorded the proof in its batch: completed (after the answer)", bytes: 170 },
    ],
  },
};

/** Durable appends per purchase, by process name; every process of the purchase is listed, with 0 where it makes none. */
export function appendsPerPurchase(mode: SkeletonMode): Record<string, number> {
  const names = skeletonProcesses(mode);
  const out: Record<string, number> = Object.fromEntries(Object.values(names).map((n) => [n, 0]));
  for (const a of PURCHASE[mode].appends) out[names[a.process]] = (out[names[a.process]] ?? 0) + 1;
  return out;
}

/** The request and response sizes of a call of the mode, by method. */
export function callOf(mode: SkeletonMode, method: UnaryCall["method"]): UnaryCall {
  const c = PURCHASE[mode].calls.find((x) => x.method === method);
  if (!c) throw new Error(`no ${method} in a ${mode} purchase`);
  return c;
}

/** The size of a stream message of the mode (the first of its kind when a purchase sends several alike). */
export function messageBytes(mode: SkeletonMode, m: Pick<StreamMessage, "from" | "to" | "kind" | "task">): number {
  const found = PURCHASE[mode].messages.find((x) => x.from === m.from && x.to === m.to && x.kind === m.kind && x.task === m.task);
  if (!found) throw new Error(`no ${m.kind} from ${m.from} to ${m.to} in a ${mode} purchase`);
  return found.bytes;
}

/** The record sizes of a process's appends of the mode, in the order it makes them. */
export function appendBytes(mode: SkeletonMode, process: SkeletonRole): number[] {
  return PURCHASE[mode].appends.filter((a) => a.process === process).map((a) => a.bytes);
}

/**
 * How the servers name what they count: a unary call at its callee, a
 * stream message at the concentrator (which sees all four directions), and
 * at the payment server the card's proofs recorded in the PSAM after the
 * answer (SERVER_COMPARES), so that a run can wait for the last one.
 */
export const tallyKey = {
  call: (method: string) => `call ${method}`,
  message: (m: Pick<StreamMessage, "from" | "to" | "kind" | "task">) => `${m.from}>${m.to} ${m.kind}${m.task ? ` ${m.task}` : ""}`,
  proofRecorded: "proof recorded",
};

/** What the servers count per purchase, by "process what": every call and stream message of the table, once for each time it occurs. */
export function tallyPerPurchase(mode: SkeletonMode): Record<string, number> {
  const names = skeletonProcesses(mode);
  const out: Record<string, number> = {};
  const add = (key: string) => (out[key] = (out[key] ?? 0) + 1);
  for (const c of PURCHASE[mode].calls) add(`${names[c.callee]} ${tallyKey.call(c.method)}`);
  for (const m of PURCHASE[mode].messages) add(`${names.concentrator} ${tallyKey.message(m)}`);
  if (mode === "SERVER_COMPARES") add(`${names.payment} ${tallyKey.proofRecorded}`);
  return out;
}
