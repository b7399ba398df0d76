// The skeleton's terminal concentrator: routes each PSAM job from the
// payment server's stream to the terminal host's by its slot, and each
// result back by its job id; keeps the leases (a slot is the payment
// server's from its first job to its release) and nothing durable, as the
// real one. Frames of the real messages' sizes, no protocol logic.

import type { CallContext } from "nice-grpc";
import { AsyncQueue } from "../../lib/async-queue.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { opt, runService } from "../../lib/service-main.js";
import { serveStream } from "../../lib/streams.js";
import {
  frame,
  Frame,
  modeOption,
  SKELETON_HELP,
  SKELETON_IDENTITIES,
  SKELETON_OPTIONS,
  SkeletonConcentratorDefinition,
  SkeletonSecurity,
  Tally,
  unframe,
} from "./parts.js";
import { messageBytes, tallyKey, type StreamMessage, type Task } from "./wire.js";

/** The size of the few frames that are no part of a purchase (hello, welcome, a job refused here). */
const CONTROL_BYTES = 16;

await runService({
  program: "netpurse-bench-skeleton-concentrator",
  summary: "Protocol skeleton: the concentrator's routing of PSAM jobs and results, of the real sizes, with no protocol logic.",
  options: { listen: { type: "string" }, ...SKELETON_OPTIONS },
  help: ["  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)", SKELETON_HELP].join("\n"),
  start: async (v) => {
    const mode = modeOption(v);
    const security = await SkeletonSecurity.of(v, SKELETON_IDENTITIES.concentrator);
    const log = createLogger("skeleton-concentrator");
    const tally = new Tally();
    const count = (m: Pick<StreamMessage, "from" | "to" | "kind" | "task">) => tally.add(tallyKey.message(m));
    const size = (m: Pick<StreamMessage, "from" | "to" | "kind" | "task">) => messageBytes(mode, m);

    type Out = AsyncQueue<Uint8Array>;
    let terminal: { out: Out; slots: number } | undefined;
    const paymentServers = new Set<Out>();
    /** Slot -> the payment server stream holding its lease. */
    const leases = new Map<number, Out>();
    /** Our job id -> the payment server's stream and its own job id. */
    const routed = new Map<number, { from: Out; job: number; task: Task | undefined }>();
    let jobs = 0;

    const refuse = (to: Out, job: number, slot: number, why: string) => {
      log.warn("job refused", { why });
      to.push(frame({ kind: Frame.RESULT, task: undefined, slot, job }, CONTROL_BYTES));
    };

    const attachTerminal = (requests: AsyncIterable<Uint8Array>, context: CallContext) => {
      const out: Out = new AsyncQueue();
      return serveStream(
        requests,
        context.signal,
        out,
        (b) => {
          const f = unframe(b);
          if (f.kind === Frame.HELLO) {
            terminal = { out, slots: f.slot };
            out.push(frame({ kind: Frame.WELCOME, task: undefined, slot: f.slot, job: 0 }, CONTROL_BYTES));
            // The pool as the payment servers see it.
            for (const ps of paymentServers) ps.push(frame({ kind: Frame.WELCOME, task: undefined, slot: f.slot, job: 0 }, CONTROL_BYTES));
          } else if (f.kind === Frame.RESULT) {
            count({ from: "terminal", to: "concentrator", kind: "result", task: f.task });
            const r = routed.get(f.job);
            if (!r) return log.warn("result for an unknown job; dropped", { job: f.job });
            routed.delete(f.job);
            const back = { from: "concentrator", to: "payment", kind: "result", task: r.task } as const;
            r.from.push(frame({ ...f, job: r.job }, size(back)));
            count(back);
          }
        },
        () => {
          if (terminal?.out === out) terminal = undefined;
        },
      );
    };

    const connectPaymentServer = (requests: AsyncIterable<Uint8Array>, context: CallContext) => {
      const out: Out = new AsyncQueue();
      return serveStream(
        requests,
        context.signal,
        out,
        (b) => {
          const f = unframe(b);
          if (f.kind === Frame.HELLO) {
            paymentServers.add(out);
            out.push(frame({ kind: Frame.WELCOME, task: undefined, slot: terminal?.slots ?? 0, job: 0 }, CONTROL_BYTES));
          } else if (f.kind === Frame.JOB) {
            count({ from: "payment", to: "concentrator", kind: "job", task: f.task });
            if (!terminal || f.slot >= terminal.slots) return refuse(out, f.job, f.slot, `no slot ${f.slot}`);
            const holder = leases.get(f.slot);
            if (holder && holder !== out) return refuse(out, f.job, f.slot, `slot ${f.slot} is leased to another payment server`);
            leases.set(f.slot, out);
            const id = ++jobs;
            routed.set(id, { from: out, job: f.job, task: f.task });
            const on = { from: "concentrator", to: "terminal", kind: "job", task: f.task } as const;
            terminal.out.push(frame({ ...f, job: id }, size(on)));
            count(on);
          } else if (f.kind === Frame.RELEASE) {
            count({ from: "payment", to: "concentrator", kind: "release" });
            if (leases.get(f.slot) === out) leases.delete(f.slot);
          }
        },
        () => {
          paymentServers.delete(out);
          for (const [slot, holder] of leases) if (holder === out) leases.delete(slot);
        },
      );
    };

    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [
        service(
          SkeletonConcentratorDefinition,
          { attachTerminal, connectPaymentServer },
          { all: [], attachTerminal: ["terminal"], connectPaymentServer: ["payment"] },
        ),
        tally.service(),
      ],
      transport: security.server("require"),
      log,
      // As the real concentrator's: long-lived streams on few connections.
      limits: { maxMessageBytes: 256 * 1024, maxConcurrentStreams: 1024, maxConnectionAgeMs: 12 * 3_600_000, maxConnectionAgeGraceMs: 10 * 60_000 },
    });
    return { address: server.address, close: () => server.shutdown() };
  },
});
