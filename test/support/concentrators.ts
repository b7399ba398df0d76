// A payment operator's site with several concentrators, started in this
// process over a fresh data folder, every link real gRPC over mutual TLS on
// loopback: clearing, N concentrators, terminal hosts each given its own
// list of concentrators, payment servers (replicas among them) each linked
// to every concentrator, merchant validation and the demo shop. The card is
// driven by the test (test/support/card-client.ts), so a purchase can be
// stopped between its steps. Raw payment server streams play a copied
// certificate or another payment server.

import { cp } from "node:fs/promises";
import { createServer } from "node:net";
import { join } from "node:path";
import type { Channel } from "nice-grpc";
import { ClearingServiceDefinition } from "../../gen/netpurse/clearing/v1/clearing.js";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { MerchantServiceDefinition } from "../../gen/netpurse/merchant/v1/merchant.js";
import {
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type AttachTerminalRequest,
  type AttachTerminalResponse,
  type PsamSlot,
  type ConnectPaymentServerRequest,
  type ConnectPaymentServerResponse,
  type PsamJob,
  type PsamJobResult,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { readJson } from "../../lib/files.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { psamId as toPsamId } from "../../lib/ids.js";
import type { Security } from "../../lib/pki/security.js";
import { withOriginalAmount, type PurseReader } from "../../client/card/purse-reader.js";
import { startClearing } from "../../services/clearing/server.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { startMerchantValidation } from "../../services/merchant-validation/server.js";
import { startMerchant } from "../../services/merchant/server.js";
import { DEMO_SHOP, ensureDemoData, paths } from "../../services/network/layout.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import { startPaymentServer, type PaymentConfig } from "../../services/payment/server.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import { completeRequest, drawRequestFor, openIssued } from "./card-client.js";
import { tempDir } from "./fixtures.js";
import { testSecurity, waitFor } from "./network.js";

export interface SiteOptions {
  /** How many concentrators: concentrator-1, concentrator-2, … */
  concentrators: number;
  /** Terminal hosts: each attaches to the concentrators of `attach` (indices, in that order), one at a time; `started: false` leaves it to the test. */
  terminals: { id: string; psams: number; attach: number[]; started?: boolean }[];
  /** Payment servers, each linked to every concentrator (default one: payment-1, alone, on SQLite). */
  paymentServers?: { id?: string; replica?: string; database?: string }[];
  keepaliveIntervalMs?: number;
  holdTimeoutMs?: number;
  jobTimeoutMs?: number;
  sweepEveryMs?: number;
  cardValue?: number;
}

type Started<F extends (...a: never[]) => unknown> = Awaited<ReturnType<F>>;

/** An address nothing listens on: a port just given back. */
export async function deadAddress(): Promise<string> {
  const server = createServer();
  await new Promise<void>((resolve, reject) => server.once("error", reject).listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return `127.0.0.1:${port}`;
}

export async function startSite(o: SiteOptions) {
  const { dir: data, cleanup } = await tempDir("netpurse-site-");
  const { cardPath } = await ensureDemoData(data, {
    terminals: o.terminals,
    shops: [DEMO_SHOP],
    card: { name: "demo", value: o.cardValue ?? 10_000, maxBalance: 50_000, expiry: "2031-12-31" },
    concentrators: o.concentrators,
  });
  const p = paths(data);
  const security = await testSecurity(data);
  const clearing = await startClearing({
    security: await security.of("clearing", CLEARING_ID),
    listen: "127.0.0.1:0",
    dir: p.clearing,
    psamRegistry: psamRegistryPath(data),
  });

  /** The concentrators, by index; one closed by the test is undefined until started again on its address. */
  const concentrators: (Started<typeof startConcentrator> | undefined)[] = [];
  const startConcentratorAt = async (i: number, listen = "127.0.0.1:0") =>
    startConcentrator({
      security: await security.of("concentrator", `concentrator-${i + 1}`),
      concentratorId: `concentrator-${i + 1}`,
      psamRegistry: psamRegistryPath(data),
      listen,
      keepaliveIntervalMs: o.keepaliveIntervalMs ?? 500,
    });
  for (let i = 0; i < o.concentrators; i++) concentrators.push(await startConcentratorAt(i));
  const addresses = concentrators.map((c) => c!.address);

  const hosts = new Map<string, Started<typeof startTerminalHost>>();
  /** Starts terminal host `id`, attaching to `concentrator` (a comma-separated list; default its `attach` list); waits for its first attach. */
  const startHost = async (id: string, concentrator?: string) => {
    const t = o.terminals.find((x) => x.id === id);
    if (!t) throw new Error(`no terminal ${id} in the site`);
    const h = await startTerminalHost({
      security: await security.of("terminal", id),
      terminalId: id,
      concentrator: concentrator ?? t.attach.map((i) => addresses[i]).join(","),
      clearingAddress: clearing.address,
      dir: p.terminal(id),
      submitter: { deadlineMs: 5_000, retryMinMs: 50, retryMaxMs: 500 },
    });
    await h.host.whenConnected();
    hosts.set(id, h);
    return h;
  };
  for (const t of o.terminals) if (t.started !== false) await startHost(t.id);

  const payments: Started<typeof startPaymentServer>[] = [];
  const paymentChannels: Channel[] = [];
  const operator = await security.of("operator", "operator");
  /** Starts a payment server linked to every concentrator; a replica other than the first gets a folder of its own (keys copied). */
  const startPayment = async (s: { id?: string; replica?: string; database?: string } = {}, extra: Partial<PaymentConfig> = {}) => {
    const id = s.id ?? "payment-1";
    const dir = payments.length === 0 ? p.payment : join(data, `payment-${payments.length + 1}`);
    if (dir !== p.payment) await cp(p.payment, dir, { recursive: true, filter: (f) => !/payment\.db/.test(f) });
    const started = await startPaymentServer({
      security: await security.of("payment", id),
      listen: "127.0.0.1:0",
      dir,
      ...(s.database ? { store: { location: s.database } } : {}),
      concentrator: addresses.join(","),
      paymentServerId: id,
      ...(s.replica ? { replicaId: s.replica } : {}),
      ...(o.holdTimeoutMs ? { holdTimeoutMs: o.holdTimeoutMs } : {}),
      ...(o.jobTimeoutMs ? { jobTimeoutMs: o.jobTimeoutMs } : {}),
      ...(o.sweepEveryMs ? { sweepEveryMs: o.sweepEveryMs } : {}),
      ...extra,
    });
    payments.push(started);
    const channel = openChannel(started.address, operator.channel({ kind: "payment" }));
    paymentChannels.push(channel);
    return { server: started, client: clientFactory().create(PaymentServiceDefinition, channel) };
  };
  const firstPayment: Awaited<ReturnType<typeof startPayment>>[] = [];
  for (const s of o.paymentServers ?? [{}]) {
    const ps = await startPayment(s);
    await ps.server.whenConnected();
    firstPayment.push(ps);
  }

  const validation = await startMerchantValidation({
    security: await security.of("validation", "validation-1"),
    listen: "127.0.0.1:0",
    dir: p.validation,
    paymentServer: payments[0]!.address,
    reportEveryMs: 500,
  });
  const shop = await startMerchant({
    security: await security.of("merchant", DEMO_SHOP.merchantId),
    listen: "127.0.0.1:0",
    dir: p.merchant(DEMO_SHOP.merchantId),
    validation: validation.address,
    paymentServer: payments[0]!.address,
  });

  const channels: Channel[] = [
    openChannel(shop.address, security.cardholder.channel({ kind: "merchant" })),
    openChannel(clearing.address, operator.channel({ kind: "clearing" })),
  ];
  const factory = clientFactory();
  /** ListTerminals and CloseBatches at concentrator `i`, as the operator (a channel of its own each time: the concentrator may have moved). */
  const concentratorClient = (i: number) => {
    const channel = openChannel(addresses[i]!, operator.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
    channels.push(channel);
    return factory.create(TerminalConcentratorServiceDefinition, channel);
  };

  const site = {
    data,
    paths: p,
    security,
    cardPath,
    addresses,
    concentrators,
    hosts,
    startHost,
    payments: firstPayment,
    startPayment,
    clearing,
    validation,
    shop,
    clients: {
      merchant: factory.create(MerchantServiceDefinition, channels[0]!),
      clearing: factory.create(ClearingServiceDefinition, channels[1]!),
    },
    concentratorClient,
    /** Closes concentrator `i` (its streams end at once). */
    async closeConcentrator(i: number) {
      await concentrators[i]?.close();
      concentrators[i] = undefined;
    },
    /** Starts concentrator `i` again on its address. */
    async restartConcentrator(i: number) {
      concentrators[i] = await startConcentratorAt(i, addresses[i]);
    },
    /** The terminal hosts attached at each concentrator now, by index (a closed one: none). */
    async attachedAt(): Promise<string[][]> {
      return Promise.all(
        concentrators.map(async (c, i) => (c ? (await concentratorClient(i).listTerminals({})).terminals.map((t) => t.terminalId).sort() : [])),
      );
    },
    /** Every PSAM of the running terminal hosts as their concentrators list them: counter, open debits, batch count. */
    async psams() {
      const all: { terminalId: string; psam: string; counter: number; pending: number; batch: number }[] = [];
      for (const [i, c] of concentrators.entries()) {
        if (!c) continue;
        for (const t of (await concentratorClient(i).listTerminals({})).terminals)
          for (const s of t.slots)
            all.push({
              terminalId: t.terminalId,
              psam: Buffer.from(s.psamId?.value ?? []).toString("hex"),
              counter: s.psamCounter,
              pending: s.pendingDebits.length,
              batch: s.batchCount,
            });
      }
      return all.sort((a, b) => a.psam.localeCompare(b.psam));
    },
    async close() {
      for (const c of [...channels, ...paymentChannels]) c.close();
      await shop.close();
      await validation.close();
      for (const ps of payments) await ps.close().catch(() => undefined); // a test may have closed one
      for (const h of hosts.values()) await h.close();
      for (const c of concentrators) await c?.close();
      await clearing.close();
      await cleanup();
    },
  };
  return site;
}

export type Site = Awaited<ReturnType<typeof startSite>>;
export type SitePayment = Awaited<ReturnType<Site["startPayment"]>>;

/** A purchase of the demo shop (PSAM_VERIFIES) up to the DEBIT command, through payment server `ps`; the PSAM stays held for the card's answer. */
export async function drawUntilDebitCommand(site: Site, ps: SitePayment, card: PurseReader, product = "song-1") {
  const offer = (await site.clients.merchant.createOrder({ productId: product })).offer!;
  const issued = openIssued(offer, await ps.client.processDrawRequest(await drawRequestFor(card, offer), { deadline: 15_000 }));
  return { offer, issued };
}

/** The card executes the DEBIT command and its answer goes to payment server `ps` (CompletePurchase). */
export async function finishPurchase(ps: SitePayment, card: PurseReader, p: Awaited<ReturnType<typeof drawUntilDebitCommand>>) {
  const debit = await card.debit(withOriginalAmount(Buffer.from(p.issued.debitCommand), Number(p.offer.amount!.amountMinor)));
  return ps.client.completePurchase(completeRequest(p.offer, { sw: debit.sw, raw: debit.raw, token: p.issued.completionToken }), { deadline: 15_000 });
}

/**
 * A payment server stream played by the test on the generated client:
 * another payment server, or a copy of one's certificate under a replica id
 * of its own making. It answers pings.
 */
export function rawPaymentStream(address: string, security: Security, id: string, replica = "") {
  const channel = openChannel(address, security.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
  const out = new AsyncQueue<ConnectPaymentServerRequest>();
  const abort = new AbortController();
  const received: ConnectPaymentServerResponse[] = [];
  const stream = {
    received,
    ended: null as Error | undefined | null,
    send: (m: ConnectPaymentServerRequest) => out.push(m),
    /** Sends a job and waits for its result. */
    async run(job: PsamJob): Promise<PsamJobResult> {
      out.push({ message: { $case: "job", value: job } });
      let found: PsamJobResult | undefined;
      await waitFor(() => {
        const m = received.find((x) => x.message?.$case === "result" && x.message.value.jobId === job.jobId);
        if (m?.message?.$case === "result") found = m.message.value;
        return found !== undefined;
      }, 10_000);
      return found!;
    },
    welcomed: () => waitFor(() => received.some((m) => m.message?.$case === "welcome"), 5_000, "a welcome"),
    close() {
      out.close();
      abort.abort();
      channel.close();
    },
  };
  out.push({ message: { $case: "hello", value: { paymentServerId: id, window: 16, replicaId: replica } } });
  const finished = (async () => {
    try {
      for await (const m of clientFactory().create(TerminalConcentratorServiceDefinition, channel).connectPaymentServer(out, { signal: abort.signal })) {
        if (m.message?.$case === "ping") out.push({ message: { $case: "pong", value: { nonce: m.message.value.nonce } } });
        else received.push(m);
      }
      stream.ended = undefined;
    } catch (e) {
      stream.ended = e as Error;
    }
  })();
  return Object.assign(stream, { finished }); // the same object: `ended` is set on it
}

/** A job on one PSAM (reverse or verify a debit at `psamCounter`), as a payment server would send it. */
export const jobOn = (jobId: string, terminalId: string, psam: string, task: PsamJob["task"]): PsamJob => ({
  jobId,
  terminalId,
  psamId: toPsamId(psam),
  transactionId: undefined,
  paymentServerId: "",
  task,
});

/** The PSAMs the issuer provisioned for terminal `terminalId` (hex ids), from the registry the concentrators read. */
export async function provisionedPsams(data: string, terminalId: string): Promise<string[]> {
  const registry = await readJson<{ psams: { psamId: string; terminalId: string }[] }>(psamRegistryPath(data));
  return registry.psams.filter((x) => x.terminalId === terminalId).map((x) => x.psamId);
}

/**
 * A terminal host's stream played by the test (with the host's own
 * certificate): it announces `slots` and answers pings, nothing more; for
 * the moments a real host cannot be held in, such as being attached at two
 * concentrators at once.
 */
export function rawTerminalStream(address: string, security: Security, terminalId: string, slots: PsamSlot[]) {
  const channel = openChannel(address, security.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
  const out = new AsyncQueue<AttachTerminalRequest>();
  const abort = new AbortController();
  const received: AttachTerminalResponse[] = [];
  out.push({ message: { $case: "hello", value: { terminalId, slots, window: 4 } } });
  const finished = (async () => {
    try {
      for await (const m of clientFactory().create(TerminalConcentratorServiceDefinition, channel).attachTerminal(out, { signal: abort.signal })) {
        if (m.message?.$case === "ping") out.push({ message: { $case: "pong", value: { nonce: m.message.value.nonce } } });
        else received.push(m);
      }
    } catch {
      // ended: what the test checks is the concentrators' and the payment server's view
    }
  })();
  return {
    received,
    /** Settles when the stream has ended. */
    finished,
    welcomed: () => waitFor(() => received.some((m) => m.message?.$case === "welcome"), 5_000, "a welcome"),
    close() {
      out.close();
      abort.abort();
      channel.close();
    },
  };
}

/** A READY (or FAILED) slot of one PSAM, as a terminal host announces it. */
export const slotOf = (psam: string, state: PsamSlotState = PsamSlotState.PSAM_SLOT_STATE_READY): PsamSlot => ({
  slot: 0,
  psamId: toPsamId(psam),
  keyVersions: [1],
  currencies: [978],
  state,
  psamCounter: 0,
  pendingDebits: [],
  batchCount: 0,
  reader: "",
});
