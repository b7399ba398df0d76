// Contract of netpurse.terminal.v1.TerminalConcentratorService: the real
// concentrator on loopback over mutual TLS, with the test acting as terminal
// hosts, payment servers and operators on raw bidirectional streams through
// the generated client, each with a certificate of its own; and as hostile
// peers with the wrong certificate, none, or another's identity.

import { expect } from "chai";
import { ClientError, Status, type Channel, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { AsyncQueue } from "../../lib/async-queue.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { psamId } from "../../lib/ids.js";
import { reasonOf } from "../../lib/grpc/errors.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
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
import { writeJsonAtomic } from "../../lib/files.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf } from "../../lib/pki/security.js";
import { tempDir } from "../support/fixtures.js";
import { failure } from "../support/card-client.js";
import type { ClientTls } from "../../lib/grpc/tls.js";
import { testSecurity, waitFor, type TestSecurity } from "../support/network.js";
import { join } from "node:path";

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
  reader: "",
});

const job = (id: string, terminalId: string, psam: string): PsamJob => ({
  jobId: id,
  terminalId,
  psamId: psamId(psam),
  transactionId: undefined,
  paymentServerId: "",
  task: { $case: "reverseDebit", value: { psamCounter: 1 } },
});

type ConcentratorClient = Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>;

/** The PSAMs the issuer provisioned, by terminal, for these tests. */
const REGISTRY = {
  psams: [
    { psamId: "00000001", terminalId: "t1" },
    { psamId: "00000002", terminalId: "t1" },
    { psamId: "000000aa", terminalId: "t-silent" },
    { psamId: "000000b1", terminalId: "t2" },
  ],
};

