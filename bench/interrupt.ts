// Ctrl-C (or a SIGTERM) in the middle of a run must not leave services
// running: whatever is started registers how to stop it here.

const stops = new Set<() => Promise<void>>();

/** Registers `stop` until the returned function is called. */
export function stopOnInterrupt(stop: () => Promise<void>): () => void {
  stops.add(stop);
  return () => stops.delete(stop);
}

export function handleInterrupts(): void {
  const onSignal = (signal: NodeJS.Signals, code: number) => () => {
    process.stderr.write(`\n${signal}: stopping every service of the benchmark\n`);
    Promise.allSettled([...stops].map((stop) => stop())).then(
      () => process.exit(code),
      () => process.exit(code),
    );
  };
  process.once("SIGINT", onSignal("SIGINT", 130));
  process.once("SIGTERM", onSignal("SIGTERM", 143));
}
