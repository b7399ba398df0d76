// Contract of netpurse.terminal.v1.TerminalConcentratorService: the real
// concentrator on loopback, with the test acting as terminal hosts and
// payment servers on raw bidirectional streams through the generated client.

import { expect } from "chai";
import { ClientError, Status, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { psamId } from "../../lib/ids.js";
import {
  PsamJobStatus,
  PsamSlotState,
  TerminalConcentratorServiceDefinition,
  type AttachTerminalRequest,
  type AttachTerminalResponse,
  type ConnectPaymentServerRequest,
  type ConnectPaymentServerResponse,
  type PsamJob,
  type PsamSlot,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { startConcentrator } from "../../services/concentrator/server.js";
import { waitFor } from "../support/network.js";

/** One end of a bidirectional stream: what we send, and what arrived. */
class Peer<Out, In> {
  readonly out = new AsyncQueue<Out>();
  readonly received: In[] = [];
  ended: Error | undefined | null = null;
  readonly abort = new AbortController();
  /** Settles when the stream has ended, however it ended (see `ended`). */
  readonly finished: Promise<void>;

  constructor(open: (out: AsyncIterable<Out>, signal: AbortSignal) => AsyncIterable<In>) {
    this.finished = (async () => {
      try {
        for await (const m of open(this.out, this.abort.signal)) this.received.push(m);
        this.ended = undefined;
      } catch (e) {
        this.ended = e as Error;
      }
    })();
  }

  send(m: Out): void {
    this.out.push(m);
  }

  async next<T extends In>(pred: (m: In) => m is T, timeoutMs = 5_000): Promise<T> {
    let found: T | undefined;
    await waitFor(
      () => {
        const i = this.received.findIndex(pred);
        if (i < 0) return false;
        found = this.received.splice(i, 1)[0] as T;
        return true;
      },
      timeoutMs,
      "a message",
    );
    return found!;
  }

  close(): void {
    this.out.close();
    this.abort.abort();
  }
}

type TIn = AttachTerminalResponse;
type PIn = ConnectPaymentServerResponse;
const isJob = (m: TIn): m is TIn & { message: { $case: "job"; value: PsamJob } } => m.message?.$case === "job";
const isPing = (m: TIn): m is TIn & { message: { $case: "ping"; value: { nonce: bigint } } } => m.message?.$case === "ping";
const isResult = (m: PIn): m is PIn & { message: { $case: "result" } } => m.message?.$case === "result";
const isPool = (m: PIn): m is PIn & { message: { $case: "poolUpdate" } } => m.message?.$case === "poolUpdate";

const slot = (n: number, id: string): PsamSlot => ({
  slot: n,
  psamId: psamId(id),
  keyVersions: [1],
  currencies: [978],
  state: PsamSlotState.PSAM_SLOT_STATE_READY,
  psamCounter: 0,
  pendingDebits: [],
  batchCount: 0,
});

const job = (id: string, terminalId: string, psam: string): PsamJob => ({
  jobId: id,
  terminalId,
  psamId: psamId(psam),
  transactionId: undefined,
  task: { $case: "reverseDebit", value: { psamCounter: 1 } },
});

describe("contract: netpurse.terminal.v1.TerminalConcentratorService", function () {
  this.timeout(30_000);
  let c: Awaited<ReturnType<typeof startConcentrator>>;
  let client: Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>;
  const peers: Peer<unknown, unknown>[] = [];

  beforeEach(async () => {
    c = await startConcentrator({ listen: "127.0.0.1:0", keepaliveIntervalMs: 300, paymentServerWindow: 3 });
    client = clientFactory().create(TerminalConcentratorServiceDefinition, openChannel(c.address, { maxMessageBytes: 256 * 1024 }));
  });
  afterEach(async () => {
    for (const p of peers.splice(0)) p.close();
    await c.close();
  });

  function terminal(id: string, slots: PsamSlot[], window = 4, answerPings = true) {
    const p = new Peer<AttachTerminalRequest, TIn>((out, signal) => client.attachTerminal(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "hello", value: { terminalId: id, slots, window } } });
    if (answerPings) {
      const t = setInterval(() => {
        const i = p.received.findIndex(isPing);
        if (i >= 0) {
          const ping = p.received.splice(i, 1)[0] as TIn & { message: { $case: "ping"; value: { nonce: bigint } } };
          p.send({ message: { $case: "pong", value: { nonce: ping.message.value.nonce } } });
        }
        if (p.ended !== null) clearInterval(t);
      }, 20);
    }
    return p;
  }

  function paymentServer(id: string) {
    const p = new Peer<ConnectPaymentServerRequest, PIn>((out, signal) => client.connectPaymentServer(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "hello", value: { paymentServerId: id, window: 16 } } });
    return p;
  }

  const answer = (t: Peer<AttachTerminalRequest, TIn>, j: PsamJob, status = PsamJobStatus.PSAM_JOB_STATUS_OK) =>
    t.send({
      message: {
        $case: "result",
        value: {
          jobId: j.jobId,
          terminalId: j.terminalId,
          psamId: j.psamId,
          status,
          statusWord: 0x9000,
          message: "",
          slot: undefined,
          outcome: { $case: "debitReversed", value: { psamCounter: 1 } },
        },
      },
    });

  it("welcomes a terminal, tells payment servers about it, and lists it for operators", async () => {
    const t = terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    await t.next((m): m is TIn => m.message?.$case === "welcome");
    const ps = paymentServer("ps1");
    await ps.next((m): m is PIn => m.message?.$case === "welcome");
    const u = await ps.next(isPool);
    expect(u.message.value.terminal?.terminalId).to.equal("t1");
    expect(u.message.value.terminal?.slots).to.have.length(2);
    const list = await client.listTerminals({});
    expect(list.terminals.map((x) => x.terminalId)).to.deep.equal(["t1"]);
    expect(list.paymentServers.map((x) => x.paymentServerId)).to.deep.equal(["ps1"]);
  });

  it("routes a job by its terminal id and the result back, under the payment server's own job id", async () => {
    const t = terminal("t1", [slot(0, "00000001")]);
    const ps = paymentServer("ps1");
    await ps.next(isPool);
    ps.send({ message: { $case: "job", value: job("my-job-1", "t1", "00000001") } });
    const got = await t.next(isJob);
    expect(got.message.value.terminalId).to.equal("t1");
    expect(got.message.value.jobId).to.not.equal("my-job-1"); // the concentrator's own id towards the terminal
    answer(t, got.message.value);
    const r = await ps.next(isResult);
    expect(r.message.value.jobId).to.equal("my-job-1");
    expect(r.message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
  });

  it("answers NO_SUCH_PSAM for an unknown terminal or PSAM, INVALID for a job without a task", async () => {
    terminal("t1", [slot(0, "00000001")]);
    const ps = paymentServer("ps1");
    await ps.next(isPool);
    ps.send({ message: { $case: "job", value: job("a", "t9", "00000001") } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM);
    ps.send({ message: { $case: "job", value: job("b", "t1", "0000000f") } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM);
    ps.send({ message: { $case: "job", value: { ...job("c", "t1", "00000001"), task: undefined } } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_INVALID);
  });

  it("leases a PSAM to one payment server until it releases it (SLOT_BUSY for the other)", async () => {
    const t = terminal("t1", [slot(0, "00000001")]);
    const a = paymentServer("psA");
    const b = paymentServer("psB");
    await a.next(isPool);
    await b.next(isPool);
    a.send({ message: { $case: "job", value: job("a1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    await a.next(isResult);
    const busy = await b.next(
      (m): m is PIn & { message: { $case: "poolUpdate" } } => isPool(m) && m.message.value.terminal?.slots[0]?.state === PsamSlotState.PSAM_SLOT_STATE_BUSY,
    );
    expect(busy).to.not.equal(undefined);
    b.send({ message: { $case: "job", value: job("b1", "t1", "00000001") } });
    expect((await b.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    a.send({ message: { $case: "release", value: { terminalId: "t1", psamId: psamId("00000001") } } });
    await b.next(
      (m): m is PIn & { message: { $case: "poolUpdate" } } => isPool(m) && m.message.value.terminal?.slots[0]?.state === PsamSlotState.PSAM_SLOT_STATE_READY,
    );
    b.send({ message: { $case: "job", value: job("b2", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await b.next(isResult)).message.value).to.include({ jobId: "b2", status: PsamJobStatus.PSAM_JOB_STATUS_OK });
  });

  it("keeps a terminal's window: jobs beyond it wait at the concentrator, in order", async () => {
    const t = terminal("t1", [slot(0, "00000001"), slot(1, "00000002")], 1);
    const ps = paymentServer("ps1");
    await ps.next(isPool);
    ps.send({ message: { $case: "job", value: job("j1", "t1", "00000001") } });
    ps.send({ message: { $case: "job", value: job("j2", "t1", "00000002") } });
    const first = await t.next(isJob);
    await new Promise((r) => setTimeout(r, 200));
    expect(t.received.filter(isJob)).to.have.length(0); // the second waits for the window
    answer(t, first.message.value);
    const second = await t.next(isJob);
    expect(second.message.value.psamId?.value.toString("hex")).to.equal("00000002");
    answer(t, second.message.value);
    expect((await ps.next(isResult)).message.value.jobId).to.equal("j1");
    expect((await ps.next(isResult)).message.value.jobId).to.equal("j2");
  });

  it("answers WINDOW_EXCEEDED to a payment server with more jobs in flight than its window", async () => {
    terminal("t1", [slot(0, "00000001")], 1);
    const ps = paymentServer("ps1");
    await ps.next(isPool);
    for (const id of ["w1", "w2", "w3", "w4"]) ps.send({ message: { $case: "job", value: job(id, "t1", "00000001") } });
    const r = await ps.next(isResult);
    expect(r.message.value).to.include({ jobId: "w4", status: PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED });
  });

  it("answers TERMINAL_LOST for jobs in flight when a terminal's stream ends, and tells payment servers it detached", async () => {
    const t = terminal("t1", [slot(0, "00000001"), slot(1, "00000002")], 1);
    const ps = paymentServer("ps1");
    await ps.next(isPool);
    ps.send({ message: { $case: "job", value: job("sent", "t1", "00000001") } });
    ps.send({ message: { $case: "job", value: job("queued", "t1", "00000002") } });
    await t.next(isJob);
    t.close();
    const r1 = await ps.next(isResult);
    const r2 = await ps.next(isResult);
    const byId = new Map([r1, r2].map((r) => [r.message.value.jobId, r.message.value.status]));
    expect(byId.get("sent")).to.equal(PsamJobStatus.PSAM_JOB_STATUS_TERMINAL_LOST);
    expect(byId.get("queued")).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM); // never sent: safe to retry elsewhere
    const gone = await ps.next((m): m is PIn & { message: { $case: "poolUpdate" } } => isPool(m) && m.message.value.detachedTerminalId === "t1");
    expect(gone.message.value.terminal).to.equal(undefined);
    expect((await client.listTerminals({})).terminals).to.have.length(0);
  });

  it("drops a terminal that stops answering keepalive pings", async () => {
    const t = terminal("t-silent", [slot(0, "00000001")], 1, false);
    await waitFor(() => t.ended !== null, 5_000, "the silent terminal's stream to end");
    expect(t.ended).to.be.instanceOf(ClientError);
    expect((t.ended as ClientError).code).to.equal(Status.UNAVAILABLE);
    expect((await client.listTerminals({})).terminals).to.have.length(0);
  });

  it("replaces an older stream when a terminal attaches again", async () => {
    const old = terminal("t1", [slot(0, "00000001")]);
    await old.next((m): m is TIn => m.message?.$case === "welcome");
    const fresh = terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    await fresh.next((m): m is TIn => m.message?.$case === "welcome");
    await waitFor(() => old.ended !== null, 5_000, "the old stream to end");
    const list = await client.listTerminals({});
    expect(list.terminals).to.have.length(1);
    expect(list.terminals[0]!.slots).to.have.length(2);
  });

  it("refuses a stream that does not start with a hello, and a malformed hello", async () => {
    const p = new Peer<AttachTerminalRequest, TIn>((out, signal) => client.attachTerminal(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "pong", value: { nonce: 1n } } });
    await waitFor(() => p.ended !== null);
    expect((p.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);

    const bad = terminal("bad id with spaces", [slot(0, "00000001")]);
    await waitFor(() => bad.ended !== null);
    expect((bad.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);

    const q = new Peer<ConnectPaymentServerRequest, PIn>((out, signal) => client.connectPaymentServer(out, { signal }));
    peers.push(q as Peer<unknown, unknown>);
    q.send({ message: { $case: "job", value: job("x", "t1", "00000001") } });
    await waitFor(() => q.ended !== null);
    expect((q.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);
  });
});
