// The delay proxy as a process of its own, driven by its parent over Node's
// IPC channel: in the benchmark process its timers would fire late whenever
// the cardholders' card work held the event loop, stretching the delay.
//
// Parent → child: { forwardTo: "host:port" } | { stats: true }
// Child → parent: { address } once listening, then { stats } per request.

import { DelayProxy } from "./delay-proxy.js";

const delayMs = Number(process.argv[2]);
if (!process.send || !Number.isFinite(delayMs) || delayMs < 0) {
  process.stderr.write("usage: forked by the benchmark with a delay in ms (bench/delay-proxy.ts, DelayProxy.fork)\n");
  process.exit(2);
}
const send = process.send.bind(process);
const proxy = await DelayProxy.start(delayMs);
process.on("message", (m: { forwardTo?: string; stats?: boolean }) => {
  if (m.forwardTo) proxy.forwardTo(m.forwardTo);
  if (m.stats) send({ stats: proxy.statsNow() });
});
// The parent going away ends the proxy too.
process.on("disconnect", () => {
  proxy.close().then(
    () => process.exit(0),
    () => process.exit(1),
  );
});
send({ address: proxy.address });
