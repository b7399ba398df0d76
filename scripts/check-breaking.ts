// CI check: proto/ as it is now must not break the contract main already
// published (buf breaking, rules FILE in buf.yaml). A deliberate break goes
// into a new version package (netpurse.bank.v2 beside v1), never into v1.
//
// What it compares against, the first that applies:
//   1. --against REF, or NETPURSE_BREAKING_AGAINST=REF (e.g. a PR's base);
//   2. on a branch that left main (origin/main, else main): the merge base,
//      so every commit of the branch and any uncommitted edit are checked;
//   3. on main with proto/ edits not yet committed: HEAD, the last commit;
//   4. on main with proto/ as committed: HEAD~1, the previous commit, so the
//      last commit's own change is checked (CI, on a fresh clone).
// On a shallow clone without HEAD~1 it fetches one more commit (git fetch
// --deepen=1); when that fails too (no remote, no network, the first commit)
// it compares against HEAD and says that the last commit went unchecked.
// The baseline's buf.yaml and proto/ are read from git objects into a
// temporary folder (the work tree and index are not touched), and
// `buf breaking --against <that folder>` compares the work tree with it.

import { execFileSync, spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";

const root = new URL("..", import.meta.url).pathname;
const buf = join(root, "node_modules/.bin/buf");
const CONTRACT = ["buf.yaml", "buf.lock", "proto"];

/** A git command's output, or undefined when it fails. */
function git(...args: string[]): string | undefined {
  const r = spawnSync("git", args, { cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"], timeout: 60_000 });
  return r.status === 0 ? r.stdout.trim() : undefined;
}

const commit = (ref: string) => git("rev-parse", "--verify", "--quiet", `${ref}^{commit}`);
const short = (sha: string) => sha.slice(0, 12);

function option(): string | undefined {
  const i = process.argv.indexOf("--against");
  if (i >= 0) {
    const ref = process.argv[i + 1];
    if (!ref) throw new Error("--against needs a git ref");
    return ref;
  }
  return process.env.NETPURSE_BREAKING_AGAINST || undefined;
}

/** HEAD~1, fetching one more commit of a shallow clone when it is missing. */
function previousCommit(): { sha?: string; note: string } {
  let sha = commit("HEAD~1");
  if (sha) return { sha, note: "HEAD~1, the previous commit: proto/ is as committed, so the last commit's change is checked" };
  const shallow = git("rev-parse", "--is-shallow-repository") === "true";
  if (shallow && git("remote")) {
    console.log("shallow clone without HEAD~1: fetching one more commit (git fetch --deepen=1)");
    if (git("fetch", "--quiet", "--deepen=1") !== undefined) sha = commit("HEAD~1");
  }
  if (sha) return { sha, note: "HEAD~1, the previous commit (fetched into the shallow clone)" };
  const why = shallow ? "a shallow clone whose history could not be fetched" : "HEAD is the first commit";
  return { note: `HEAD~1 is not available (${why}): compared against HEAD, so the last commit's own change was NOT checked` };
}

function baseline(): { sha: string; note: string } {
  const given = option();
  if (given) {
    const sha = commit(given);
    if (!sha) throw new Error(`--against ${given}: no such commit here (fetch it first)`);
    return { sha, note: `${given}, as asked` };
  }
  const head = commit("HEAD");
  if (!head) throw new Error("this repository has no commit yet");
  for (const main of ["refs/remotes/origin/main", "refs/heads/main"]) {
    if (!commit(main)) continue;
    const base = git("merge-base", "HEAD", main);
    if (base && base !== head) return { sha: base, note: `where HEAD left ${main.replace(/^refs\/(remotes|heads)\//, "")} (merge base)` };
  }
  const edited = git("status", "--porcelain", "--untracked-files=all", "--", ...CONTRACT);
  if (edited) return { sha: head, note: "HEAD, the last commit: proto/ (or buf.yaml) has changes not yet committed" };
  const prev = previousCommit();
  return { sha: prev.sha ?? head, note: prev.note };
}

/** Writes the baseline's buf.yaml, buf.lock and proto/ into `dir`; how many files. */
function extract(sha: string, dir: string): number {
  const files = (git("ls-tree", "-r", "-z", "--name-only", sha, "--", ...CONTRACT) ?? "").split("\0").filter(Boolean);
  for (const f of files) {
    mkdirSync(dirname(join(dir, f)), { recursive: true });
    writeFileSync(join(dir, f), execFileSync("git", ["cat-file", "blob", `${sha}:${f}`], { cwd: root, maxBuffer: 64 << 20 }));
  }
  return files.filter((f) => f.endsWith(".proto")).length;
}

/** 0 when nothing breaks (or there is nothing to compare with), else buf's exit status. */
function main(): number {
  if (git("rev-parse", "--is-inside-work-tree") !== "true") {
    console.log("buf breaking skipped: not a git work tree, so there is no published contract to compare with");
    return 0;
  }
  if (!commit("HEAD")) {
    console.log("buf breaking skipped: no commit yet, so no contract was published");
    return 0;
  }
  const { sha, note } = baseline();
  console.log(`buf breaking: proto/ in the work tree against ${short(sha)}, ${note}`);
  const tmp = mkdtempSync(join(tmpdir(), "netpurse-breaking-"));
  try {
    const protos = extract(sha, tmp);
    if (!protos) {
      console.log(`nothing to compare: ${short(sha)} has no .proto files`);
      return 0;
    }
    const r = spawnSync(buf, ["breaking", "--against", tmp], { cwd: root, stdio: "inherit" });
    if (r.status !== 0) {
      console.error(
        `\nproto/ breaks the contract published at ${short(sha)} (rules: buf.yaml breaking). Keep v1 as it was;` +
          ` a deliberate break goes into a new version package (e.g. netpurse.bank.v2) beside it.`,
      );
      return r.status ?? 1;
    }
    console.log(`no breaking change against ${short(sha)} (${protos} .proto files)`);
    return 0;
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

process.exitCode = main();
