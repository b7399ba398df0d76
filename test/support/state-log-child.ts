// A process that saves a state over and over through a state log and says
// on stdout which counter each save made durable, until it is killed: the
// state-log crash test (test/unit/state-log.test.ts) kills it at random
// moments, compactions included (the bound is set low), and checks what a
// new open finds. The state keeps the last KEPT counters, oldest first.
// Usage: node --import tsx test/support/state-log-child.ts FILE KEPT

import { StateLog, stateLogLimits } from "../../lib/apdu/state-log.js";

const [path, kept] = [process.argv[2], Number(process.argv[3])];
if (!path || !(kept > 0)) throw new Error("usage: state-log-child.ts FILE KEPT");
stateLogLimits.compactMinBytes = 2048;
const log = await StateLog.open<{ format: 1; counter: number; recent: number[] }>(path);
for (;;) {
  const s = log.state;
  const counter = s.counter + 1;
  await log.save({ ...s, counter, recent: [...s.recent, counter].slice(-kept) });
  process.stdout.write(`${counter}\n`);
}
