// The parts a load crosses on its way to clearing, started in this process
// over a fresh data folder: the bank, the load server and the clearing
// service, each on its own loopback port with real gRPC and TLS between
// them. Clearing and the load server can be stopped and started again on the
// same address and data, and a TCP relay can sit between the two and hold
// back clearing's answers (an acknowledgement lost on the way).

import { ClientError, Status } from "nice-grpc";
import { createConnection, createServer, type Socket } from "node:net";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { LoadServiceDefinition } from "../../gen/netpurse/load/v1/load.js";
import { bearer, clientFactory, openChannel } from "../../lib/grpc/client.js";
import { startBankServer } from "../../services/bank/server.js";
import { startClearing } from "../../services/clearing/server.js";
import { DEMO_BANK, ensureDemoData, paths } from "../../services/network/layout.js";
import { psamRegistryPath } from "../../services/network/pki.js";
import { startLoadServer, type LoadConfig } from "../../services/load/server.js";
import type { ClearingReport } from "../../services/load/store.js";
import { tempDir } from "./fixtures.js";
import { testSecurity, waitFor, type Network } from "./network.js";

/** Short enough that a test sees a retry within a second or two. */
/** Quick reporting to clearing, so that a test sees a load arrive as soon as clearing can take it. */
export const FAST_REPORTING: LoadConfig["reporting"] = { everyMs: 500, firstBackoffMs: 100, maxBackoffMs: 400, deadlineMs: 5_000 };

export async function startLoadClearing() {
  const { dir: data, cleanup } = await tempDir("netpurse-load-clearing-");
  await ensureDemoData(data, { terminals: [], shops: [], card: { name: "demo", value: 0, maxBalance: 50_000, expiry: "2031-12-31" } });
  const p = paths(data);
  const security = await testSecurity(data);
  const clearingSecurity = await security.of("clearing", "clearing-1");
  const loadSecurity = await security.of("load", "load-1");
  const clearingDir = `${data}/clearing`;

  const startClearingAt = (listen: string) => startClearing({ security: clearingSecurity, listen, dir: clearingDir, psamRegistry: psamRegistryPath(data) });
  let clearing: Awaited<ReturnType<typeof startClearing>> | undefined = await startClearingAt("127.0.0.1:0");
  const clearingAddress = clearing.address;

  const startLoad = (listen: string, clearingAt: string) =>
    startLoadServer({ security: loadSecurity, listen, dir: p.load, clearing: clearingAt, reporting: FAST_REPORTING });
  let load = await startLoad("127.0.0.1:0", clearingAddress);
  const loadAddress = load.address;

  const bank = await startBankServer({ security: await security.of("bank", DEMO_BANK.bankId), listen: "127.0.0.1:0", dir: p.bank, loadServer: loadAddress });

  const factory = clientFactory();
  const operator = await security.of("operator", "operator");
  const channels = [
    openChannel(bank.address, security.cardholder.channel({ kind: "bank" })),
    openChannel(loadAddress, security.cardholder.channel({ kind: "load" })),
    openChannel(clearingAddress, operator.channel({ kind: "clearing" })),
    // The load server's own certificate, for records sent to clearing by hand.
    openChannel(clearingAddress, loadSecurity.channel({ kind: "clearing" })),
  ] as const;
  const bankTokens = new Map<string, string>();

  const fx = {
    data,
    paths: p,
    security,
    bank,
    get load() {
      return load;
    },
    clearingAddress,
    clients: {
      bank: factory.create(BankServiceDefinition, channels[0]),
      load: factory.create(LoadServiceDefinition, channels[1]),
      clearing: factory.create(ClearingServiceDefinition, channels[2]),
      clearingAsLoadServer: factory.create(ClearingServiceDefinition, channels[3]),
    },
    async loginAs(accountId: string, password: string): Promise<string> {
      const { accessToken } = await fx.clients.bank.login({ accountId, password });
      bankTokens.set(accountId, accessToken);
      return accessToken;
    },
    bankAs(accountId: string) {
      const token = bankTokens.get(accountId);
      if (!token) throw new Error(`no access token for account ${accountId}: log in first (loginAs)`);
      return factory.create(BankServiceDefinition, channels[0], { "*": { metadata: bearer(token) } });
    },
    /** Stops clearing (its data stays); calls to its address fail UNAVAILABLE. */
    async stopClearing(): Promise<void> {
      await clearing?.close();
      clearing = undefined;
    },
    /** Starts clearing again on its address, with the data it had. */
    async startClearing(): Promise<void> {
      clearing ??= await startClearingAt(clearingAddress);
    },
    /** Stops the load server and starts it again on its address and data, reporting to `clearingAt` (default: clearing). */
    async restartLoad(clearingAt = clearingAddress): Promise<void> {
      await load.close();
      load = await startLoad(loadAddress, clearingAt);
    },
    /** The load's entry in the load server's outbox to clearing. */
    async report(id: string): Promise<ClearingReport | undefined> {
      return (await load.store.clearingReports()).find((r) => r.transaction_id === id);
    },
    /** Waits until clearing has acknowledged the load (or it was set aside), and returns its outbox entry. */
    async reported(id: string, timeoutMs = 10_000): Promise<ClearingReport> {
      await waitFor(async () => !!(await fx.report(id))?.reported_at || !!(await fx.report(id))?.refused_at, timeoutMs, `load ${id} reported to clearing`);
      return (await fx.report(id))!;
    },
    /** A settlement day's figures, as the operator reads them (empty day: the day open now). */
    async settlement(day = "") {
      return (await fx.clients.clearing.getSettlement({ day })).settlement!;
    },
    async close() {
      for (const c of channels) c.close();
      await bank.close();
      await load.close();
      await clearing?.close();
      await cleanup();
    },
  };
  return fx;
}

export type LoadClearing = Awaited<ReturnType<typeof startLoadClearing>>;

/**
 * The fixture as the load test helpers (test/support/load.ts) take it: they
 * use its data folder, the bank and its logins only.
 */
export const asNetwork = (fx: LoadClearing) => fx as unknown as Network;

/** Whether a call failed UNAVAILABLE (the server is not there). */
export const unavailable = (e: unknown) => e instanceof ClientError && e.code === Status.UNAVAILABLE;

/**
 * A TCP relay to `target`: bytes pass both ways until `hold()`, after which
 * what the target sends back is kept, not delivered (connections made before
 * stay up, so a request sent on them arrives and its answer does not).
 */
export async function startRelay(target: string) {
  const [host, port] = [target.slice(0, target.lastIndexOf(":")), Number(target.slice(target.lastIndexOf(":") + 1))];
  let holding = false;
  const sockets = new Set<Socket>();
  const server = createServer((client) => {
    const upstream = createConnection({ host, port });
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => undefined);
    }
    client.pipe(upstream);
    upstream.on("data", (d: Buffer) => {
      if (!holding) client.write(d);
    });
    client.on("close", () => upstream.destroy());
    upstream.on("close", () => client.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address() as { port: number };
  return {
    address: `127.0.0.1:${address.port}`,
    hold() {
      holding = true;
    },
    async close() {
      for (const s of sockets) s.destroy();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    },
  };
}
