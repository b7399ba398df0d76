// Replicas of a payment server behind one address, reached the gRPC way:
// real netpurse gRPC servers (startGrpcServer, TLS as the services run it,
// client certificates requested as the payment server does) serving
// PaymentService, and a cardholder's channel (openChannel, the CA bundle
// only) to a list of them or to a DNS name. Each replica counts the calls it
// answers: calls go round over every healthy replica; one that says
// NOT_SERVING (RunningServer.setServing) gets none until it serves again;
// one that dies is skipped while the caller's retries finish every call in
// its deadline; and each replica still proves its identity and its name.

import { expect } from "chai";
import { ClientError, ServerError, Status, type Channel, type Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { createServer, connect, type Server as TcpServer, type Socket } from "node:net";
import { join } from "node:path";
import { PaymentServiceDefinition } from "../../gen/netpurse/payment/v1/payment.js";
import { retrying } from "../../client/calls.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { service, startGrpcServer, type RunningServer } from "../../lib/grpc/server.js";
import type { Logger } from "../../lib/log.js";
import { CertificateAuthority, pkiPaths } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { Security } from "../../lib/pki/security.js";
import { tempDir } from "../support/fixtures.js";

type PaymentClient = Client<typeof PaymentServiceDefinition, DeadlineOptions>;

/** A logger that keeps what it is told (the tests read the health changes a server logged). */
function recordingLogger(): { log: Logger; lines: string[] } {
  const lines: string[] = [];
  const log: Logger = {
    debug: () => undefined,
    info: (m, f) => void lines.push(`info ${m} ${JSON.stringify(f ?? {})}`),
    warn: (m, f) => void lines.push(`warn ${m} ${JSON.stringify(f ?? {})}`),
    error: (m, f) => void lines.push(`error ${m} ${JSON.stringify(f ?? {})}`),
    child: () => log,
  };
  return { log, lines };
}

/** A replica: a real netpurse gRPC server with PaymentService, counting the GetPurchase calls it answers. */
interface Replica {
  name: string;
  server: RunningServer;
  calls: number;
  lines: string[];
}

const refused = () => {
  throw new ServerError(Status.UNIMPLEMENTED, "not served by this test replica");
};

async function startReplica(pki: string, name: string, o: { host?: string; identity?: { kind: Kind; id: string } } = {}): Promise<Replica> {
  const security = await Security.forService(pki, o.identity ?? { kind: "payment", id: name });
  const { log, lines } = recordingLogger();
  const replica: Replica = { name, calls: 0, lines, server: undefined as unknown as RunningServer };
  replica.server = await startGrpcServer({
    address: `${o.host ?? "127.0.0.1"}:0`,
    services: [
      service(
        PaymentServiceDefinition,
        {
          processDrawRequest: refused,
          completePurchase: refused,
          reportCardSignature: refused,
          getPurchase: async (request) => {
            replica.calls++;
            return { purchase: { transactionId: request.transactionId } };
          },
        },
        { all: "public" },
      ),
    ],
    log,
    // As the payment server runs: TLS, client certificates asked for (cardholders have none).
    transport: security.server("request"),
  });
  return replica;
}

/** A TCP relay in front of a replica, whose kill() cuts every connection and refuses new ones, as a dead process would. */
async function relay(to: number): Promise<{ port: number; kill(): Promise<void> }> {
  const sockets = new Set<Socket>();
  const tcp: TcpServer = createServer({ noDelay: true }, (inbound) => {
    const outbound = connect({ port: to, host: "127.0.0.1", noDelay: true });
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("error", () => undefined);
      s.on("close", () => {
        sockets.delete(s);
        inbound.destroy();
        outbound.destroy();
      });
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise<void>((resolve) => tcp.listen(0, "127.0.0.1", resolve));
  const port = (tcp.address() as { port: number }).port;
  return {
    port,
    kill: async () => {
      const closed = new Promise<void>((resolve) => tcp.close(() => resolve()));
      for (const s of sockets) s.resetAndDestroy();
      await closed;
    },
  };
}

const TXN = { value: "6f1c3a52-8d0e-4b7a-9c21-3e5f7a9b0c1d" };

/** Waits until `check` holds, trying every 20 ms; fails after `ms`. Returns how long it took. */
async function until(check: () => Promise<boolean> | boolean, ms: number, what: string): Promise<number> {
  const started = Date.now();
  while (!(await check())) {
    if (Date.now() - started > ms) throw new Error(`not within ${ms} ms: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return Date.now() - started;
}

describe("contract: replicas of a payment server behind one address (round_robin, health-checked, TLS)", function () {
  this.timeout(30_000);
  let dir: { dir: string; cleanup: () => Promise<void> };
  let pki: string;
  let cardholder: Security;
  const replicas: Replica[] = [];
  const channels: Channel[] = [];

  before(async () => {
    dir = await tempDir("netpurse-balancing-");
    pki = join(dir.dir, "pki");
    const ca = await CertificateAuthority.init(pki);
    for (const id of ["payment-1", "payment-2", "payment-3", "payment-4", "payment-5"]) await ca.issue({ kind: "payment", id });
    // A replica reached at 127.0.0.2 whose certificate names that address; another reached at 127.0.0.3 with the same certificate's name only.
    await ca.issue({ kind: "payment", id: "payment-far" }, { hosts: ["127.0.0.2"] });
    await ca.issue({ kind: "payment", id: "payment-misnamed" }, { hosts: ["127.0.0.2"] });
    await ca.issue({ kind: "merchant", id: "impostor" });
    cardholder = await Security.forCardholder(pkiPaths(pki).caCert);
  });
  after(async () => {
    for (const c of channels) c.close();
    await Promise.all(replicas.map((r) => r.server.shutdown()));
    await dir?.cleanup();
  });

  const start = async (name: string, o: Parameters<typeof startReplica>[2] = {}) => {
    const r = await startReplica(pki, name, o);
    replicas.push(r);
    return r;
  };
  /** A cardholder's client of PaymentService through `address`, as the client daemon makes it (ChannelCache: openChannel, clientFactory). */
  const clientOf = (address: string): PaymentClient => {
    const channel = openChannel(address, cardholder.channel({ kind: "payment" }));
    channels.push(channel);
    return clientFactory().create(PaymentServiceDefinition, channel);
  };
  const call = (c: PaymentClient, deadlineMs = 2_000) => c.getPurchase({ transactionId: TXN }, { deadline: deadlineMs });
  const counts = (rs: Replica[]) => rs.map((r) => r.calls);
  const reset = (rs: Replica[]) => rs.forEach((r) => (r.calls = 0));
  /** Calls until every one of `rs` has answered at least once (each is connected and known healthy), then zeroes the counts. */
  const warmUp = async (c: PaymentClient, rs: Replica[]) => {
    await until(
      async () => {
        await call(c);
        return rs.every((r) => r.calls > 0);
      },
      5_000,
      "every replica answered",
    );
    reset(rs);
  };
  const listOf = (rs: { server: RunningServer }[]) => rs.map((r) => r.server.address).join(",");

  describe("a list of three replicas", () => {
    let a: Replica, b: Replica, c: Replica;
    let client: PaymentClient;
    before(async () => {
      [a, b, c] = [await start("payment-1"), await start("payment-2"), await start("payment-3")];
      client = clientOf(listOf([a, b, c]));
      await warmUp(client, [a, b, c]);
    });

    it("sends calls in turn to every healthy replica: 30 calls, 10 each", async () => {
      reset([a, b, c]);
      for (let i = 0; i < 30; i++) await call(client);
      expect(counts([a, b, c])).to.deep.equal([10, 10, 10]);
    });

    it("sends no more calls to a replica that says NOT_SERVING, and sends them again once it serves", async () => {
      b.server.setServing(false, "its database is unreachable");
      const tookMs = await until(
        async () => {
          const before = b.calls;
          for (let i = 0; i < 4; i++) await call(client);
          return b.calls === before;
        },
        3_000,
        "payment-2 skipped",
      );
      reset([a, b, c]);
      for (let i = 0; i < 20; i++) await call(client);
      expect(counts([a, b, c]), `the counts after NOT_SERVING (seen in ${tookMs} ms)`).to.deep.equal([10, 0, 10]);
      expect(b.lines.join("\n")).to.match(/warn not serving .*its database is unreachable/);

      b.server.setServing(true, "its database is back");
      await until(
        async () => {
          await call(client);
          return b.calls > 0;
        },
        3_000,
        "payment-2 back",
      );
      reset([a, b, c]);
      for (let i = 0; i < 30; i++) await call(client);
      expect(counts([a, b, c])).to.deep.equal([10, 10, 10]);
      expect(b.lines.join("\n")).to.match(/info serving again .*its database is back/);
    });

    it("fails a call at once with UNAVAILABLE when no replica serves, and serves again when one does", async () => {
      for (const r of [a, b, c]) r.server.setServing(false, "test: none serving");
      await until(
        async () => {
          try {
            await call(client);
            return false;
          } catch (e) {
            return e instanceof ClientError && e.code === Status.UNAVAILABLE;
          }
        },
        3_000,
        "every replica skipped",
      );
      const started = Date.now();
      const e = await call(client, 5_000).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e).to.be.instanceOf(ClientError);
      expect((e as ClientError).code).to.equal(Status.UNAVAILABLE);
      // Not the deadline: the caller knows at once and may try again.
      expect(Date.now() - started).to.be.below(1_000);
      reset([a, b, c]);
      c.server.setServing(true);
      await until(
        async () => {
          await call(client).catch(() => undefined);
          return c.calls > 0;
        },
        3_000,
        "payment-3 back",
      );
      for (const r of [a, b]) r.server.setServing(true);
    });
  });

  it("sends not even a first call to a replica that does not serve when the client connects", async () => {
    const [serving, resting] = [await start("payment-1"), await start("payment-2")];
    resting.server.setServing(false, "test: not yet serving");
    // Fresh clients, each connecting anew: its first call waits for the replicas' first health answers.
    for (let i = 0; i < 8; i++) {
      const client = clientOf(i % 2 ? listOf([resting, serving]) : listOf([serving, resting]));
      await Promise.all([call(client), call(client), call(client)]);
    }
    expect(counts([serving, resting])).to.deep.equal([24, 0]);
    resting.server.setServing(true);
  });

  it("skips a replica that dies: the caller's retries finish every call within its deadline, none on the dead one", async () => {
    const [left, doomed, right] = [await start("payment-4"), await start("payment-5"), await start("payment-1")];
    const [toLeft, toDoomed, toRight] = [await relay(left.server.port), await relay(doomed.server.port), await relay(right.server.port)];
    const client = clientOf([toLeft, toDoomed, toRight].map((r) => `127.0.0.1:${r.port}`).join(","));
    await warmUp(client, [left, doomed, right]);
    // Four callers keep calling, each call retried as the client daemon retries (client/calls.ts: UNAVAILABLE again after 200 ms).
    let stop = false;
    let attempts = 0;
    let failedAttempts = 0;
    let slowestMs = 0;
    const caller = async () => {
      while (!stop) {
        const started = Date.now();
        await retrying(async () => {
          attempts++;
          try {
            return await call(client, 2_000);
          } catch (e) {
            failedAttempts++;
            throw e;
          }
        });
        slowestMs = Math.max(slowestMs, Date.now() - started);
      }
    };
    const callers = [caller(), caller(), caller(), caller()];
    await new Promise((r) => setTimeout(r, 200));
    await toDoomed.kill();
    // Nothing reaches it from now on; a call it had already taken may still end.
    await new Promise((r) => setTimeout(r, 50));
    const atDeath = doomed.calls;
    await new Promise((r) => setTimeout(r, 500));
    const [leftBefore, rightBefore] = counts([left, right]);
    await new Promise((r) => setTimeout(r, 500));
    stop = true;
    await Promise.all(callers);
    const [leftGot = 0, rightGot = 0] = counts([left, right]).map((n, k) => n - ([leftBefore, rightBefore][k] ?? 0));
    expect(doomed.calls, "calls on the dead replica after its death").to.equal(atDeath);
    // The two others kept answering, in turn.
    expect(leftGot).to.be.above(10);
    expect(rightGot).to.be.above(10);
    expect(Math.abs(leftGot - rightGot)).to.be.at.most(8);
    // Every call finished within the caller's 5 s; the attempts the death cut were at most those in flight on it, one per caller.
    expect(slowestMs).to.be.below(5_000);
    expect(failedAttempts).to.be.at.most(4);
    console.log(`      (${attempts} attempts, ${failedAttempts} cut by the death and retried; slowest call ${slowestMs} ms)`);
  });

  it("reaches replicas through a DNS name, dns:///localhost:PORT, and health-checks them too", async () => {
    const r = await start("payment-2");
    const client = clientOf(`dns:///localhost:${r.server.port}`);
    for (let i = 0; i < 5; i++) await call(client);
    expect(r.calls).to.equal(5);
    r.server.setServing(false, "test");
    await until(
      () =>
        call(client).then(
          () => false,
          (e: unknown) => e instanceof ClientError && e.code === Status.UNAVAILABLE,
        ),
      3_000,
      "the only replica skipped",
    );
    r.server.setServing(true);
    await until(
      () =>
        call(client).then(
          () => true,
          () => false,
        ),
      3_000,
      "the replica back",
    );
  });

  it("still checks each replica's identity: one with another kind's certificate gets no call, and alone fails the call UNAVAILABLE", async () => {
    const genuine = await start("payment-3");
    const impostor = await start("impostor", { identity: { kind: "merchant", id: "impostor" } });
    const client = clientOf(listOf([genuine, impostor]));
    for (let i = 0; i < 10; i++) await call(client);
    expect(counts([genuine, impostor])).to.deep.equal([10, 0]);

    for (const address of [`ipv4:${impostor.server.address}`, `dns:///localhost:${impostor.server.port}`]) {
      const e = await call(clientOf(address)).then(
        () => undefined,
        (x: unknown) => x,
      );
      expect(e, address).to.be.instanceOf(ClientError);
      expect((e as ClientError).code, address).to.equal(Status.UNAVAILABLE);
      expect((e as ClientError).details, address).to.match(/merchant\/impostor|spiffe/);
    }
    expect(impostor.calls).to.equal(0);
  });

  it("checks each listed replica against the address it is reached at: one whose certificate does not name it gets no call", async () => {
    const far = await start("payment-far", { host: "127.0.0.2" });
    const misnamed = await start("payment-misnamed", { host: "127.0.0.3" });
    const client = clientOf(listOf([far, misnamed]));
    for (let i = 0; i < 10; i++) await call(client);
    expect(counts([far, misnamed])).to.deep.equal([10, 0]);
    const e = await call(clientOf(`ipv4:${misnamed.server.address}`)).then(
      () => undefined,
      (x: unknown) => x,
    );
    expect(e).to.be.instanceOf(ClientError);
    expect((e as ClientError).code).to.equal(Status.UNAVAILABLE);
    expect((e as ClientError).details).to.contain("127.0.0.3");
    expect(misnamed.calls).to.equal(0);
  });

  it("keeps one address as it was: no health check, a server that says NOT_SERVING still answers", async () => {
    const r = await start("payment-4");
    const client = clientOf(r.server.address);
    r.server.setServing(false, "test");
    await new Promise((res) => setTimeout(res, 100));
    await call(client);
    expect(r.calls).to.equal(1);
  });
});
