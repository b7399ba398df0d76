// A terminal host is a real process killed (SIGKILL) at the worst moments of
// a batch's life: after clearing acknowledged it but before the host stored
// the acknowledgement, and after the PSAM closed it but before the host put
// it in its outbox. Started again, the host sends what is not acknowledged,
// and clearing counts every batch once; a batch whose records the host lost
// is never sent, and clearing reports its number missing.

import { expect } from "chai";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { ClientError, Status } from "nice-grpc";
import { BatchStatus, ClearingServiceDefinition, type ClearingServiceClient } from "../../gen/netpurse/clearing/v1/clearing.js";
import { readState } from "../../lib/apdu/state-log.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { psamId as toPsamId } from "../../lib/ids.js";
import { openSqlite } from "../../lib/store/db.js";
import { startClearing } from "../../services/clearing/server.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { DEMO_SHOPS, ensureDemoData, paths } from "../../services/network/layout.js";
import { Launcher, SCRIPTS, type Death } from "../../services/network/launcher.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import type { PsamFile } from "../../services/terminal/psam/software-psam.js";
import { TERMINAL_MIGRATIONS, TerminalStore, type StoredBatch } from "../../services/terminal/store.js";
import { issueCard, psamFileOf, recordDebits } from "../support/batches.js";
import { tempDir } from "../support/fixtures.js";
import { testSecurity, waitFor } from "../support/network.js";

const TERMINAL = "terminal-1";

