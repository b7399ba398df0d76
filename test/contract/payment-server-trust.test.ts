// What a second payment server can do to the first, through the real
// concentrator and terminal host over mutual TLS: a hostile process holding a
// genuine payment-server certificate (a stolen one, or a replica gone bad).
// It sees none of the other's open debits, cannot reverse or verify them,
// and cannot starve the pool of PSAMs: the other's purchases go on and are
// paid, and its debits stay as its card proved them.

import { expect } from "chai";
import type { Channel } from "nice-grpc";
import {
  PsamJobStatus,
  TerminalConcentratorServiceDefinition,
  type ConnectPaymentServerRequest,
  type ConnectPaymentServerResponse,
  type PsamJob,
  type PsamJobResult,
  type TerminalInfo,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { PurchaseState } from "../../gen/netpurse/payment/v1/payment.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { hexOf, psamId, txnId } from "../../lib/ids.js";
import { completeRequest, drawRequestFor, openCard, openIssued } from "../support/card-client.js";
import { startNetwork, waitFor, type Network } from "../support/network.js";

/** A payment server stream of the test's own: what it is told, and the jobs it sends. */
class RoguePaymentServer {
  private readonly out = new AsyncQueue<ConnectPaymentServerRequest>();
  private readonly abort = new AbortController();
  readonly pool = new Map<string, TerminalInfo>();
  private readonly results = new Map<string, (r: PsamJobResult) => void>();
  ended: Error | undefined | null = null;
  /** Settles when the stream has ended, however it ended (see `ended`). */
  readonly finished: Promise<void>;

  constructor(channel: Channel, id: string) {
    const client = clientFactory().create(TerminalConcentratorServiceDefinition, channel);
    this.out.push({ message: { $case: "hello", value: { paymentServerId: id, window: 16, replicaId: "" } } });
    this.finished = (async () => {
      try {
        for await (const m of client.connectPaymentServer(this.out, { signal: this.abort.signal })) this.take(m);
        this.ended = undefined;
      } catch (e) {
        this.ended = e as Error;
      }
    })();
  }

  private take(m: ConnectPaymentServerResponse): void {
    const msg = m.message;
    if (msg?.$case === "poolUpdate" && msg.value.terminal) this.pool.set(msg.value.terminal.terminalId, msg.value.terminal);
    if (msg?.$case === "ping") this.out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
    if (msg?.$case === "result") this.results.get(msg.value.jobId)?.(msg.value);
  }

  /** Every open debit it is shown, across the pool. */
  openDebits(): string[] {
    return [...this.pool.values()].flatMap((t) => t.slots.flatMap((s) => s.pendingDebits.map((p) => p.transactionId?.value ?? "")));
  }

  run(job: Omit<PsamJob, "paymentServerId">): Promise<PsamJobResult> {
    return new Promise((resolve) => {
      this.results.set(job.jobId, resolve);
      // It may write any payment_server_id it likes; the concentrator overwrites it.
      this.out.push({ message: { $case: "job", value: { ...job, paymentServerId: "payment-1" } } });
    });
  }

  close(): void {
    this.out.close();
    this.abort.abort();
  }
}

describe("contract: a second payment server cannot touch the first one's work", function () {
  this.timeout(60_000);
  let net: Network;
  let rogue: RoguePaymentServer;
  let channel: Channel;

  before(async () => {
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 2 }] });
    channel = openChannel(net.concentrator.address, (await net.security.of("payment", "payment-rogue")).channel({ kind: "concentrator" }), {
      maxMessageBytes: 256 * 1024,
    });
    rogue = new RoguePaymentServer(channel, "payment-rogue");
    await waitFor(() => rogue.pool.size === 1, 5_000, "the rogue to be told of the pool");
  });
  after(async () => {
    rogue?.close();
    channel?.close();
    await net?.close();
  });

  it("sees none of its open debits, and can neither reverse nor verify them; the purchase is then paid", async () => {
    const card = await openCard(net.cardPath);
    const offer = (await net.merchants["server-shop"]!.createOrder({ productId: "song-1" })).offer!;
    const issued = openIssued(offer, await net.clients.payment.processDrawRequest(await drawRequestFor(card, offer)));
    const id = offer.transactionId!.value;
    // The operator sees the open debit; the rogue is told of the pool but not of this debit.
    await waitFor(async () => {
      const t = (await net.clients.concentrator.listTerminals({})).terminals[0];
      return t?.slots.some((s) => s.pendingDebits.some((p) => p.transactionId?.value === id)) === true;
    });
    await new Promise((r) => setTimeout(r, 300)); // the rogue had time to hear of it, were it shown
    expect(rogue.openDebits()).to.not.include(id);

    const job = { jobId: "rogue-1", terminalId: issued.terminalId, psamId: issued.psamId, transactionId: txnId(id) };
    const reversal = await rogue.run({ ...job, task: { $case: "reverseDebit", value: { psamCounter: issued.psamCounter } } });
    expect(reversal.status, reversal.message).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED);
    expect(reversal.message).to.contain("another payment server"); // refused by the concentrator, which does not name the owner
    const verify = await rogue.run({
      ...job,
      jobId: "rogue-2",
      task: { $case: "verifyDebit", value: { psamCounter: issued.psamCounter, cardStatusWord: 0x9000, debitResponse: Buffer.alloc(17) } },
    });
    expect(verify.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED);

    // The debit is still open in the PSAM, and the card's answer pays the purchase.
    const answer = await card.debit(issued.debitCommand);
    await net.clients.payment.completePurchase(completeRequest(offer, { sw: answer.sw, raw: answer.raw, token: issued.completionToken }));
    await waitFor(async () => (await net.clients.payment.getPurchase({ transactionId: txnId(id) })).purchase?.state === PurchaseState.PURCHASE_STATE_COMPLETED);
    // Settled, the debit is no longer open: the terminal host itself knows whose it was, and refuses the rogue again.
    const late = await rogue.run({
      ...job,
      jobId: "rogue-3",
      task: { $case: "verifyDebit", value: { psamCounter: issued.psamCounter, cardStatusWord: 0x9000, debitResponse: Buffer.from(answer.raw) } },
    });
    expect(late.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED);
    expect(late.message).to.contain("issued for payment server payment-1");
  });

  it("holds at most its share of the PSAMs, never released, and the other's purchases go on", async () => {
    const [t] = [...rogue.pool.values()];
    const psams = t?.slots.map((s) => hexOf(s.psamId?.value)) ?? [];
    expect(psams).to.have.length(2);
    const leased = [];
    for (const [i, p] of psams.entries()) {
      // A job takes the lease; a REVERSE DEBIT of a counter with no debit is refused by the PSAM, but the lease stays.
      leased.push(
        await rogue.run({
          jobId: `hog-${i}`,
          terminalId: "terminal-1",
          psamId: psamId(p),
          transactionId: undefined,
          task: { $case: "reverseDebit", value: { psamCounter: 999 } },
        }),
      );
    }
    const busy = leased.filter((r) => r.status === PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    expect(busy, "at least one lease refused as beyond its share").to.have.length.at.least(1);
    expect(busy[0]?.message).to.match(/share of the pool|leased to payment server payment-1/);
    // Two purchases of the honest payment server, one after the other, still find a PSAM.
    for (let i = 0; i < 2; i++) {
      const { offer } = await net.clients.merchant.createOrder({ productId: "song-1" });
      const r = await net.clients.cardholder.payOffer({ offer, approvedAmount: offer!.amount }, { deadline: 20_000 });
      expect(r.receipt!.goods).to.match(/^licence key/);
    }
  });
});
