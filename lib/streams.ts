// The two sides of netpurse's long-lived bidirectional streams: serving one
// (the concentrator) and keeping one open (terminal hosts, payment servers).

import type { AsyncQueue } from "./async-queue.js";
import type { Logger } from "./log.js";

/**
 * Serves a bidirectional stream: each incoming message goes to `onMessage`
 * (a throw ends the stream with that error), `out` feeds the outgoing side,
 * and `onEnd` runs once however the stream ends.
 */
export async function* serveStream<In, Out>(
  requests: AsyncIterable<In>,
  signal: AbortSignal,
  out: AsyncQueue<Out>,
  onMessage: (m: In) => void,
  onEnd: () => void,
): AsyncIterable<Out> {
  void (async () => {
    for await (const m of requests) onMessage(m);
  })().then(
    () => out.close(),
    (e: unknown) => out.close(e instanceof Error ? e : new Error(String(e))),
  );
  const onAbort = () => out.close();
  signal.addEventListener("abort", onAbort);
  try {
    yield* out;
  } finally {
    signal.removeEventListener("abort", onAbort);
    out.close();
    onEnd();
  }
}

/**
 * Keeps a stream open: runs `session` until it ends, then again after an
 * exponential, jittered back-off (100 ms to 5 s, reset after 10 s of uptime),
 * until `stopped()`.
 */
export async function keepConnected(p: {
  what: string;
  session: () => Promise<void>;
  stopped: () => boolean;
  log: Logger;
  afterSession?: () => void;
}): Promise<void> {
  let backoff = 100;
  while (!p.stopped()) {
    const started = Date.now();
    try {
      await p.session();
    } catch (e) {
      if (!p.stopped()) p.log.warn(`${p.what} stream ended`, { error: (e as Error).message });
    }
    p.afterSession?.();
    if (p.stopped()) break;
    if (Date.now() - started > 10_000) backoff = 100; // it had been up for a while
    const wait = backoff + Math.floor(Math.random() * backoff);
    p.log.info(`reconnecting to the ${p.what}`, { inMs: wait });
    await new Promise((r) => setTimeout(r, wait));
    backoff = Math.min(backoff * 2, 5_000);
  }
}

/** The items as a client stream (a request stream built ahead, as tests and benchmarks send them). */
export async function* streamOf<T>(items: Iterable<T>): AsyncIterable<T> {
  yield* items;
}
