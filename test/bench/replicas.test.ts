// The replicas suite's grid, its roles, the PostgreSQL server's CPU as read
// from /proc, and its report (bench/replicas.ts, bench/postgres.ts,
// bench/replicas-report.ts): which configurations run, which read n/a and
// why, and what the tables say of a run.

import { expect } from "chai";
import { spawn } from "node:child_process";
import { serverCpuSeconds } from "../../bench/postgres.js";
import { cpuSeconds } from "../../bench/proc.js";
import {
  measureReplicas,
  REPLICAS_NEED_POSTGRES,
  replicasErrors,
  replicasGrid,
  roleOf,
  type ReplicasCell,
  type ReplicasReport,
  type ReplicasRun,
} from "../../bench/replicas.js";
import { renderReplicas, replicasProblems } from "../../bench/replicas-report.js";

/** A measured run: CPU per purchase per process as given, every other figure plain. */
function run(perSecond: number, cpuMs: Record<string, number>, o: Partial<ReplicasRun> = {}): ReplicasRun {
  const byRole = { "payment servers": 0, concentrators: 0, "terminal hosts": 0, merchant: 0, validation: 0, "cardholders (bench)": 0, "other services": 0 };
  for (const [name, v] of Object.entries(cpuMs)) byRole[roleOf(name)] += v;
  return {
    warmupMs: 2000,
    completed: perSecond * 10,
    perSecond,
    p50Ms: 500,
    p99Ms: 1000,
    errors: 0,
    errorMessages: {},
    psams: 8,
    cpuPercent: Object.fromEntries(Object.entries(cpuMs).map(([k, v]) => [k, (v * perSecond) / 10])),
    cpuMsPerPurchase: cpuMs,
    cpuMsPerPurchaseByRole: byRole,
    cpuMsPerPurchaseTotal: Object.values(cpuMs).reduce((a, b) => a + b, 0),
    machineCpuPercent: 190,
    unrecordedAfterLoad: { atEnd: 0, left: 0, waitedMs: 0 },
    serviceLogs: { count: 0, samples: [] },
    ...o,
  };
}

function report(cells: ReplicasCell[]): ReplicasReport {
  return {
    cardholders: 32,
    psamsPerHost: 8,
    concentrators: 1,
    mode: "PSAM_VERIFIES",
    tls: true,
    phases: { warmupMs: 30_000, measureMs: 10_000 },
    postgres: { version: "15.10", durable: true },
    cells,
  };
}

/** The rows of the markdown table under `heading`, each split into its cells. */
function tableRows(markdown: string, heading: string): string[][] {
  const lines = markdown.split("\n");
  const after = lines.slice(lines.findIndex((l) => l.startsWith(heading)));
  const first = after.findIndex((l) => l.startsWith("|"));
  const end = after.findIndex((l, i) => i > first && !l.startsWith("|"));
  // The header and the alignment line, then the rows.
  return after.slice(first + 2, end).map((line) => line.slice(2, -2).split(" | "));
}