describe("contract: netpurse.terminal.v1.TerminalConcentratorService", function () {
  this.timeout(30_000);
  let c: Awaited<ReturnType<typeof startConcentrator>>;
  let dir: string, cleanup: () => Promise<void>;
  let security: TestSecurity;
  const clients = new Map<string, ConcentratorClient>();
  const channels: Channel[] = [];
  const peers: Peer<unknown, unknown>[] = [];
  /** The operator's client (ListTerminals). */
  let client: ConcentratorClient;

  before(async () => {
    ({ dir, cleanup } = await tempDir());
    await CertificateAuthority.init(pkiDirOf(dir));
    security = await testSecurity(dir);
    await writeJsonAtomic(join(dir, "psams.json"), REGISTRY);
  });
  after(async () => cleanup());

  beforeEach(async () => {
    c = await startConcentrator({
      security: await security.of("concentrator", "concentrator-1"),
      psamRegistry: join(dir, "psams.json"),
      listen: "127.0.0.1:0",
      keepaliveIntervalMs: 300,
      paymentServerWindow: 3,
    });
    client = await as("operator", "operator");
  });
  afterEach(async () => {
    for (const p of peers.splice(0)) p.close();
    for (const ch of channels.splice(0)) ch.close();
    clients.clear();
    await c.close();
  });

  /** A client of the concentrator holding the certificate of `kind`/`id` (or none). */
  async function as(kind: Kind | "anonymous", id = ""): Promise<ConcentratorClient> {
    const key = `${kind}/${id}`;
    const known = clients.get(key);
    if (known) return known;
    const sec = kind === "anonymous" ? security.cardholder : await security.of(kind, id);
    const ch = openChannel(c.address, sec.channel({ kind: "concentrator" }), { maxMessageBytes: 256 * 1024 });
    channels.push(ch);
    const made = clientFactory().create(TerminalConcentratorServiceDefinition, ch);
    clients.set(key, made);
    return made;
  }

  /** A terminal host `id` attached with its own certificate (or with `cert`'s, to claim another identity). */
  async function terminal(id: string, slots: PsamSlot[], window = 4, answerPings = true, cert = id) {
    const t = await as("terminal", cert);
    const p = new Peer<AttachTerminalRequest, TIn>((out, signal) => t.attachTerminal(out, { signal }));
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

  /** A payment server stream `id` with its own certificate (or `cert`'s), as replica `replica` ("" for one that runs alone). */
  async function paymentServer(id: string, cert = id, replica = "", answerPings = true) {
    const ps = await as("payment", cert);
    const p = new Peer<ConnectPaymentServerRequest, PIn>((out, signal) => ps.connectPaymentServer(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "hello", value: { paymentServerId: id, window: 16, replicaId: replica } } });
    if (!answerPings) return p;
    const t = setInterval(() => {
      const k = p.received.findIndex((m) => m.message?.$case === "ping");
      const ping = k >= 0 ? p.received.splice(k, 1)[0] : undefined;
      if (ping?.message?.$case === "ping") p.send({ message: { $case: "pong", value: { nonce: ping.message.value.nonce } } });
      if (p.ended !== null) clearInterval(t);
    }, 20);
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
          outcome: { $case: "debitReversed", value: { psamCounter: 1, reversalMac: Buffer.alloc(8) } },
        },
      },
    });

  it("welcomes a terminal, tells payment servers about it, and lists it for operators", async () => {
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    await t.next((m): m is TIn => m.message?.$case === "welcome");
    const ps = await paymentServer("ps1");
    await ps.next((m): m is PIn => m.message?.$case === "welcome");
    const u = await ps.next(isPool);
    expect(u.message.value.terminal?.terminalId).to.equal("t1");
    expect(u.message.value.terminal?.slots).to.have.length(2);
    const list = await client.listTerminals({});
    expect(list.terminals.map((x) => x.terminalId)).to.deep.equal(["t1"]);
    expect(list.paymentServers.map((x) => x.paymentServerId)).to.deep.equal(["ps1"]);
  });

  it("routes a job by its terminal id and the result back, under the payment server's own job id", async () => {
    const t = await terminal("t1", [slot(0, "00000001")]);
    const ps = await paymentServer("ps1");
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
    await terminal("t1", [slot(0, "00000001")]);
    const ps = await paymentServer("ps1");
    await ps.next(isPool);
    ps.send({ message: { $case: "job", value: job("a", "t9", "00000001") } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM);
    ps.send({ message: { $case: "job", value: job("b", "t1", "0000000f") } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM);
    ps.send({ message: { $case: "job", value: { ...job("c", "t1", "00000001"), task: undefined } } });
    expect((await ps.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_INVALID);
  });

  it("leases a PSAM to one payment server until it releases it (SLOT_BUSY for the other)", async () => {
    const t = await terminal("t1", [slot(0, "00000001")]);
    const a = await paymentServer("psA");
    const b = await paymentServer("psB");
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
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")], 1);
    const ps = await paymentServer("ps1");
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
    await terminal("t1", [slot(0, "00000001")], 1);
    const ps = await paymentServer("ps1");
    await ps.next(isPool);
    for (const id of ["w1", "w2", "w3", "w4"]) ps.send({ message: { $case: "job", value: job(id, "t1", "00000001") } });
    const r = await ps.next(isResult);
    expect(r.message.value).to.include({ jobId: "w4", status: PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED });
  });

  it("answers TERMINAL_LOST for jobs in flight when a terminal's stream ends, and tells payment servers it detached", async () => {
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")], 1);
    const ps = await paymentServer("ps1");
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
    const t = await terminal("t-silent", [slot(0, "000000aa")], 1, false);
    await waitFor(() => t.ended !== null, 5_000, "the silent terminal's stream to end");
    expect(t.ended).to.be.instanceOf(ClientError);
    expect((t.ended as ClientError).code).to.equal(Status.UNAVAILABLE);
    expect((await client.listTerminals({})).terminals).to.have.length(0);
  });

  it("a second stream under an attached terminal's identity is refused while the first answers its pings", async () => {
    const old = await terminal("t1", [slot(0, "00000001")]);
    await old.next((m): m is TIn => m.message?.$case === "welcome");
    const hijack = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    await waitFor(() => hijack.ended !== null, 5_000, "the second stream to be refused");
    expect((hijack.ended as ClientError).code).to.equal(Status.ALREADY_EXISTS);
    expect((hijack.ended as ClientError).details).to.contain("answers its pings");
    expect(old.ended).to.equal(null);
    const list = await client.listTerminals({});
    expect(list.terminals).to.have.length(1);
    expect(list.terminals[0]!.slots).to.have.length(1); // the first stream's view stands
  });

  it("replaces an older stream that no longer answers its pings when the terminal attaches again", async () => {
    const old = await terminal("t1", [slot(0, "00000001")], 4, false);
    await old.next((m): m is TIn => m.message?.$case === "welcome");
    const fresh = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    await fresh.next((m): m is TIn => m.message?.$case === "welcome");
    await waitFor(() => old.ended !== null, 5_000, "the old stream to end");
    const list = await client.listTerminals({});
    expect(list.terminals).to.have.length(1);
    expect(list.terminals[0]!.slots).to.have.length(2);
  });

  it("refuses a stream that does not start with a hello, and a malformed hello", async () => {
    const t1 = await as("terminal", "t1");
    const p = new Peer<AttachTerminalRequest, TIn>((out, signal) => t1.attachTerminal(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "pong", value: { nonce: 1n } } });
    await waitFor(() => p.ended !== null);
    expect((p.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);

    const bad = await terminal("bad id with spaces", [slot(0, "00000001")], 4, true, "t1");
    await waitFor(() => bad.ended !== null);
    expect((bad.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);

    const ps1 = await as("payment", "ps1");
    const q = new Peer<ConnectPaymentServerRequest, PIn>((out, signal) => ps1.connectPaymentServer(out, { signal }));
    peers.push(q as Peer<unknown, unknown>);
    q.send({ message: { $case: "job", value: job("x", "t1", "00000001") } });
    await waitFor(() => q.ended !== null);
    expect((q.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);
  });

  // ---- trust: a peer is trusted only for what its certificate proves ----------

  /** How a stream ended: its gRPC code and message. */
  const endOf = async (p: { ended: Error | undefined | null }) => {
    await waitFor(() => p.ended !== null, 5_000, "the stream to end");
    const e = p.ended as ClientError;
    return { code: Status[e.code], details: e.details };
  };

  it("a terminal may attach only under the identity its certificate proves", async () => {
    const t = await terminal("t1", [slot(0, "00000001")], 4, true, "t2");
    expect(await endOf(t)).to.deep.include({ code: "PERMISSION_DENIED" });
    expect((await endOf(t)).details).to.contain("you may attach only as t2");
    expect((await client.listTerminals({})).terminals).to.have.length(0);
  });

  it("a terminal may announce only the PSAMs the issuer provisioned for it", async () => {
    const madeUp = await terminal("t1", [slot(0, "00000001"), slot(1, "000000ff")]);
    expect(await endOf(madeUp)).to.deep.include({ code: "PERMISSION_DENIED" });
    const anothers = await terminal("t1", [slot(0, "000000b1")]);
    expect((await endOf(anothers)).details).to.contain("not provisioned for terminal t1");
    const honest = await terminal("t1", [slot(0, "00000001")]);
    await honest.next((m): m is TIn => m.message?.$case === "welcome");
    honest.send({ message: { $case: "slotUpdate", value: { slot: slot(5, "000000ff") } } });
    expect(await endOf(honest)).to.deep.include({ code: "PERMISSION_DENIED" }); // nor slip one in later
    expect((await client.listTerminals({})).terminals).to.have.length(0);
  });

  it("only a payment server may connect as one, and only as itself", async () => {
    const asTerminal = await as("terminal", "t1");
    const p = new Peer<ConnectPaymentServerRequest, PIn>((out, signal) => asTerminal.connectPaymentServer(out, { signal }));
    peers.push(p as Peer<unknown, unknown>);
    p.send({ message: { $case: "hello", value: { paymentServerId: "payment-1", window: 16, replicaId: "" } } });
    expect(await endOf(p)).to.deep.include({ code: "PERMISSION_DENIED" });
    const impostor = await paymentServer("psB", "psA");
    expect((await endOf(impostor)).details).to.contain("you may connect only as psA");
  });

  it("strangers read nothing: ListTerminals needs an operator's certificate", async () => {
    await terminal("t1", [slot(0, "00000001")]);
    // No certificate: no TLS connection at all with a server of the operator's network.
    expect(await failure((await as("anonymous")).listTerminals({}, { deadline: 3_000 })))
      .to.have.property("code")
      .that.is.oneOf(["UNAVAILABLE", "DEADLINE_EXCEEDED"]);
    expect(await failure((await as("terminal", "t1")).listTerminals({}))).to.include({ code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" });
    expect(await failure((await as("payment", "ps1")).listTerminals({}))).to.include({ code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" });
    expect((await client.listTerminals({})).terminals).to.have.length(1);
  });

  it("a certificate of another authority, or a revoked one, proves nothing", async () => {
    const { dir: otherDir, cleanup: done } = await tempDir();
    try {
      await CertificateAuthority.init(pkiDirOf(otherDir));
      const forged = await (await testSecurity(otherDir)).of("operator", "operator");
      // It trusts our CA for the server, but presents a certificate our CA never issued.
      const ch = openChannel(c.address, {
        tls: { ...(security.cardholder.channel({ kind: "concentrator" }) as { tls: ClientTls }).tls, identity: forged.clientIdentity() },
      });
      channels.push(ch);
      expect(await failure(clientFactory().create(TerminalConcentratorServiceDefinition, ch).listTerminals({}, { deadline: 3_000 })))
        .to.have.property("code")
        .that.is.oneOf(["UNAVAILABLE", "DEADLINE_EXCEEDED"]); // refused at the handshake
    } finally {
      await done();
    }
    const auditor = await as("operator", "auditor");
    expect((await auditor.listTerminals({})).terminals).to.have.length(0); // valid until revoked
    const t2 = await terminal("t2", [slot(0, "000000b1")]);
    await t2.next((m): m is TIn => m.message?.$case === "welcome");
    await security.authority.revoke({ kind: "operator", id: "auditor" }, "key-compromise");
    await security.authority.revoke({ kind: "terminal", id: "t2" }, "key-compromise");
    expect(await endOf(t2)).to.deep.include({ code: "UNAUTHENTICATED" }); // its stream, opened before, ends too
    expect(await failure(auditor.listTerminals({}))).to.include({ code: "UNAUTHENTICATED" }); // and a call on a connection opened before
    await waitFor(
      async () => {
        const fresh = openChannel(c.address, (await security.of("operator", "auditor")).channel({ kind: "concentrator" }));
        channels.push(fresh);
        const f = await failure(clientFactory().create(TerminalConcentratorServiceDefinition, fresh).listTerminals({}, { deadline: 3_000 }));
        return f.code === "UNAVAILABLE"; // a new connection: refused at the handshake
      },
      10_000,
      "the revoked certificate to be refused",
    );
  });

  it("a payment server holds no more than its share of the pool while others are connected", async () => {
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    const a = await paymentServer("psA");
    const b = await paymentServer("psB");
    await a.next(isPool);
    await b.next(isPool);
    a.send({ message: { $case: "job", value: job("a1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await a.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    a.send({ message: { $case: "job", value: job("a2", "t1", "00000002") } }); // a hog's second PSAM of two
    const refused = (await a.next(isResult)).message.value;
    expect(refused.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    expect(refused.message).to.contain("its share of the pool");
    b.send({ message: { $case: "job", value: job("b1", "t1", "00000002") } }); // the other still gets one
    answer(t, (await t.next(isJob)).message.value);
    expect((await b.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
  });

  it("takes back a lease held past the longest a lease may last, and answers jobs that waited too long in a queue", async () => {
    await c.close();
    c = await startConcentrator({
      security: await security.of("concentrator", "concentrator-1"),
      psamRegistry: join(dir, "psams.json"),
      listen: "127.0.0.1:0",
      keepaliveIntervalMs: 300,
      maxLeaseMs: 400,
      queuedJobTtlMs: 400,
    });
    clients.clear();
    client = await as("operator", "operator");
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")], 1);
    const hog = await paymentServer("psA");
    const other = await paymentServer("psB");
    await hog.next(isPool);
    hog.send({ message: { $case: "job", value: job("h1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    await hog.next(isResult); // leased, and never released
    await other.next(
      (m): m is PIn & { message: { $case: "poolUpdate" } } =>
        isPool(m) && m.message.value.terminal?.slots.every((s) => s.state === PsamSlotState.PSAM_SLOT_STATE_READY) === true,
      5_000,
    );
    expect((await client.listTerminals({})).paymentServers.find((p) => p.paymentServerId === "psA")?.psamsLeased).to.equal(0);
    // A job queued behind the terminal's window of 1, never answered by the terminal, is answered by the concentrator.
    hog.close(); // psB alone: the whole pool is its share
    await waitFor(async () => (await client.listTerminals({})).paymentServers.length === 1);
    other.send({ message: { $case: "job", value: job("o1", "t1", "00000001") } });
    await t.next(isJob); // in flight, left unanswered
    other.send({ message: { $case: "job", value: job("o2", "t1", "00000002") } });
    const expired = (await other.next(isResult, 3_000)).message.value;
    expect(expired).to.include({ jobId: "o2", status: PsamJobStatus.PSAM_JOB_STATUS_WINDOW_EXCEEDED });
    expect(expired.message).to.contain("not sent");
  });

  it("a second stream under a connected payment server's identity is refused while the first answers its pings", async () => {
    const first = await paymentServer("psA");
    await first.next((m): m is PIn => m.message?.$case === "welcome");
    const copy = await paymentServer("psA"); // a copy of its certificate, say
    expect(await endOf(copy)).to.deep.include({ code: "ALREADY_EXISTS" });
    expect(first.ended).to.equal(null);
    expect((await client.listTerminals({})).paymentServers.map((p) => p.paymentServerId)).to.deep.equal(["psA"]);
  });

  // ---- replicas: one identity, one certificate, a stream each -----------------

  const welcomed = (p: Peer<ConnectPaymentServerRequest, PIn>) => p.next((m): m is PIn => m.message?.$case === "welcome");
  const streamsOf = async () =>
    (await client.listTerminals({})).paymentServers
      .map((p) => ({ id: p.paymentServerId, replica: p.replicaId, leased: p.psamsLeased }))
      .sort((a, b) => a.replica.localeCompare(b.replica));

  it("replicas of one payment server keep a stream each and lease a PSAM each, one stream at a time per PSAM, listed apart", async () => {
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    const r1 = await paymentServer("psA", "psA", "r1");
    const r2 = await paymentServer("psA", "psA", "r2");
    await r1.next(isPool);
    await r2.next(isPool);
    r1.send({ message: { $case: "job", value: job("j1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await r1.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    r2.send({ message: { $case: "job", value: job("j2", "t1", "00000001") } });
    const busy = (await r2.next(isResult)).message.value;
    expect(busy.status, "a PSAM is leased to one stream, even among replicas").to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    expect(busy.message).to.contain("psA (replica r1)");
    r2.send({ message: { $case: "job", value: job("j3", "t1", "00000002") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await r2.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    expect(await streamsOf()).to.deep.equal([
      { id: "psA", replica: "r1", leased: 1 },
      { id: "psA", replica: "r2", leased: 1 },
    ]);
    // One replica's stream ends: its lease is back in the pool, the other replica's stays.
    r1.close();
    await waitFor(async () => (await streamsOf()).length === 1, 5_000, "r1's stream to go");
    expect(await streamsOf()).to.deep.equal([{ id: "psA", replica: "r2", leased: 1 }]);
    r2.send({ message: { $case: "job", value: job("j4", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await r2.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
  });

  it("a payment server's share of the pool is per identity: a stream under a made-up replica id leases nothing more", async () => {
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    const a = await paymentServer("psA", "psA", "r1");
    const b = await paymentServer("psB");
    await a.next(isPool);
    await b.next(isPool);
    a.send({ message: { $case: "job", value: job("a1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await a.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    // psA's certificate, copied, with a replica id of its own making: two identities, two PSAMs, one each.
    const copy = await paymentServer("psA", "psA", "made-up");
    await copy.next(isPool);
    copy.send({ message: { $case: "job", value: job("c1", "t1", "00000002") } });
    const refused = (await copy.next(isResult)).message.value;
    expect(refused.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    expect(refused.message).to.contain("holds 1 PSAMs, its share of the pool");
    b.send({ message: { $case: "job", value: job("b1", "t1", "00000002") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await b.next(isResult)).message.value.status, "the other identity still gets its share").to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    const leased = (await streamsOf()).reduce((n, p) => n + (p.id === "psA" ? p.leased : 0), 0);
    expect(leased).to.equal(1);
  });

  it("the most leases per payment server count every replica's stream of the identity", async () => {
    await c.close();
    c = await startConcentrator({
      security: await security.of("concentrator", "concentrator-1"),
      psamRegistry: join(dir, "psams.json"),
      listen: "127.0.0.1:0",
      keepaliveIntervalMs: 300,
      maxLeasesPerPaymentServer: 1,
    });
    clients.clear();
    client = await as("operator", "operator");
    const t = await terminal("t1", [slot(0, "00000001"), slot(1, "00000002")]);
    const r1 = await paymentServer("psA", "psA", "r1");
    const r2 = await paymentServer("psA", "psA", "r2");
    await r1.next(isPool);
    await r2.next(isPool);
    r1.send({ message: { $case: "job", value: job("j1", "t1", "00000001") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await r1.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
    r2.send({ message: { $case: "job", value: job("j2", "t1", "00000002") } });
    expect((await r2.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_SLOT_BUSY);
    r1.send({ message: { $case: "release", value: { terminalId: "t1", psamId: psamId("00000001") } } });
    await waitFor(async () => (await streamsOf()).every((p) => p.leased === 0), 5_000, "r1's release");
    r2.send({ message: { $case: "job", value: job("j3", "t1", "00000002") } });
    answer(t, (await t.next(isJob)).message.value);
    expect((await r2.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
  });

  it("a second stream with the same replica id is refused while the first answers its pings, and replaces one that does not", async () => {
    const first = await paymentServer("psA", "psA", "r1");
    await welcomed(first);
    const same = await paymentServer("psA", "psA", "r1");
    const end = await endOf(same);
    expect(end.code).to.equal("ALREADY_EXISTS");
    expect(end.details).to.contain("psA (replica r1) is connected and answers its pings");
    expect(first.ended).to.equal(null);
    const other = await paymentServer("psA", "psA", "r2");
    await welcomed(other);
    const alone = await paymentServer("psA"); // no replica id: a stream of its own too
    await welcomed(alone);
    expect((await streamsOf()).map((p) => p.replica)).to.deep.equal(["", "r1", "r2"]);
    const silent = await paymentServer("psA", "psA", "r3", false);
    await welcomed(silent);
    const restarted = await paymentServer("psA", "psA", "r3");
    await welcomed(restarted); // after the liveness proof time (2 s)
    await waitFor(() => silent.ended !== null, 5_000, "the silent stream to be replaced");
    expect((await streamsOf()).map((p) => p.replica)).to.deep.equal(["", "r1", "r2", "r3"]);
  });

  it("refuses a malformed replica_id with INVALID_ARGUMENT (INVALID_FIELD)", async () => {
    for (const bad of ["r 1", "x".repeat(65), "r/1"]) {
      const p = await paymentServer("psA", "psA", bad);
      await waitFor(() => p.ended !== null, 5_000, "the stream to end");
      expect((p.ended as ClientError).code).to.equal(Status.INVALID_ARGUMENT);
      expect(reasonOf(p.ended)).to.equal(ErrorReason.ERROR_REASON_INVALID_FIELD);
      expect((p.ended as ClientError).details).to.contain("replica_id");
    }
    expect(await streamsOf()).to.deep.equal([]);
  });

  it("any replica may reverse a debit its identity issued; another payment server may not (NOT_ALLOWED), and sees none of it", async () => {
    const pending = { psamCounter: 7, transactionId: undefined, amount: undefined, paymentServerId: "psA" };
    const t = await terminal("t1", [{ ...slot(0, "00000001"), pendingDebits: [pending] }]);
    const r2 = await paymentServer("psA", "psA", "r2");
    const b = await paymentServer("psB");
    expect((await r2.next(isPool)).message.value.terminal?.slots[0]?.pendingDebits.map((p) => p.psamCounter)).to.deep.equal([7]);
    expect((await b.next(isPool)).message.value.terminal?.slots[0]?.pendingDebits).to.deep.equal([]);
    const reverse7 = (id: string): PsamJob => ({ ...job(id, "t1", "00000001"), task: { $case: "reverseDebit", value: { psamCounter: 7 } } });
    b.send({ message: { $case: "job", value: reverse7("b1") } });
    expect((await b.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_NOT_ALLOWED);
    r2.send({ message: { $case: "job", value: reverse7("r2-1") } });
    const routed = (await t.next(isJob)).message.value;
    expect(routed.paymentServerId, "the terminal host learns the identity, never the replica").to.equal("psA");
    answer(t, routed);
    expect((await r2.next(isResult)).message.value.status).to.equal(PsamJobStatus.PSAM_JOB_STATUS_OK);
  });
});
