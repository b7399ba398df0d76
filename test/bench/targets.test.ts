// Issue #13's targets as the benchmark computes them from a run's rows
// (bench/targets.ts): which row decides each, the figure, and met / not met /
// not measured.

import { expect } from "chai";
import { issueTargets, renderTargets, type TargetInputs, type TargetPurchase, type TargetRow, type TargetSkeleton } from "../../bench/targets.js";

function row(p: Partial<TargetPurchase> & Pick<TargetPurchase, "psams" | "cardholders">): TargetPurchase {
  return {
    mode: "PSAM_VERIFIES",
    tls: true,
    perSecond: 100,
    p50Ms: 20,
    cpuMsPerPurchaseTotal: 10,
    psamHold: { samples: 100, p50Ms: 30, p99Ms: 60 },
    eventLoopDelayMs: { payment: { p50: 1, p99: 4, max: 9, samples: 1000 } },
    ...p,
  };
}

const ECHO = [
  { concurrency: 1, tls: true, perSecond: 1000, p50Ms: 2.5, errors: 0 },
  { concurrency: 8, tls: true, perSecond: 2000, p50Ms: 3, errors: 0 },
  { concurrency: 64, tls: true, perSecond: 2000, p50Ms: 20, errors: 0 },
  { concurrency: 256, tls: true, perSecond: 2000, p50Ms: 60, errors: 0 },
  // TLS off never counts: a much faster echo here would spoil the ratios if it did.
  { concurrency: 64, tls: false, perSecond: 100_000, p50Ms: 0.1, errors: 0 },
];

/** A run that meets every target it measures. */
function goodRun(): TargetInputs {
  return {
    purchases: [
      row({ psams: 4, cardholders: 1, perSecond: 50, p50Ms: 20, cpuMsPerPurchaseTotal: 30 }),
      row({ psams: 4, cardholders: 8, cpuMsPerPurchaseTotal: 11 }),
      row({ psams: 16, cardholders: 64, perSecond: 150, cpuMsPerPurchaseTotal: 9 }),
      row({ psams: 64, cardholders: 256, mode: "SERVER_COMPARES", perSecond: 130, psamHold: { samples: 500, p50Ms: 4, p99Ms: 12 } }),
    ],
    echo: ECHO,
    soak: {
      minutes: 5,
      atOneMinute: { atSeconds: 60, purchases: 6000, peakMiB: 200 },
      atEnd: { atSeconds: 300, purchases: 30000, peakMiB: 210 },
      peakGrowth: 1.05,
    },
  };
}

/** The protocol skeleton at every configuration of goodRun(), each in the row's mode and TLS on; every real row at ≥ 0.6 of it. */
function skeletons(): TargetSkeleton[] {
  return [
    { psams: 4, cardholders: 1, mode: "PSAM_VERIFIES", tls: true, perSecond: 60, p50Ms: 8 },
    { psams: 4, cardholders: 8, mode: "PSAM_VERIFIES", tls: true, perSecond: 120, p50Ms: 12 },
    { psams: 16, cardholders: 64, mode: "PSAM_VERIFIES", tls: true, perSecond: 200, p50Ms: 150 },
    { psams: 64, cardholders: 256, mode: "SERVER_COMPARES", tls: true, perSecond: 180, p50Ms: 900 },
  ];
}

const byTarget = (rows: TargetRow[], start: string) => {
  const found = rows.find((r) => r.target.startsWith(start));
  if (!found) throw new Error(`no target "${start}"`);
  return found;
};

