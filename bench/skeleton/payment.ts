// The skeleton's payment server: per purchase the steps of the real one in
// its mode, with the durable appends recovery depends on and the PSAM held
// as the mode holds it (PSAM_VERIFIES: from the DEBIT command's job to the
// verdict's result; SERVER_COMPARES: for the DEBIT command's job, then
// again, after the answer, for the card's proof), given back with the
// PSAM's answer as the real one does, before the step is written. Frames
// and messages of the real sizes, no cryptography, no protocol logic.

import { join } from "node:path";
import { Status, type CallContext } from "nice-grpc";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { NetpurseError, notFound } from "../../lib/grpc/errors.js";
import { callDeadline, service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger, type Logger } from "../../lib/log.js";
import { intOpt, opt, runService } from "../../lib/service-main.js";
import {
  DurableLog,
  frame,
  Frame,
  modeOption,
  padded,
  SKELETON_HELP,
  SKELETON_IDENTITIES,
  SKELETON_OPTIONS,
  SkeletonConcentratorDefinition,
  SkeletonPaymentDefinition,
  SkeletonSecurity,
  Tally,
  transactionOf,
  unframe,
  type Framed,
} from "./parts.js";
import { appendBytes, callOf, messageBytes, tallyKey, type SkeletonMode, type Task } from "./wire.js";

/** As the real payment server's defaults: the longest wait for a PSAM, for a job's result, and a PSAM_VERIFIES hold. */
const MAX_PSAM_WAIT_MS = 10_000;
const JOB_TIMEOUT_MS = 10_000;
const HOLD_TIMEOUT_MS = 60_000;
/** Kept back from the caller's deadline, as the real server does. */
const DEADLINE_MARGIN_MS = 100;

/** The PSAM slots, lent to one transaction at a time, least recently used first; a waiter may ask for one slot in particular. */
class SlotPool {
  private free: number[] = [];
  private known = 0;
  private waiters: { want: number | undefined; resolve: (slot: number) => void; timer: NodeJS.Timeout }[] = [];

  get size(): number {
    return this.known;
  }

  /** The concentrator's view of the pool: slots 0..n-1. */
  setSlots(n: number): void {
    for (let s = this.known; s < n; s++) this.release(s);
    this.known = Math.max(this.known, n);
  }

  acquire(want: number | undefined, deadline: number): Promise<number> {
    const i = want === undefined ? (this.free.length ? 0 : -1) : this.free.indexOf(want);
    const [free] = i >= 0 ? this.free.splice(i, 1) : [];
    if (free !== undefined) return Promise.resolve(free);
    return new Promise((resolve, reject) => {
      const waiter = {
        want,
        resolve,
        timer: setTimeout(
          () => {
            this.waiters = this.waiters.filter((w) => w !== waiter);
            reject(new NetpurseError(Status.RESOURCE_EXHAUSTED, ErrorReason.ERROR_REASON_NO_PSAM_FREE, "no PSAM slot became free in time"));
          },
          Math.max(0, deadline - Date.now()),
        ),
      };
      this.waiters.push(waiter);
    });
  }

  release(slot: number): void {
    const w = this.waiters.find((x) => x.want === undefined || x.want === slot);
    if (!w) {
      this.free.push(slot);
      return;
    }
    this.waiters = this.waiters.filter((x) => x !== w);
    clearTimeout(w.timer);
    w.resolve(slot);
  }
}

/** The stream to the concentrator: jobs out, results back by job id, releases. */
class ConcentratorLink {
  readonly pool = new SlotPool();
  private readonly out = new AsyncQueue<Uint8Array>();
  private readonly pending = new Map<number, { resolve: (f: Framed) => void; reject: (e: Error) => void; timer: NodeJS.Timeout }>();
  private jobs = 0;
  private readonly abort = new AbortController();
  private served: Promise<void> | undefined;
  private poolChanged: () => void = () => undefined;
  private gone = false;

  constructor(
    private readonly mode: SkeletonMode,
    private readonly log: Logger,
  ) {}

  start(address: string, security: SkeletonSecurity): { close(): Promise<void> } {
    const channel = openChannel(address, security.channel("concentrator"), { maxMessageBytes: 256 * 1024 });
    this.out.push(frame({ kind: Frame.HELLO, task: undefined, slot: 0, job: 0 }, 16));
    const stream = clientFactory().create(SkeletonConcentratorDefinition, channel).connectPaymentServer(this.out, { signal: this.abort.signal });
    this.served = (async () => {
      for await (const b of stream) {
        const f = unframe(b);
        if (f.kind === Frame.WELCOME) {
          this.pool.setSlots(f.slot);
          this.poolChanged();
        } else if (f.kind === Frame.RESULT) {
          const p = this.pending.get(f.job);
          if (!p) continue;
          this.pending.delete(f.job);
          clearTimeout(p.timer);
          p.resolve(f);
        }
      }
    })()
      .catch((e: unknown) => {
        if (!this.abort.signal.aborted) this.log.error("the stream to the concentrator ended", { error: (e as Error).message });
      })
      .finally(() => {
        this.gone = true;
        this.poolChanged();
        for (const p of this.pending.values())
          p.reject(new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, "the concentrator is gone"));
        this.pending.clear();
      });
    return {
      close: async () => {
        this.abort.abort();
        this.out.close();
        await this.served;
        channel.close();
      },
    };
  }

  /** Resolves once the pool has at least `n` slots. */
  async whenSlots(n: number): Promise<void> {
    while (this.pool.size < n) {
      if (this.gone) throw new Error(`the stream to the concentrator ended with ${this.pool.size} of ${n} PSAM slots seen`);
      await new Promise<void>((r) => (this.poolChanged = r));
    }
  }

  /** Sends a job to a leased slot and waits for its result. */
  run(slot: number, task: Task): Promise<void> {
    const job = ++this.jobs;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(job);
        reject(new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, `no answer from PSAM slot ${slot} in time`));
      }, JOB_TIMEOUT_MS);
      this.pending.set(job, {
        resolve: (f) =>
          f.task === task ? resolve() : reject(new NetpurseError(Status.UNAVAILABLE, ErrorReason.ERROR_REASON_UNSPECIFIED, `slot ${slot} refused the job`)),
        reject,
        timer,
      });
      this.out.push(frame({ kind: Frame.JOB, task, slot, job }, messageBytes(this.mode, { from: "payment", to: "concentrator", kind: "job", task })));
    });
  }

  /** Gives a slot back, here and at the concentrator. */
  release(slot: number): void {
    this.pool.release(slot);
    this.out.push(
      frame({ kind: Frame.RELEASE, task: undefined, slot, job: 0 }, messageBytes(this.mode, { from: "payment", to: "concentrator", kind: "release" })),
    );
  }
}

