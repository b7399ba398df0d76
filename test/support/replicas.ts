// Two payment servers as replicas of one payment service, in this process,
// on one PostgreSQL database (test/support/postgres.ts): one identity and
// certificate ("payment-1"), each naming itself in its stream to the
// concentrator ("a", "b"). Around them: a concentrator, clearing, a
// terminal host with its PSAMs, the merchant validation service (which
// reports card proofs to replica B), the four demo shops (whose offers name
// replica A) and the demo card, opened as the client module would.

import pg from "pg";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import { PaymentServiceDefinition, type Purchase as PurchaseView } from "../../gen/netpurse/payment/v1/payment.js";
import { TerminalConcentratorServiceDefinition, type PsamSlot } from "../../gen/netpurse/terminal/v1/terminal.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf } from "../../lib/ids.js";
import { startClearing } from "../../services/clearing/server.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { startMerchant } from "../../services/merchant/server.js";
import { DEMO_SHOPS, ensureDemoData, paths } from "../../services/network/layout.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import { startPaymentServer, type PaymentConfig } from "../../services/payment/server.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import { openCard } from "./card-client.js";
import { tempDir } from "./fixtures.js";
import { testSecurity, waitFor } from "./network.js";
import { defined } from "./offers.js";
import { postgresOrSkip } from "./postgres.js";

export type ReplicaName = "a" | "b";

/** The purchase states no step follows. */
export const FINAL_STATES = ["COMPLETED", "REVERSED", "REFUSED"];

export interface ReplicaOptions {
  psams?: number;
  holdTimeoutMs?: number;
  proofTimeoutMs?: number;
  sweepEveryMs?: number;
  maxPsamWaitMs?: number;
  abandonReceivedAfterMs?: number;
  maxUnansweredPerPurse?: number;
  /** Each replica's lock pool (PostgreSQL connections for the transactions' locks). */
  lockPoolSize?: number;
  /** Started without --replica: each takes the default id (HOSTNAME-PID, -2 … for more in this process). */
  unnamed?: boolean;
}

