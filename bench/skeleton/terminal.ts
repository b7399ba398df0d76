// The skeleton's terminal host: N PSAM slots behind one stream to the
// concentrator. Each job runs alone on its slot, as on a real PSAM, and
// makes the PSAM's one durable append (DRAW or VERIFY DEBIT) before its
// result goes back. Frames of the real messages' sizes, no cryptography,
// no protocol logic.

import { join } from "node:path";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { createLogger } from "../../lib/log.js";
import { Mutex } from "../../lib/mutex.js";
import { intOpt, opt, runService } from "../../lib/service-main.js";
import {
  DurableLog,
  frame,
  Frame,
  modeOption,
  SKELETON_HELP,
  SKELETON_IDENTITIES,
  SKELETON_OPTIONS,
  SkeletonConcentratorDefinition,
  SkeletonSecurity,
  unframe,
} from "./parts.js";
import { appendBytes, messageBytes } from "./wire.js";

await runService({
  program: "netpurse-bench-skeleton-terminal",
  summary: "Protocol skeleton: a terminal host's PSAM slots, each job one durable append, of the real sizes, with no protocol logic.",
  options: { concentrator: { type: "string" }, psams: { type: "string" }, dir: { type: "string" }, ...SKELETON_OPTIONS },
  help: [
    "  --concentrator HOST:PORT the skeleton's concentrator",
    "  --psams N                PSAM slots (default 4)",
    "  --dir DIR                where each slot's append-only log goes",
    SKELETON_HELP,
  ].join("\n"),
  start: async (v) => {
    const mode = modeOption(v);
    const security = await SkeletonSecurity.of(v, SKELETON_IDENTITIES.terminal);
    const log = createLogger("skeleton-terminal");
    const dir = opt(v, "dir", ".");
    const slots = await Promise.all(
      Array.from({ length: intOpt(v, "psams", 4) }, async (_, i) => ({ log: await DurableLog.open(join(dir, `psam-${i}.log`)), mutex: new Mutex() })),
    );
    const [drawBytes = 0, verifyBytes = 0] = appendBytes(mode, "terminal");
    const concentrator = opt(v, "concentrator", "");
    const channel = openChannel(concentrator, security.channel("concentrator"), { maxMessageBytes: 256 * 1024 });
    const abort = new AbortController();
    const out = new AsyncQueue<Uint8Array>();
    out.push(frame({ kind: Frame.HELLO, task: undefined, slot: slots.length, job: 0 }, 16));
    const stream = clientFactory().create(SkeletonConcentratorDefinition, channel).attachTerminal(out, { signal: abort.signal });
    let welcomed!: () => void;
    let refused!: (e: Error) => void;
    const attached = new Promise<void>((resolve, reject) => ((welcomed = resolve), (refused = reject)));
    const served = (async () => {
      for await (const b of stream) {
        const f = unframe(b);
        if (f.kind === Frame.WELCOME) welcomed();
        if (f.kind !== Frame.JOB) continue;
        const slot = slots[f.slot];
        if (!slot) {
          log.error("job for a slot this host does not have", { slot: f.slot });
          continue;
        }
        const answer = () =>
          out.push(frame({ ...f, kind: Frame.RESULT }, messageBytes(mode, { from: "terminal", to: "concentrator", kind: "result", task: f.task })));
        slot.mutex
          .run(() => slot.log.append(f.task === "issue" ? drawBytes : verifyBytes))
          .then(answer, (e: unknown) => log.error("the PSAM's append failed; no answer", { slot: f.slot, error: (e as Error).message }));
      }
    })()
      .catch((e: unknown) => {
        if (!abort.signal.aborted) log.error("the stream to the concentrator ended", { error: (e as Error).message });
      })
      .finally(() => refused(new Error("the stream to the concentrator ended before its welcome")));
    await attached;
    return {
      address: `terminal-1->${concentrator}`,
      async close() {
        abort.abort();
        out.close();
        await served;
        channel.close();
        for (const s of slots) await s.log.close();
      },
    };
  },
});