await runService({
  program: "netpurse-bench-skeleton-payment",
  summary: "Protocol skeleton: the payment server's steps of a purchase, its durable appends and PSAM leases, of the real sizes, with no protocol logic.",
  options: { listen: { type: "string" }, concentrator: { type: "string" }, psams: { type: "string" }, dir: { type: "string" }, ...SKELETON_OPTIONS },
  help: [
    "  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)",
    "  --concentrator HOST:PORT the skeleton's concentrator",
    "  --psams N                start serving once the concentrator shows this many PSAM slots (default 1)",
    "  --dir DIR                where its append-only log goes",
    SKELETON_HELP,
  ].join("\n"),
  start: async (v) => {
    const mode = modeOption(v);
    const security = await SkeletonSecurity.of(v, SKELETON_IDENTITIES.payment);
    const logger = createLogger("skeleton-payment");
    const log = await DurableLog.open(join(opt(v, "dir", "."), "payment.log"));
    const link = new ConcentratorLink(mode, logger);
    const running = link.start(opt(v, "concentrator", ""), security);
    await link.whenSlots(intOpt(v, "psams", 1));
    const tally = new Tally();
    const [received = 0, issued = 0, ruled = 0, completed = 0] = appendBytes(mode, "payment");
    const draw = callOf(mode, "ProcessDrawRequest");
    const complete = callOf(mode, "CompletePurchase");
    const deadline = (ctx: CallContext) => Math.min(Date.now() + MAX_PSAM_WAIT_MS, (callDeadline(ctx) ?? Infinity) - DEADLINE_MARGIN_MS);
    /** Transaction -> the slot whose PSAM signed its DEBIT command (held for it in PSAM_VERIFIES). */
    const signedBy = new Map<string, { slot: number; hold: NodeJS.Timeout | undefined }>();
    const psamVerifies = mode === "PSAM_VERIFIES";

    const processDrawRequest = async (request: Uint8Array, ctx: CallContext) => {
      tally.add(tallyKey.call("ProcessDrawRequest"));
      const id = transactionOf(request);
      await log.append(received);
      const slot = await link.pool.acquire(undefined, deadline(ctx));
      try {
        await link.run(slot, "issue");
      } catch (e) {
        link.release(slot);
        throw e;
      }
      // The early-release modes give the PSAM back with its answer, before the DEBIT command's record (the open debit is the PSAM's);
      // PSAM_VERIFIES holds it for the card's answer, not forever.
      if (!psamVerifies) link.release(slot);
      try {
        await log.append(issued);
      } catch (e) {
        if (psamVerifies) link.release(slot);
        throw e;
      }
      const hold = psamVerifies ? setTimeout(() => signedBy.delete(id) && link.release(slot), HOLD_TIMEOUT_MS) : undefined;
      signedBy.set(id, { slot, hold });
      return padded(request.subarray(0, 16), draw.responseBytes);
    };

    /** SERVER_COMPARES, after the answer: the signing PSAM records the card's proof in its batch. */
    const recordProof = async (slot: number) => {
      const leased = await link.pool.acquire(slot, Date.now() + MAX_PSAM_WAIT_MS);
      try {
        await link.run(leased, "verify");
      } finally {
        link.release(leased);
      }
      await log.append(completed);
      tally.add(tallyKey.proofRecorded);
    };

    const completePurchase = async (request: Uint8Array) => {
      tally.add(tallyKey.call("CompletePurchase"));
      const id = transactionOf(request);
      const signed = signedBy.get(id);
      if (!signed) throw notFound(`transaction ${id} has no DEBIT command awaiting the card's answer at the skeleton payment server`);
      signedBy.delete(id);
      clearTimeout(signed.hold);
      if (psamVerifies) {
        // The PSAM goes back with its verdict, which it holds itself (its batch record); ours is written after.
        try {
          await link.run(signed.slot, "verify");
        } finally {
          link.release(signed.slot);
        }
        await log.append(ruled);
      } else {
        await log.append(ruled);
        recordProof(signed.slot).catch((e: unknown) => logger.warn("proof not recorded", { transaction: id, error: (e as Error).message }));
      }
      return padded(new Uint8Array(), complete.responseBytes);
    };

    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [service(SkeletonPaymentDefinition, { processDrawRequest, completePurchase }, { all: "public" }), tally.service()],
      transport: security.server("request"),
      log: logger,
    });
    return {
      address: server.address,
      async close() {
        await server.shutdown();
        for (const s of signedBy.values()) clearTimeout(s.hold);
        await running.close();
        await log.close();
      },
    };
  },
});
