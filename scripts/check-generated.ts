// CI check: gen/ must be exactly what `npm run generate` makes of proto/ now.
// Generates into a temporary folder and compares file by file.

import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const buf = join(root, "node_modules/.bin/buf");
const tmp = mkdtempSync(join(tmpdir(), "netpurse-gen-"));

function files(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? files(p) : [p];
  });
}

try {
  execFileSync(buf, ["generate", "-o", tmp], { cwd: root, stdio: "inherit" });
  execFileSync(buf, ["build", "-o", join(tmp, "gen", "descriptor.binpb")], { cwd: root, stdio: "inherit" });
  const want = new Map(files(join(tmp, "gen")).map((f) => [relative(join(tmp, "gen"), f), readFileSync(f)]));
  const have = new Map(files(join(root, "gen")).map((f) => [relative(join(root, "gen"), f), readFileSync(f)]));
  const stale = [
    ...[...want.keys()].filter((k) => !have.has(k)).map((k) => `missing: gen/${k}`),
    ...[...have.keys()].filter((k) => !want.has(k)).map((k) => `not generated from proto/: gen/${k}`),
    ...[...want].filter(([k, v]) => have.has(k) && !have.get(k)!.equals(v)).map(([k]) => `out of date: gen/${k}`),
  ];
  if (stale.length) {
    console.error(`gen/ is stale; run 'npm run generate' and commit gen/:\n  ${stale.join("\n  ")}`);
    process.exit(1);
  }
  console.log(`gen/ is up to date (${want.size} files)`);
} finally {
  rmSync(tmp, { recursive: true, force: true });
}