/** The replicas' network, or the suite skipped loudly (in its before hook) when PostgreSQL cannot be had. */
export async function startReplicas(ctx: Mocha.Context, o: ReplicaOptions = {}) {
  const database = await postgresOrSkip(ctx);
  const { dir: data, cleanup } = await tempDir("netpurse-replicas-");
  const terminal = { id: "terminal-1", psams: o.psams ?? 2 };
  const { cardPath } = await ensureDemoData(data, {
    terminals: [terminal],
    shops: DEMO_SHOPS.map((d) => d.shop),
    card: { name: "demo", value: 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
  });
  const p = paths(data);
  const security = await testSecurity(data);
  const concentrator = await startConcentrator({
    security: await security.of("concentrator", "concentrator-1"),
    psamRegistry: psamRegistryPath(data),
    listen: "127.0.0.1:0",
    keepaliveIntervalMs: 1_000,
  });
  const clearing = await startClearing({
    security: await security.of("clearing", CLEARING_ID),
    listen: "127.0.0.1:0",
    dir: p.clearing,
    psamRegistry: psamRegistryPath(data),
  });
  const startHost = async () => {
    const h = await startTerminalHost({
      security: await security.of("terminal", terminal.id),
      terminalId: terminal.id,
      concentrator: concentrator.address,
      clearingAddress: clearing.address,
      dir: p.terminal(terminal.id),
    });
    await h.host.whenConnected();
    return h;
  };
  let host: Awaited<ReturnType<typeof startHost>> | undefined = await startHost();

  const paymentSecurity = await security.of("payment", "payment-1");
  const config = (replica: ReplicaName): PaymentConfig => ({
    security: paymentSecurity,
    listen: "127.0.0.1:0",
    dir: p.payment,
    store: { location: database.url },
    concentrator: concentrator.address,
    paymentServerId: "payment-1",
    ...(o.unnamed ? {} : { replicaId: replica }),
    holdTimeoutMs: o.holdTimeoutMs ?? 20_000,
    proofTimeoutMs: o.proofTimeoutMs ?? 60_000,
    sweepEveryMs: o.sweepEveryMs ?? 500,
    maxPsamWaitMs: o.maxPsamWaitMs ?? 3_000,
    abandonReceivedAfterMs: o.abandonReceivedAfterMs ?? 60_000,
    ...(o.maxUnansweredPerPurse !== undefined ? { maxUnansweredPerPurse: o.maxUnansweredPerPurse } : {}),
    ...(o.lockPoolSize !== undefined ? { lockPoolSize: o.lockPoolSize } : {}),
  });
  type Replica = Awaited<ReturnType<typeof startPaymentServer>>;
  const replicas = new Map<ReplicaName, Replica>();
  const operator = await security.of("operator", "operator");
  const factory = clientFactory();
  const channels: ReturnType<typeof openChannel>[] = [];
  const clients = new Map<ReplicaName, ReturnType<typeof paymentClient>>();
  function paymentClient(address: string) {
    const channel = openChannel(address, operator.channel({ kind: "payment" }));
    channels.push(channel);
    return factory.create(PaymentServiceDefinition, channel);
  }
  const startReplica = async (name: ReplicaName) => {
    const r = await startPaymentServer(config(name));
    await r.whenConnected();
    await waitFor(() => r.pool.counts().total === terminal.psams, 10_000, `replica ${name} to see every PSAM`);
    replicas.set(name, r);
    // A restarted replica listens on a new port: callers reach it through a new channel.
    clients.set(name, paymentClient(r.address));
    return r;
  };
  await startReplica("a");
  await startReplica("b");
  const replica = (name: ReplicaName) => defined(replicas.get(name), `replica ${name}`);

  const validation = await startMerchantValidation({
    security: await security.of("validation", "validation-1"),
    listen: "127.0.0.1:0",
    dir: p.validation,
    paymentServer: replica("b").address,
    reportEveryMs: 300,
  });
  const shops = await Promise.all(
    DEMO_SHOPS.map(async (d) =>
      startMerchant({
        security: await security.of("merchant", d.shop.merchantId),
        listen: "127.0.0.1:0",
        dir: p.merchant(d.shop.merchantId),
        validation: validation.address,
        paymentServer: replica("a").address,
      }),
    ),
  );
  const shopChannels = shops.map((s) => openChannel(s.address, security.cardholder.channel({ kind: "merchant" })));
  const merchants = Object.fromEntries(
    DEMO_SHOPS.map((d, i) => [d.shop.merchantId, factory.create(MerchantServiceDefinition, defined(shopChannels[i], "a shop's channel"))]),
  );
  const concentratorChannel = openChannel(concentrator.address, operator.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
  const concentratorClient = factory.create(TerminalConcentratorServiceDefinition, concentratorChannel);
  const card = await openCard(cardPath);
  // The payment schema as an operator would query it, for what no RPC lists (every row, in every state).
  const sql = new pg.Client({ connectionString: database.url, options: "-c search_path=payment" });
  await sql.connect();

  const net = {
    database,
    data,
    card,
    cardPath,
    concentrator,
    /** A replica's payment server. */
    replica,
    /** PaymentService at a replica, as the operator calls it (GetPurchase too). */
    payment: (name: ReplicaName) => defined(clients.get(name), `the client of replica ${name}`),
    /** The demo shop of a mode: demo-shop (PSAM_VERIFIES), server-shop, client-shop, merchant-shop. */
    shop: (id: string) => defined(merchants[id], `the demo shop ${id}`),
    validation,
    async offerAt(shopId: string, product = "song-1"): Promise<PaymentOffer> {
      return defined((await net.shop(shopId).createOrder({ productId: product })).offer, "the shop's offer");
    },
    /** The purchase's record as a replica reads it (both read the one database; B by default, which the tests never crash). */
    async purchase(o: PaymentOffer, at: ReplicaName = "b"): Promise<PurchaseView> {
      return defined((await net.payment(at).getPurchase({ transactionId: o.transactionId })).purchase, "the purchase's record");
    },
    /** How many of the purchase's events are `step`. */
    async stepCount(o: PaymentOffer, step: string): Promise<number> {
      return (await net.purchase(o)).events.filter((e) => e.step === step).length;
    },
    /** Every PSAM as the concentrator reports it: its counter, open debits and batch size, summed. */
    async psams(): Promise<{ counter: number; pending: number; batch: number }> {
      let counter = 0,
        pending = 0,
        batch = 0;
      for (const t of (await concentratorClient.listTerminals({})).terminals)
        for (const s of t.slots) {
          counter += s.psamCounter;
          pending += s.pendingDebits.length;
          batch += s.batchCount;
        }
      return { counter, pending, batch };
    },
    /** The PSAM slot (and its terminal) holding an open debit of the transaction, as the concentrator lists it; undefined when none does. */
    async slotHolding(transactionId: string): Promise<{ terminalId: string; slot: PsamSlot } | undefined> {
      for (const t of (await concentratorClient.listTerminals({})).terminals)
        for (const slot of t.slots) if (slot.pendingDebits.some((d) => d.transactionId?.value === transactionId)) return { terminalId: t.terminalId, slot };
      return undefined;
    },
    /** The PSAM ids of the terminal, as the concentrator lists them. */
    async psamIds(): Promise<string[]> {
      return (await concentratorClient.listTerminals({})).terminals.flatMap((t) => t.slots.map((s) => hexOf(s.psamId?.value)));
    },
    balance: async () => (await card.readPurse()).balance,
    /** Rows of the payment database not in a final state, by transaction id. */
    async nonFinal(): Promise<Record<string, string>> {
      const r = await sql.query<{ transaction_id: string; state: string }>("SELECT transaction_id, state FROM purchases WHERE state <> ALL($1)", [
        FINAL_STATES,
      ]);
      return Object.fromEntries(r.rows.map((x) => [x.transaction_id, x.state]));
    },
    /** Every purchase row's state and amount (for the money's sums). */
    async rows(): Promise<{ transaction_id: string; state: string; amount_minor: string; purse_id: string }[]> {
      const r = await sql.query<{ transaction_id: string; state: string; amount_minor: string; purse_id: string }>(
        "SELECT transaction_id, state, amount_minor, purse_id FROM purchases",
      );
      return r.rows;
    },
    /** Kills a replica as a crash would (no last write, no release), and forgets it. */
    async crash(name: ReplicaName): Promise<void> {
      const r = replica(name);
      replicas.delete(name);
      await r.crash();
    },
    /** Starts a replica again on the same database (after a crash). */
    startReplica,
    /** The configuration a replica starts with, for a test that starts one more of its own (which it closes). */
    config,
    /** The payment servers the concentrator has a stream of, with their replica ids. */
    async paymentStreams(): Promise<{ paymentServerId: string; replicaId: string }[]> {
      return (await concentratorClient.listTerminals({})).paymentServers.map((p) => ({ paymentServerId: p.paymentServerId, replicaId: p.replicaId }));
    },
    /** The payment schema, as an operator would query it. */
    sql,
    /** Stops the terminal host (its PSAMs leave both pools), or starts it again. */
    async stopHost(): Promise<void> {
      await host?.close();
      host = undefined;
      await waitFor(() => [...replicas.values()].every((r) => r.pool.counts().total === 0), 10_000, "the PSAMs to leave the pools");
    },
    async startHost(): Promise<void> {
      host ??= await startHost();
      await waitFor(() => [...replicas.values()].every((r) => r.pool.counts().total === terminal.psams), 10_000, "the PSAMs back in the pools");
    },
    async close(): Promise<void> {
      for (const c of [...channels, ...shopChannels, concentratorChannel]) c.close();
      await sql.end().catch(() => undefined);
      for (const s of shops) await s.close();
      await validation.close();
      for (const r of replicas.values()) await r.close();
      await host?.close();
      await clearing.close();
      await concentrator.close();
      await database.stop();
      await cleanup();
    },
  };
  return net;
}

export type Replicas = Awaited<ReturnType<typeof startReplicas>>;