describe("bench: issue #13 targets", () => {
  it("computes each target from the rows that measure it", () => {
    const t = issueTargets(goodRun(), skeletons());
    expect(t).to.have.length(10);
    // The 1-cardholder row's 30 ms is not under load: the worst loaded row, 11 ms at 4 × 8, decides.
    expect(byTarget(t, "CPU per purchase")).to.include({ value: 11, at: "4 × 8, PSAM_VERIFIES (worst of 3)", met: true });
    expect(byTarget(t, "purchases/s ÷ echo")).to.include({ value: 150 / 2000, at: "16 × 64, PSAM_VERIFIES", met: true });
    expect(byTarget(t, "purchases/s at 64 PSAMs")).to.include({ value: 130, met: true });
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 16")).to.include({ value: 150 / 200, at: "16 × 64, PSAM_VERIFIES", met: true });
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 64")).to.include({ value: 130 / 180, at: "64 × 256, SERVER_COMPARES", met: true });
    expect(byTarget(t, "p50 latency at 1 cardholder ÷ echo")).to.include({ value: 20 / 2.5, met: true });
    // No goal: what the architecture's own hops cost at one cardholder, beside the echo target.
    expect(byTarget(t, "p50 latency at 1 cardholder ÷ protocol-skeleton")).to.include({
      goal: "—",
      value: 20 / 8,
      at: "4 × 1, PSAM_VERIFIES",
      met: undefined,
      information: true,
    });
    // Only the early-release row's hold counts: PSAM_VERIFIES holds across the cardholder's round trip by design.
    expect(byTarget(t, "PSAM hold p50")).to.include({ value: 4, at: "64 × 256, SERVER_COMPARES", met: true });
    expect(byTarget(t, "payment server event-loop")).to.include({ value: 4, met: true });
    expect(byTarget(t, "payment server peak memory")).to.include({ value: 1.05, met: true });
  });

  it("says not met when the worst row misses the goal, and names it", () => {
    const run = goodRun();
    run.purchases.push(
      row({ psams: 16, cardholders: 8, cpuMsPerPurchaseTotal: 25, eventLoopDelayMs: { payment: { p50: 2, p99: 9.5, max: 40, samples: 900 } } }),
    );
    run.purchases[3]!.perSecond = 119.9;
    run.purchases[3]!.psamHold = { samples: 400, p50Ms: 6, p99Ms: 20 };
    run.soak!.peakGrowth = 1.3;
    const t = issueTargets(run);
    expect(byTarget(t, "CPU per purchase")).to.include({ value: 25, at: "16 × 8, PSAM_VERIFIES (worst of 4)", met: false });
    expect(byTarget(t, "payment server event-loop")).to.include({ value: 9.5, met: false });
    expect(byTarget(t, "purchases/s at 64 PSAMs")).to.include({ value: 119.9, met: false });
    expect(byTarget(t, "PSAM hold p50")).to.include({ value: 6, met: false });
    expect(byTarget(t, "payment server peak memory")).to.include({ value: 1.3, met: false });
  });

  it("judges the skeleton ratio at 16 × 64 and at 64 × 256 each by its own configuration's skeleton", () => {
    const run = goodRun();
    const s = skeletons();
    s[2]!.perSecond = 251; // 150 / 251 = 0.598: just short of 0.6
    s[3]!.perSecond = 130 / 0.6; // exactly 0.6: met
    const t = issueTargets(run, s);
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 16")).to.include({ value: 150 / 251, at: "16 × 64, PSAM_VERIFIES", met: false });
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 64").met).to.equal(true);
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 64").value).to.be.closeTo(0.6, 1e-9);
    expect(renderTargets(t)).to.contain(
      "| purchases/s ÷ protocol-skeleton purchases/s at 16 PSAMs × 64 cardholders | ≥ 0.6 | 0.598 | 16 × 64, PSAM_VERIFIES | not met |",
    );
  });

  it("does not compare with a skeleton of another mode, transport or size, and says so", () => {
    const run = goodRun();
    const t = issueTargets(run, [
      // 16 × 64 in another mode, 64 × 256 with TLS off, 1 cardholder at another PSAM count: none is the same configuration.
      { psams: 16, cardholders: 64, mode: "SERVER_COMPARES", tls: true, perSecond: 200, p50Ms: 150 },
      { psams: 64, cardholders: 256, mode: "SERVER_COMPARES", tls: false, perSecond: 180, p50Ms: 900 },
      { psams: 16, cardholders: 1, mode: "PSAM_VERIFIES", tls: true, perSecond: 60, p50Ms: 8 },
    ]);
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 16")).to.deep.include({
      value: NaN,
      at: "16 × 64 with TLS on and its skeleton not in this run",
      met: undefined,
    });
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 64")).to.deep.include({ value: NaN, met: undefined });
    expect(byTarget(t, "p50 latency at 1 cardholder ÷ protocol-skeleton")).to.deep.include({
      value: NaN,
      at: "1 cardholder with TLS on and its skeleton not in this run",
      met: undefined,
    });
    // A skeleton that made no purchase gives no ratio rather than an infinite one.
    const stalled = issueTargets(run, [{ psams: 16, cardholders: 64, mode: "PSAM_VERIFIES", tls: true, perSecond: 0, p50Ms: NaN }]);
    expect(byTarget(stalled, "purchases/s ÷ protocol-skeleton purchases/s at 16")).to.deep.include({ value: NaN, met: undefined });
  });

  it("ignores TLS-off rows and says what was not measured", () => {
    const run: TargetInputs = {
      purchases: [row({ psams: 16, cardholders: 64, tls: false, perSecond: 10_000, cpuMsPerPurchaseTotal: 1 })],
      echo: ECHO,
    };
    const t = issueTargets(run);
    expect(t.every((r) => r.met === undefined && Number.isNaN(r.value))).to.equal(true);
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 16").at).to.equal("the protocol skeleton was not run (--skeleton off)");
    expect(byTarget(t, "purchases/s ÷ protocol-skeleton purchases/s at 64").at).to.equal("the protocol skeleton was not run (--skeleton off)");
    expect(byTarget(t, "p50 latency at 1 cardholder ÷ protocol-skeleton").at).to.equal("the protocol skeleton was not run (--skeleton off)");
    expect(byTarget(t, "payment server peak memory").at).to.contain("--soak-minutes 5");
    expect(byTarget(t, "purchases/s at 64 PSAMs").at).to.contain("not in this run");
  });

  it("does not judge memory from a soak shorter than five minutes", () => {
    const run = goodRun();
    run.soak = {
      minutes: 2,
      atOneMinute: { atSeconds: 60, purchases: 6000, peakMiB: 200 },
      atEnd: { atSeconds: 120, purchases: 12000, peakMiB: 201 },
      peakGrowth: 1.005,
    };
    expect(byTarget(issueTargets(run), "payment server peak memory")).to.include({ value: 1.005, met: undefined });
  });

  it("renders met, not met and not measured", () => {
    const run = goodRun();
    run.purchases[2]!.perSecond = 20; // 16 × 64: 20 / 2000 = 0.01
    const text = renderTargets(issueTargets(run));
    expect(text).to.contain("| purchases/s ÷ echo calls/s at 16 PSAMs × 64 cardholders | ≥ 0.05 | 0.010 | 16 × 64, PSAM_VERIFIES | not met |");
    expect(text).to.contain("| PSAM hold p50 in an early-release mode (ms) | ≤ 5 | 4.00 | 64 × 256, SERVER_COMPARES | met |");
    expect(text).to.contain("| the protocol skeleton was not run (--skeleton off) | not measured |");
    const withSkeleton = renderTargets(issueTargets(run, skeletons()));
    expect(withSkeleton).to.contain("| p50 latency at 1 cardholder ÷ protocol-skeleton p50 at 1 cardholder | — | 2.50 | 4 × 1, PSAM_VERIFIES | information |");
  });
});
