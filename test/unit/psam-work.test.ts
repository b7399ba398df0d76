// A PSAM held for the cardholder's answer (PSAM_VERIFIES) goes back to the
// pool when the answer does not come in time, even when the payment
// database cannot take the log line of its release: a failed write must not
// become an unhandled rejection, which would end the payment server.

import { expect } from "chai";
import { join } from "node:path";
import { createLogger } from "../../lib/log.js";
import { openSqlite } from "../../lib/store/db.js";
import { ConcentratorLink } from "../../services/payment/concentrator-link.js";
import { PsamPool } from "../../services/payment/psam-pool.js";
import { PsamWork } from "../../services/payment/psam-work.js";
import { PAYMENT_MIGRATIONS, PaymentStore } from "../../services/payment/store.js";
import { tempDir } from "../support/fixtures.js";

describe("PSAM work: a held PSAM whose hold times out", () => {
  it("goes back to the pool, and a failed write of its release does not end the process", async () => {
    const { dir, cleanup } = await tempDir();
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown) => unhandled.push(e);
    // Ours is not the only listener (mocha has one too), so the process lives on either way; ours records it.
    process.on("unhandledRejection", onUnhandled);
    try {
      const db = openSqlite(join(dir, "payment.db"), PAYMENT_MIGRATIONS);
      const store = new PaymentStore(db);
      const pool = new PsamPool(() => undefined);
      pool.updateTerminal({ terminalId: "terminal-1", slots: [{ psamId: "0a0b0c0d", keyVersions: [1], currencies: [978], ready: true }] });
      // Never started: the hold and its release do not send anything to the concentrator.
      const link = new ConcentratorLink({
        address: "127.0.0.1:1",
        channel: { insecure: true },
        paymentServerId: "payment-1",
        pool,
        log: createLogger("test"),
        onTerminal: () => undefined,
        onLateResult: () => undefined,
      });
      // No job runs here, so no PSAM answer is checked: a security module that believes none will do.
      const verdicts = { issued: () => false, verdict: () => false, reversed: () => false };
      const work = new PsamWork({ pool, link, store, log: createLogger("test"), verdicts, holdTimeoutMs: 50, jobTimeoutMs: 1_000 });
      const lease = await pool.acquire({ currency: 978 }, Date.now() + 1_000);
      work.hold("0b6f1c1e-8c3d-4c39-9a57-2f7d4c1d9e20", lease);
      expect(pool.counts()).to.include({ free: 0, leased: 1 });
      await db.close(); // every write from now on fails, as a full disk or a broken file would make it
      await new Promise((r) => setTimeout(r, 300));
      expect(unhandled, "an unhandled rejection").to.deep.equal([]);
      expect(pool.counts()).to.include({ free: 1, leased: 0 });
    } finally {
      process.off("unhandledRejection", onUnhandled);
      await cleanup();
    }
  });
});
