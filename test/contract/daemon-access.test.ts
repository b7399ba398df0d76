// The client daemon answers its cardholder and no one else on the machine:
// on its Unix socket, whose folder (mode 0700) the kernel keeps other users
// out of; over loopback TCP, opt-in, only calls that carry its token. Each
// case is an attack that worked when the daemon served plaintext TCP on
// loopback to every local process: another user's program paid from the
// card with no prompt.

import { expect } from "chai";
import { execFile, spawn } from "node:child_process";
import { chmodSync, chownSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { Metadata } from "nice-grpc";
import { CardholderServiceDefinition, PayOfferRequest } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { OrderState, type PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import { HealthDefinition } from "nice-grpc-server-health";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { startClientDaemon } from "../../client/daemon/server.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { failure } from "../support/card-client.js";
import { commandFailure } from "../support/fixtures.js";
import { startNetwork, type Network } from "../support/network.js";

const run = promisify(execFile);
const ROOT = new URL("../..", import.meta.url).pathname;
const NOBODY = 65_534;
const isRoot = process.getuid?.() === 0;

/** What test/support/foreign-caller.ts got from the daemon, called as user `uid` (default: the cardholder's). */
async function callAs(address: string, method: "PayOffer" | "GetCard", o: { offer?: PaymentOffer; uid?: number } = {}) {
  const args = ["--import", "tsx", join(ROOT, "test/support/foreign-caller.ts"), address, method];
  if (o.offer) args.push(Buffer.from(PayOfferRequest.encode({ offer: o.offer, approvedAmount: o.offer.amount, requestId: "" }).finish()).toString("hex"));
  const as = o.uid !== undefined ? { uid: o.uid, gid: o.uid } : {};
  const { stdout } = await run(process.execPath, args, { cwd: ROOT, timeout: 30_000, env: { ...process.env, NETPURSE_LOG_LEVEL: "warn" }, ...as });
  return JSON.parse(stdout.trim().split("\n").at(-1) ?? "{}") as { ok: boolean; balance?: string; code?: string; details?: string };
}

describe("contract: the client daemon answers only its cardholder", function () {
  this.timeout(120_000);
  let net: Network;
  const factory = clientFactory();
  before(async () => (net = await startNetwork()));
  after(async () => net?.close());

  const offer = async () => {
    const { offer } = await net.clients.merchant.createOrder({ productId: "ebook-grpc" });
    if (!offer) throw new Error("the merchant made no offer");
    return offer;
  };
  /** The card's balance in a daemon's answer. */
  const minor = (r: { purse?: { balance?: { amountMinor: bigint } } }) => r.purse?.balance?.amountMinor;
  const balance = async () => minor(await net.clients.cardholder.getCard({})) ?? -1n;
  const orderState = async (o: PaymentOffer) => (await net.clients.merchant.getOrder({ transactionId: o.transactionId })).order?.state;

  /** A card of its own, for a second daemon. */
  async function newCard(name: string): Promise<string> {
    const issuer = await Issuer.open(net.paths.issuer);
    const path = join(net.paths.cards, `${name}.card.json`);
    await issuer.personaliseCard({ path, currency: 978, exponent: 2, initialValue: 5_000, maxBalance: 50_000, expiry: "2031-12-31" });
    await issuer.close();
    return path;
  }

  it("a process of another user reaches nothing: it can neither pay nor read the card (run as root: as uid nobody)", async function () {
    if (!isRoot) {
      console.log("      skipped: only root can start a process as another user (uid nobody); CI runs the tests as root");
      this.skip();
    }
    // Every folder down to the daemon's own may be entered by others: only the socket's folder, mode 0700, keeps them out.
    for (const d of [net.data, net.paths.client]) chmodSync(d, 0o755);
    const o = await offer();
    const before = await balance();

    const pay = await callAs(net.daemon.address, "PayOffer", { offer: o, uid: NOBODY });
    expect(pay.ok, `another user paid: ${JSON.stringify(pay)}`).to.equal(false);
    expect(pay.code).to.equal("UNAVAILABLE");
    expect(pay.details).to.contain("EACCES");
    const read = await callAs(net.daemon.address, "GetCard", { uid: NOBODY });
    expect(read).to.include({ ok: false, code: "UNAVAILABLE" });
    expect(await balance()).to.equal(before);
    expect(await orderState(o)).to.equal(OrderState.ORDER_STATE_OFFERED);

    // The same program, run by the cardholder, is served: the refusal above is the kernel's, for another user only.
    const own = await callAs(net.daemon.address, "PayOffer", { offer: o });
    expect(own, JSON.stringify(own)).to.include({ ok: true, balance: String(before - 990n) });
    expect(await orderState(o)).to.equal(OrderState.ORDER_STATE_PAID);
  });

  it("over TCP, a call without the daemon's token or with a wrong one is UNAUTHENTICATED and pays nothing; the token works", async () => {
    const dir = join(net.data, "client-tcp");
    const d = await startClientDaemon({ security: net.security.cardholder, card: await newCard("tcp"), dir, listenTcp: "127.0.0.1:0" });
    const tcp = d.tcpAddress;
    if (tcp === undefined) throw new Error("the daemon did not listen on TCP");
    const channel = openChannel(tcp, { insecure: true });
    try {
      expect(statSync(d.tokenFile).mode & 0o777, "the token file is the cardholder's only").to.equal(0o600);
      const token = readFileSync(d.tokenFile, "utf8").trim();
      const as = (authorization?: string) =>
        factory.create(CardholderServiceDefinition, channel, authorization ? { "*": { metadata: Metadata({ authorization }) } } : {});
      const o = await offer();
      for (const [who, c] of [
        ["no token", as()],
        ["a wrong token", as(`Bearer ${"x".repeat(token.length)}`)],
        ["the token without its scheme", as(token)],
        ["a token one character off", as(`Bearer ${token.slice(0, -1)}${token.endsWith("A") ? "B" : "A"}`)],
      ] as const) {
        expect(await failure(c.payOffer({ offer: o, approvedAmount: o.amount })), who).to.include({ code: "UNAUTHENTICATED", reason: "UNAUTHENTICATED" });
        expect(await failure(c.getCard({})), who).to.include({ code: "UNAUTHENTICATED", reason: "UNAUTHENTICATED" });
      }
      // Health and reflection too: every call on the TCP listener needs the token.
      const health = factory.create(HealthDefinition, channel);
      expect(await failure(health.check({ service: "" }))).to.include({ code: "UNAUTHENTICATED" });
      expect(await orderState(o)).to.equal(OrderState.ORDER_STATE_OFFERED);

      const mine = as(`Bearer ${token}`);
      expect(minor(await mine.getCard({}))).to.equal(5_000n);
      const paid = await mine.payOffer({ offer: o, approvedAmount: o.amount });
      expect(minor(paid)).to.equal(5_000n - 990n);
      expect(await orderState(o)).to.equal(OrderState.ORDER_STATE_PAID);

      // The CLI over TCP reads the token file; with another file it is refused.
      const env = { ...process.env, NETPURSE_LOG_LEVEL: "warn", NETPURSE_DATA: net.data };
      const cli = (...args: string[]) => run(join(ROOT, "bin/netpurse"), ["card", "--daemon", tcp, ...args], { env, timeout: 30_000 });
      expect((await cli("--daemon-token", d.tokenFile)).stdout).to.contain("balance EUR 40.10");
      const wrong = join(dir, "wrong.token");
      writeFileSync(wrong, `${"y".repeat(43)}\n`, { mode: 0o600 });
      const refused = await commandFailure(cli("--daemon-token", wrong));
      expect(refused.code).to.equal(1);
      expect(refused.stderr).to.contain("UNAUTHENTICATED [ERROR_REASON_UNAUTHENTICATED]");
      // A token file others may read is refused by the CLI before anything is sent.
      chmodSync(wrong, 0o644);
      expect((await commandFailure(cli("--daemon-token", wrong))).stderr).to.contain("other users of this machine could read the token");
    } finally {
      channel.close();
      await d.close();
    }
  });

  it("refuses to start when the socket's folder is open to others or not the cardholder's, and says what to do", async () => {
    const card = await newCard("folder");
    const dir = join(net.data, "client-open");
    mkdirSync(join(dir, "run"), { recursive: true, mode: 0o755 });
    chmodSync(join(dir, "run"), 0o755);
    let error = "";
    await startClientDaemon({ security: net.security.cardholder, card, dir }).then(
      (d) => d.close(),
      (e: Error) => (error = e.message),
    );
    expect(error).to.contain(`${join(dir, "run")} is mode 0755`);
    expect(error).to.contain(`chmod 700 ${join(dir, "run")}`);
    expect(existsSync(join(dir, "run", "daemon.sock")), "nothing listens").to.equal(false);

    // The daemon as its own process: it does not start, and says why.
    const started = await commandFailure(
      run(process.execPath, ["--import", "tsx", "client/daemon/main.ts", "--card", card, "--dir", dir, "--data", net.data], { cwd: ROOT, timeout: 30_000 }),
    );
    expect(started.code).to.equal(1);
    expect(started.stderr).to.contain("cannot start");
    expect(started.stderr).to.contain("other users of this machine could reach the card");

    if (isRoot) {
      const theirs = join(net.data, "client-theirs");
      mkdirSync(join(theirs, "run"), { recursive: true, mode: 0o700 });
      chownSync(join(theirs, "run"), NOBODY, NOBODY);
      const e = await startClientDaemon({ security: net.security.cardholder, card, dir: theirs }).then(
        async (d) => {
          await d.close();
          return "";
        },
        (x: Error) => x.message,
      );
      expect(e).to.contain(`belongs to uid ${NOBODY}`);
    }

    // Once the folder is the cardholder's alone, it starts; its socket is the owner's only.
    chmodSync(join(dir, "run"), 0o700);
    const d = await startClientDaemon({ security: net.security.cardholder, card, dir });
    try {
      expect(statSync(join(dir, "run")).mode & 0o777).to.equal(0o700);
      expect(statSync(join(dir, "run", "daemon.sock")).mode & 0o777).to.equal(0o600);
    } finally {
      await d.close();
    }
  });

  it("a folder above the socket that others may write into: the daemon will not start there, and the CLI speaks to no socket another could have put there", async () => {
    const card = await newCard("shared");
    // Whoever may write into a folder above run/ can rename run/ away and put a socket of their own in its place.
    const shared = join(net.data, "shared-folder");
    mkdirSync(join(shared, "client", "run"), { recursive: true, mode: 0o700 });
    chmodSync(shared, 0o777);
    const e = await startClientDaemon({ security: net.security.cardholder, card, dir: join(shared, "client") }).then(
      async (d) => {
        await d.close();
        return "";
      },
      (x: Error) => x.message,
    );
    expect(e).to.contain(`${shared}, a folder above the daemon's socket, is mode 0777`);
    expect(existsSync(join(shared, "client", "run", "daemon.sock")), "nothing listens").to.equal(false);

    const cli = (socket: string) =>
      commandFailure(
        run(process.execPath, ["--import", "tsx", "client/cli/netpurse.ts", "card", "--daemon", `unix:${socket}`], { cwd: ROOT, timeout: 30_000 }),
      );
    const refused = await cli(join(shared, "client", "run", "daemon.sock"));
    expect(refused.code).to.equal(1);
    expect(refused.stderr).to.contain("is mode 0777: other users could put a socket of their own");
    if (isRoot) {
      // The attacker's own folder and socket in place of the daemon's: not the cardholder's, so the CLI does not speak to it.
      const theirs = join(net.data, "their-run");
      mkdirSync(theirs, { mode: 0o700 });
      writeFileSync(join(theirs, "daemon.sock"), "");
      chownSync(join(theirs, "daemon.sock"), NOBODY, NOBODY);
      chownSync(theirs, NOBODY, NOBODY);
      const theirsRefused = await cli(join(theirs, "daemon.sock"));
      expect(theirsRefused.stderr).to.contain(`belongs to uid ${NOBODY}, not to you: it is not your daemon`);
    }
  });

  it("removes a socket a killed daemon left behind, but never takes over one a daemon still answers on", async () => {
    const card = await newCard("stale");
    const dir = join(net.data, "client-stale");
    const socket = join(dir, "run", "daemon.sock");
    mkdirSync(join(dir, "run"), { recursive: true, mode: 0o700 });
    // A process that listens on the socket and is killed: the socket file stays.
    const holder = spawn(process.execPath, ["-e", `require("node:net").createServer().listen(${JSON.stringify(socket)}, () => console.log("up"))`]);
    await new Promise<void>((resolve) => holder.stdout.once("data", () => resolve()));
    holder.kill("SIGKILL");
    await new Promise((r) => holder.once("exit", r));
    expect(statSync(socket).isSocket()).to.equal(true);

    const d = await startClientDaemon({ security: net.security.cardholder, card, dir });
    const channel = openChannel(d.address, { insecure: true });
    try {
      expect(d.address).to.equal(`unix:${socket}`);
      expect(minor(await factory.create(CardholderServiceDefinition, channel).getCard({}))).to.equal(5_000n);
      const second = await startClientDaemon({ security: net.security.cardholder, card, dir }).then(
        async (x) => {
          await x.close();
          return "";
        },
        (e: Error) => e.message,
      );
      expect(second).to.contain("another server is listening on it already");
      expect(minor(await factory.create(CardholderServiceDefinition, channel).getCard({})), "the first still serves").to.equal(5_000n);
    } finally {
      channel.close();
      await d.close();
    }
    expect(existsSync(socket), "a clean stop removes the socket").to.equal(false);

    // A path longer than a socket address holds is refused with a clear message.
    const long = await startClientDaemon({ security: net.security.cardholder, card, dir, socket: join(dir, "run", `${"s".repeat(120)}.sock`) }).then(
      async (x) => {
        await x.close();
        return "";
      },
      (e: Error) => e.message,
    );
    expect(long).to.match(/more than the 107 a Unix socket address holds; choose a shorter path/);
  });
});
