// Test-only kill points: a process dies at a named point, as a crash would,
// so tests can check what recovery makes of what that point leaves behind.
// Off unless the environment variable given is set to a point's name; said
// on stderr at start, so a variable left set by mistake outside a test is
// seen before it kills a service. Never set one outside tests: the process
// kills itself with SIGKILL.

/** A kill point checker for `who`, armed by the environment variable `variable`. */
export function crashPoints(variable: string, who: string): (point: string) => void {
  const at = process.env[variable] ?? "";
  if (at !== "") process.stderr.write(`${variable}=${at} is set: this ${who} kills itself there (test only)\n`);
  return (point: string) => {
    if (at === "" || at !== point) return;
    process.stderr.write(`${variable}=${at}: the ${who} kills itself here (test only)\n`);
    process.kill(process.pid, "SIGKILL");
  };
}