describe("e2e: a terminal host killed around a batch's submission", function () {
  this.timeout(180_000);
  let dir: string;
  let cleanup: () => Promise<void>;
  let launcher: Launcher;
  const deaths: Death[] = [];
  let concentrator: Awaited<ReturnType<typeof startConcentrator>>;
  let clearingServer: Awaited<ReturnType<typeof startClearing>>;
  let channel: ReturnType<typeof openChannel>;
  let clearing: ClearingServiceClient;
  let psamFile: string;
  let psamHex: string;
  let card: string;

  before(async () => {
    ({ dir, cleanup } = await tempDir("netpurse-batch-e2e-"));
    await ensureDemoData(dir, {
      terminals: [{ id: TERMINAL, psams: 1 }],
      shops: DEMO_SHOPS.map((d) => d.shop),
      card: { name: "demo", value: 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
    });
    const security = await testSecurity(dir);
    concentrator = await startConcentrator({
      security: await security.of("concentrator", "concentrator-1"),
      psamRegistry: psamRegistryPath(dir),
      listen: "127.0.0.1:0",
    });
    clearingServer = await startClearing({
      security: await security.of("clearing", CLEARING_ID),
      listen: "127.0.0.1:0",
      dir: paths(dir).clearing,
      psamRegistry: psamRegistryPath(dir),
    });
    channel = openChannel(clearingServer.address, (await security.of("operator", "operator")).channel({ kind: "clearing" }));
    clearing = clientFactory().create(ClearingServiceDefinition, channel);
    launcher = new Launcher(join(dir, "logs"), { onDeath: (d) => deaths.push(d) });
    psamFile = psamFileOf(dir, TERMINAL);
    psamHex = (JSON.parse(await readFile(psamFile, "utf8")) as PsamFile).psamId;
    card = await issueCard(dir, "batch-e2e");
  });
  after(async () => {
    channel?.close();
    await launcher?.stopAll();
    await clearingServer?.close();
    await concentrator?.close();
    await cleanup?.();
  });

  /** Starts the terminal host process; it closes a batch half a second after its first record. */
  const startHost = (crashAt?: string) =>
    launcher.start(
      TERMINAL,
      SCRIPTS.terminal,
      ["--id", TERMINAL, "--concentrator", concentrator.address, "--clearing", clearingServer.address, "--data", dir, "--batch-close-after-ms", "500"],
      60_000,
      crashAt ? { NETPURSE_TEST_TERMINAL_CRASH_AT: crashAt } : {},
    );

  /** Waits until the host killed itself at its kill point. */
  const killed = async (n: number) => {
    await waitFor(() => deaths.length === n, 20_000, `the terminal host to kill itself (death ${n})`);
    expect(deaths[n - 1]).to.include({ name: TERMINAL, signal: "SIGKILL" });
  };

  /** The host's record of its closed batches, read while it is stopped. */
  async function storedBatches(): Promise<StoredBatch[]> {
    const db = openSqlite(join(paths(dir).terminal(TERMINAL), "terminal.db"), TERMINAL_MIGRATIONS);
    try {
      return await new TerminalStore(db).batches();
    } finally {
      await db.close();
    }
  }

  const batchAtClearing = async (batchNumber: number) =>
    (await clearing.getBatch({ psamId: toPsamId(psamHex), batchNumber, pageSize: 0, pageToken: "" })).batch!;

  const log = () => readFile(join(dir, "logs", `${TERMINAL}.log`), "utf8");

  it("resends a batch whose acknowledgement it never stored, and clearing counts it once", async () => {
    await recordDebits({ psamFile, cardPath: card, merchantId: "demo-shop", amounts: [100, 200, 300] });
    await startHost("after-batch-sent");
    await killed(1);
    // Clearing counted the batch; the host died before it knew.
    expect(await batchAtClearing(1)).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 3, posted: 3, resubmissions: 0 });
    expect((await storedBatches()).map((b) => [b.batch_number, b.state])).to.deep.equal([[1, "pending"]]);

    await startHost();
    await waitFor(async () => (await batchAtClearing(1)).resubmissions === 1, 20_000, "batch 1 sent again");
    await launcher.stop(TERMINAL);
    expect(await storedBatches()).to.have.length(1);
    expect((await storedBatches())[0]).to.include({ batch_number: 1, state: "accepted", posted: 3 });
    expect(await batchAtClearing(1)).to.include({ status: BatchStatus.BATCH_STATUS_ACCEPTED, count: 3, posted: 3, resubmissions: 1 });
    const { settlement } = await clearing.getSettlement({ day: "" });
    expect(settlement?.purchases).to.equal(3); // counted once
    expect(await log()).to.match(/batch acknowledged by clearing psam=\w+ batch=1 .*duplicate=true/);
  });

  it("rebuilds the outbox entry of a batch the PSAM closed just before the host died, and sends it", async () => {
    await recordDebits({ psamFile, cardPath: card, merchantId: "demo-shop", amounts: [400, 500] });
    await startHost("after-close-batch");
    await killed(2);
    // The PSAM closed batch 2; the host's outbox never heard of it.
    const psam = await readState<PsamFile>(psamFile);
    expect(psam.lastClosed).to.include({ batchNumber: 2, count: 2, total: 900 });
    expect(psam.batch).to.have.length(0);
    expect((await storedBatches()).map((b) => b.batch_number)).to.deep.equal([1]);

    await startHost();
    await waitFor(async () => (await batchAtClearing(2).catch(() => undefined))?.status === BatchStatus.BATCH_STATUS_ACCEPTED, 20_000, "batch 2 at clearing");
    await launcher.stop(TERMINAL);
    expect(await batchAtClearing(2)).to.include({ count: 2, posted: 2, resubmissions: 0 });
    expect((await storedBatches()).find((b) => b.batch_number === 2)).to.include({ state: "accepted" });
  });

  it("never sends a closed batch whose records the host lost; clearing reports its number missing when the next one arrives", async () => {
    await recordDebits({ psamFile, cardPath: card, merchantId: "demo-shop", amounts: [600] });
    await startHost("after-close-batch");
    await killed(3);
    // The host's copy of batch 3's record is lost (a damaged store): the PSAM no longer holds it either.
    const db = openSqlite(join(paths(dir).terminal(TERMINAL), "terminal.db"), TERMINAL_MIGRATIONS);
    await db.run("DELETE FROM psam_transactions WHERE psam_id = ? AND batch_number = 3", [psamHex]);
    await db.close();

    await startHost();
    await waitFor(async () => (await log()).includes("records are missing from the store"), 10_000, "the host to report batch 3 incomplete");
    await launcher.stop(TERMINAL);
    expect((await storedBatches()).find((b) => b.batch_number === 3)).to.include({ state: "incomplete", record_count: 1, total_minor: 600 });
    const absent = await clearing.getBatch({ psamId: toPsamId(psamHex), batchNumber: 3, pageSize: 0, pageToken: "" }).catch((e: unknown) => e);
    expect(absent).to.be.instanceOf(ClientError);
    expect((absent as ClientError).code).to.equal(Status.NOT_FOUND);

    await recordDebits({ psamFile, cardPath: card, merchantId: "demo-shop", amounts: [700] });
    await startHost();
    await waitFor(async () => (await batchAtClearing(4).catch(() => undefined))?.status === BatchStatus.BATCH_STATUS_ACCEPTED, 20_000, "batch 4 at clearing");
    await waitFor(async () => /misses earlier batches of this PSAM .*batch=4 .*missing=3/.test(await log()), 5_000, "the host to log the gap");
    const { settlement } = await clearing.getSettlement({ day: "" });
    expect(settlement?.purchases).to.equal(6); // 3 + 2 + 1: batch 3's debit was never paid
  });
});