describe("bench: the replicas suite", () => {
  describe("the grid", () => {
    it("runs every database × payment servers × terminal hosts, SQLite first", () => {
      const grid = replicasGrid({ databases: ["sqlite", "postgresql"], paymentServers: [1, 2], terminalHosts: [1, 2] });
      expect(grid.map((c) => `${c.database}:${c.paymentServers}x${c.terminalHosts}`)).to.deep.equal([
        "sqlite:1x1",
        "sqlite:1x2",
        "sqlite:2x1",
        "sqlite:2x2",
        "postgresql:1x1",
        "postgresql:1x2",
        "postgresql:2x1",
        "postgresql:2x2",
      ]);
    });

    it("reads n/a for replicas on SQLite without starting a network, and counts it as no failure", async () => {
      const r = await measureReplicas({
        paymentServers: [2, 3],
        terminalHosts: [1],
        databases: ["sqlite"],
        cardholders: 32,
        psamsPerHost: 8,
        concentrators: 1,
        mode: "PSAM_VERIFIES",
        tls: true,
        phases: { warmupMs: 1000, measureMs: 1000 },
        keepData: false,
      });
      expect(r.cells).to.deep.equal([
        { paymentServers: 2, terminalHosts: 1, database: "sqlite", outcome: "n/a", reason: REPLICAS_NEED_POSTGRES },
        { paymentServers: 3, terminalHosts: 1, database: "sqlite", outcome: "n/a", reason: REPLICAS_NEED_POSTGRES },
      ]);
      expect(r.postgres).to.deep.equal({ notAsked: true });
      expect(replicasErrors(r)).to.equal(0);
    });
  });

  it("gives each process launchNetwork names its role", () => {
    const roles = Object.fromEntries(
      [
        "payment",
        "payment-r2",
        "concentrator",
        "concentrator-2",
        "terminal-1",
        "terminal-2",
        "merchant-demo-shop",
        "merchant-validation",
        "bench",
        "clearing",
        "load",
        "bank",
        "client-daemon",
      ].map((n) => [n, roleOf(n)]),
    );
    expect(roles).to.deep.equal({
      payment: "payment servers",
      "payment-r2": "payment servers",
      concentrator: "concentrators",
      "concentrator-2": "concentrators",
      "terminal-1": "terminal hosts",
      "terminal-2": "terminal hosts",
      "merchant-demo-shop": "merchant",
      "merchant-validation": "validation",
      bench: "cardholders (bench)",
      clearing: "other services",
      load: "other services",
      bank: "other services",
      "client-daemon": "other services",
    });
  });

  describe("a server's CPU, its children's included", function () {
    this.timeout(20_000);

    it("counts the CPU of a child that has exited", async function () {
      if (cpuSeconds(process.pid) === undefined) this.skip(); // no /proc here
      // sh plays the postmaster: it burns nothing itself; its child burns 0.8 s of CPU and exits, sh says so and waits on.
      const burn = "while (process.cpuUsage().user + process.cpuUsage().system < 800000);";
      const sh = spawn("sh", ["-c", `"${process.execPath}" -e '${burn}'; echo done; sleep 30`], { stdio: ["ignore", "pipe", "ignore"] });
      try {
        const pid = sh.pid!;
        const before = serverCpuSeconds(pid)!;
        await new Promise<void>((resolve) => sh.stdout.on("data", (d: Buffer) => d.toString().includes("done") && resolve()));
        // The child is gone: its CPU is in sh's cutime + cstime alone.
        const after = serverCpuSeconds(pid)!;
        expect(after - before).to.be.within(0.75, 2);
        expect(cpuSeconds(pid)!).to.be.lessThan(0.1);
      } finally {
        sh.kill("SIGKILL");
      }
    });

    it("is undefined for a process that does not exist", () => {
      expect(serverCpuSeconds(2 ** 22 + 12345)).to.equal(undefined);
    });
  });

  describe("the report", () => {
    const payment = { payment: 7, concentrator: 2, "terminal-1": 4, "merchant-demo-shop": 5, "merchant-validation": 3, bench: 7, clearing: 0.5 };
    const cells: ReplicasCell[] = [
      { paymentServers: 1, terminalHosts: 1, database: "sqlite", outcome: "measured", run: run(30, payment) },
      { paymentServers: 2, terminalHosts: 1, database: "sqlite", outcome: "n/a", reason: REPLICAS_NEED_POSTGRES },
      {
        paymentServers: 1,
        terminalHosts: 1,
        database: "postgresql",
        outcome: "measured",
        run: run(24, payment, { postgresCpuPercent: 36, postgresCpuMsPerPurchase: 15 }),
      },
      {
        paymentServers: 2,
        terminalHosts: 1,
        database: "postgresql",
        outcome: "measured",
        run: run(
          36,
          { ...payment, payment: 4, "payment-r2": 5 },
          {
            postgresCpuPercent: 54,
            postgresCpuMsPerPurchase: 15,
            errors: 3,
            errorMessages: { "Error: busy": 3 },
            // One cause twice, its stack traces (escaped newlines in the log line) differing.
            serviceLogs: {
              count: 2,
              samples: ['payment.log: error="could not serialize\\n    at a.ts:1"', 'payment.log: error="could not serialize\\n    at b.ts:2"'],
            },
          },
        ),
      },
      { paymentServers: 1, terminalHosts: 2, database: "postgresql", outcome: "failed", message: "the pool did not come up" },
    ];
    const r = report(cells);
    const text = renderReplicas(r, 2);

    it("gives each configuration its figures, or why it has none", () => {
      const rows = tableRows(text, "## Replicas");
      expect(rows.map((cells) => cells.slice(0, 8))).to.deep.equal([
        ["1", "1", "8", "SQLite", "30.0", "500.0", "1000.0", "0"],
        ["2", "1", "8", "SQLite", REPLICAS_NEED_POSTGRES, "", "", ""],
        ["1", "1", "8", "PostgreSQL", "24.0", "500.0", "1000.0", "0"],
        ["2", "1", "8", "PostgreSQL", "36.0", "500.0", "1000.0", "3"],
        ["1", "2", "16", "PostgreSQL", "failed: the pool did not come up", "", "", ""],
      ]);
      // Every process's CPU per purchase plus PostgreSQL's: 28.5 + 15.
      // And the rate two cores allow at that CPU per purchase: 2,000 ms ÷ 43.5 ms.
      expect(rows[2]!.slice(9, 12)).to.deep.equal(["43.5", "15.0", "46.0"]);
      expect(rows[0]!.slice(9, 12)).to.deep.equal(["28.5", "n/a", "70.2"]);
    });

    it("sums the replicas of a role and shows each one's share", () => {
      const rows = tableRows(text, "### CPU per purchase, per process");
      const replicas = rows.find((row) => row[0] === "2" && row[3] === "PostgreSQL")!;
      expect(replicas[4]).to.equal("9.0 (4.0 + 5.0)");
      expect(replicas.slice(-2)).to.deep.equal(["15.0", "45.5"]);
    });

    it("compares each step of the grid with the one below it", () => {
      const rows = tableRows(text, "### Each step of the grid");
      const second = rows.find((row) => row[1] === "payment servers 1 → 2")!;
      // 36 ÷ 24 purchases/s; (30.5 + 15) ÷ (28.5 + 15) CPU.
      expect(second.slice(2, 5)).to.deep.equal(["1.50", "1.00", "1.05"]);
      expect(rows.find((row) => row[1] === "SQLite → PostgreSQL")![2]).to.equal("0.80");
    });

    it("lists failed configurations and failed purchases, and counts both", () => {
      const problems = replicasProblems(r);
      expect(problems).to.include("- replicas, 1 payment server, 2 terminal hosts (16 PSAMs), PostgreSQL: not measured, the pool did not come up");
      expect(problems).to.include("- replicas, 2 payment servers, 1 terminal host (8 PSAMs), PostgreSQL: 3 × Error: busy");
      expect(problems.filter((p) => p.includes("service log"))).to.deep.equal([
        '- replicas, 2 payment servers, 1 terminal host (8 PSAMs), PostgreSQL, service log: payment.log: error="could not serialize',
      ]);
      expect(replicasErrors(r)).to.equal(4);
    });
  });
});
