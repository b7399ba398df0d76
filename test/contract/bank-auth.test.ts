// The bank acts only for the account holder: the attacks from outside, as
// tests. A second cardholder with a card and a daemon of their own loading
// from someone else's account; reading another's account; calls without an
// access token, with a made-up, another bank's or an expired one; offers
// asked again and again to freeze an account's funds; and password guessing,
// on one account and across many. Each checks what the account holder would:
// the balance, the funds available, the holds, and the bank's log, which
// must hold no password or access token.

import { expect } from "chai";
import { ClientError, Metadata, Status } from "nice-grpc";
import { randomBytes, randomUUID } from "node:crypto";
import { join } from "node:path";
import { BankServiceDefinition } from "../../gen/netpurse/bank/v1/bank.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { bearer, clientFactory, openChannel } from "../../lib/grpc/client.js";
import { reasonName, reasonOf, retryAfterMsOf } from "../../lib/grpc/errors.js";
import { purseId, txnId } from "../../lib/ids.js";
import { createLogger } from "../../lib/log.js";
import { money } from "../../lib/money.js";
import { openSqlite } from "../../lib/store/db.js";
import { purseState } from "../../client/card/purse-state.js";
import { CardholderDaemon } from "../../client/daemon/daemon.js";
import { CLIENT_MIGRATIONS, SqliteJournal, SqliteLoadJournal } from "../../client/daemon/journal.js";
import { DEFAULT_MAX_HOLDS_PER_ACCOUNT } from "../../services/bank/bank-server.js";
import { hashPassword } from "../../services/bank/credentials.js";
import { writeBankFile } from "../../services/bank/identity.js";
import { DEFAULT_LOGIN_LIMITS } from "../../services/bank/login-limiter.js";
import { startBankServer, type BankConfig } from "../../services/bank/server.js";
import { failure } from "../support/card-client.js";
import { account, EUR, freshCardholder, TEST_PASSWORD_COST } from "../support/load.js";
import { startNetwork, type Network } from "../support/network.js";

describe("contract: the bank acts only for the account holder (Login, access tokens, limits)", function () {
  this.timeout(60_000);
  let net: Network;

  // Every line the services of this process log while these tests run: no password or access token may be in any.
  const logged: string[] = [];
  const secrets = new Set<string>();
  const originalWrite = process.stderr.write.bind(process.stderr);
  const logLevel = process.env.NETPURSE_LOG_LEVEL;

  before(async () => {
    process.env.NETPURSE_LOG_LEVEL = "debug";
    const capture = (chunk: string | Uint8Array, ...rest: unknown[]): boolean => {
      logged.push(typeof chunk === "string" ? chunk : Buffer.from(chunk).toString("utf8"));
      return (originalWrite as (...args: unknown[]) => boolean)(chunk, ...rest);
    };
    process.stderr.write = capture;
    net = await startNetwork({ terminals: [{ id: "terminal-1", psams: 1 }] });
  });
  after(async () => {
    await net?.close();
    process.stderr.write = originalWrite;
    if (logLevel === undefined) delete process.env.NETPURSE_LOG_LEVEL;
    else process.env.NETPURSE_LOG_LEVEL = logLevel;
  });

  /** A cardholder with a card and an account of EUR 1000.00, logged in; their password and token are secrets the logs must not show. */
  async function holder(o: Parameters<typeof freshCardholder>[1] = {}) {
    const h = await freshCardholder(net, o);
    secrets.add(h.password).add(h.token);
    return h;
  }

  /** The bank with these call options' metadata (a token, a made-up one, none). */
  const bankWith = (metadata?: Metadata) => clientFactory().create(BankServiceDefinition, channelTo(net.bank.address), metadata ? { "*": { metadata } } : {});
  const channels: ReturnType<typeof openChannel>[] = [];
  const channelTo = (address: string) => {
    const c = openChannel(address, net.security.cardholder.channel({ kind: "bank" }));
    channels.push(c);
    return c;
  };
  after(() => channels.forEach((c) => c.close()));

  /** A bank of its own in this process (its own books, limiter and settings), reached as a cardholder reaches a bank. */
  async function ownBank(name: string, o: Partial<BankConfig> = {}) {
    const dir = join(net.data, name);
    await writeBankFile(join(dir, "bank.json"), name, randomBytes(32).toString("hex"));
    const bank = await startBankServer({ security: await net.security.of("bank", name), listen: "127.0.0.1:0", dir, loadServer: net.load.address, ...o });
    const client = clientFactory().create(BankServiceDefinition, channelTo(bank.address));
    /** Opens an account there with a password, as `netpurse-bank open-account` does. */
    const open = async (accountId: string, password: string) => {
      secrets.add(password);
      await bank.store.open({
        accountId,
        holder: `Holder of ${accountId}`,
        currency: EUR,
        exponent: 2,
        openingMinor: 10_000,
        passwordHash: await hashPassword(password, TEST_PASSWORD_COST),
      });
    };
    const login = async (accountId: string, password: string) => {
      const r = await client.login({ accountId, password });
      secrets.add(r.accessToken);
      return r;
    };
    return { bank, client, open, login };
  }

  /** The daemon of a second cardholder, with a card and a journal of their own, in this process. */
  function daemonOf(h: Awaited<ReturnType<typeof holder>>, name: string) {
    const db = openSqlite(join(net.data, name, "client.db"), CLIENT_MIGRATIONS);
    const daemon = new CardholderDaemon({
      transport: new InProcessTransport(h.card),
      journal: new SqliteJournal(db),
      loads: new SqliteLoadJournal(db),
      log: createLogger(name),
      security: net.security.cardholder,
    });
    return {
      daemon,
      close: async () => {
        await daemon.close();
        await db.close();
      },
    };
  }

  type Refusal = { code: string; reason: string; retryAfterMs: number | undefined };

  /** The code, reason and advised retry delay of a server's refusal. */
  function refusalOf(e: unknown): Refusal {
    if (!(e instanceof ClientError)) throw e;
    const r = reasonOf(e);
    return { code: Status[e.code], reason: r === undefined ? "" : reasonName(r).replace("ERROR_REASON_", ""), retryAfterMs: retryAfterMsOf(e) };
  }

  /** The refusal of a call that must be refused. */
  async function refusal(p: Promise<unknown>): Promise<Refusal> {
    const e = await p.then(
      () => undefined,
      (x: unknown) => x ?? new Error("refused without a reason"),
    );
    if (e === undefined) throw new Error("the call succeeded; a refusal was expected");
    return refusalOf(e);
  }

  const UNAUTHENTICATED = { code: "UNAUTHENTICATED", reason: "UNAUTHENTICATED" };
  const NOT_ALLOWED = { code: "PERMISSION_DENIED", reason: "NOT_ALLOWED" };

  describe("another's account", () => {
    it("a second cardholder, with a card and a daemon of their own, cannot load from someone else's account: PERMISSION_DENIED, no hold, the balance untouched", async () => {
      const victim = await holder();
      const attacker = await holder();
      const theirs = daemonOf(attacker, "attacker-daemon");
      try {
        const amount = money(20_000, EUR, 2);
        const asked = { bankAddress: net.bank.address, accountId: victim.accountId, amount, approvedAmount: amount, requestId: "" };
        // With the attacker's own token (for the attacker's own account).
        const withOwnToken = await theirs.daemon.service.loadCard({ ...asked, bankAccessToken: attacker.token }, {} as never).catch((e: unknown) => e);
        expect(withOwnToken).to.include({ code: Status.PERMISSION_DENIED });
        expect((withOwnToken as Error).message).to.contain(`acts for account ${attacker.accountId} only`);
        // With no token, and with a made-up one.
        const without = await theirs.daemon.service.loadCard({ ...asked, bankAccessToken: "" }, {} as never).catch((e: unknown) => e);
        expect(without).to.include({ code: Status.UNAUTHENTICATED });
        const madeUp = await theirs.daemon.service
          .loadCard({ ...asked, bankAccessToken: randomBytes(32).toString("base64url") }, {} as never)
          .catch((e: unknown) => e);
        expect(madeUp).to.include({ code: Status.UNAUTHENTICATED });
        expect(await account(net, victim.accountId)).to.deep.include({ balance: 100_000, available: 100_000, holds: [] });
        expect((await attacker.reader.readPurse()).balance).to.equal(0);
      } finally {
        await theirs.close();
      }
    });

    it("CreateLoadOffer asked directly with a made-up card: refused without a token and with another account's, and nothing is held", async () => {
      const victim = await holder();
      const attacker = await holder();
      const purse = { ...purseState(await attacker.reader.readPurse()), purseId: purseId(randomBytes(8).toString("hex")), maxBalance: money(100_000, EUR, 2) };
      const offer = { transactionId: txnId(randomUUID()), accountId: victim.accountId, amount: money(100_000, EUR, 2), purse };
      expect(await refusal(bankWith().createLoadOffer(offer))).to.include(UNAUTHENTICATED);
      expect(await refusal(bankWith(bearer(attacker.token)).createLoadOffer(offer))).to.include(NOT_ALLOWED);
      expect(await account(net, victim.accountId)).to.deep.include({ balance: 100_000, available: 100_000, holds: [] });
    });

    it("GetAccount, ListHolds and ListStatementLines of another's account are refused (PERMISSION_DENIED), and of any account without a token (UNAUTHENTICATED)", async () => {
      const victim = await holder();
      const attacker = await holder();
      const asAttacker = bankWith(bearer(attacker.token));
      const anonymous = bankWith();
      const theirs = { accountId: victim.accountId };
      for (const [name, call] of [
        ["GetAccount", (b: typeof anonymous) => b.getAccount(theirs)],
        ["ListHolds", (b: typeof anonymous) => b.listHolds(theirs)],
        ["ListStatementLines", (b: typeof anonymous) => b.listStatementLines(theirs)],
      ] as const) {
        expect(await failure(call(asAttacker)), name).to.include(NOT_ALLOWED);
        expect(await failure(call(anonymous)), name).to.include(UNAUTHENTICATED);
      }
      // The holder reads their own.
      expect(await account(net, victim.accountId)).to.deep.include({ balance: 100_000 });
      expect((await net.bankAs(attacker.accountId).getAccount({ accountId: attacker.accountId })).accountId).to.equal(attacker.accountId);
    });
  });

  describe("access tokens", () => {
    it("no token, another scheme, a malformed, a made-up and another bank's token are UNAUTHENTICATED, on every account holder's RPC", async () => {
      const h = await holder();
      const other = await ownBank("other-bank");
      await other.open(h.accountId, "the other bank's password");
      const othersToken = (await other.login(h.accountId, "the other bank's password")).accessToken;
      const purse = purseState(await h.reader.readPurse());
      const cases: [string, Metadata | undefined][] = [
        ["no token", undefined],
        ["another scheme", Metadata({ authorization: `Basic ${Buffer.from(`${h.accountId}:${h.password}`).toString("base64")}` })],
        ["a malformed token", Metadata({ authorization: "Bearer not-a-token" })],
        ["an oversized one", Metadata({ authorization: `Bearer ${"A".repeat(4_000)}` })],
        ["a made-up token", bearer(randomBytes(32).toString("base64url"))],
        ["another bank's token", bearer(othersToken)],
      ];
      for (const [what, metadata] of cases) {
        const b = bankWith(metadata);
        const mine = { accountId: h.accountId };
        expect(await failure(b.getAccount(mine)), what).to.include(UNAUTHENTICATED);
        expect(await failure(b.listHolds(mine)), what).to.include(UNAUTHENTICATED);
        expect(await failure(b.listStatementLines(mine)), what).to.include(UNAUTHENTICATED);
        const f = await failure(b.createLoadOffer({ transactionId: txnId(randomUUID()), accountId: h.accountId, amount: money(100, EUR, 2), purse }));
        expect(f, what).to.include(UNAUTHENTICATED);
        expect(f.details, what).to.match(/log in|Login/);
      }
      expect(await account(net, h.accountId)).to.deep.include({ available: 100_000, holds: [] });
      // The scheme's case is no matter (RFC 6750), as at the client daemon's TCP listener: one parser serves both.
      expect((await bankWith(Metadata({ authorization: `bearer ${h.token}` })).getAccount({ accountId: h.accountId })).accountId).to.equal(h.accountId);
    });

    it("a token expires: accepted before, UNAUTHENTICATED after, until the holder logs in again", async () => {
      const short = await ownBank("short-lived-bank", { accessTokenTtlMs: 400 });
      await short.open("alice", "alice's password");
      const { accessToken, expiresAt } = await short.login("alice", "alice's password");
      expect((expiresAt?.getTime() ?? 0) - Date.now()).to.be.within(0, 400);
      const asAlice = clientFactory().create(BankServiceDefinition, channelTo(short.bank.address), { "*": { metadata: bearer(accessToken) } });
      expect((await asAlice.getAccount({ accountId: "alice" })).balance?.amountMinor).to.equal(10_000n);
      await new Promise((r) => setTimeout(r, 500));
      const f = await failure(asAlice.getAccount({ accountId: "alice" }));
      expect(f).to.include(UNAUTHENTICATED);
      expect(f.details).to.contain("expired");
      const again = await short.login("alice", "alice's password");
      expect((await short.client.getAccount({ accountId: "alice" }, { metadata: bearer(again.accessToken) })).accountId).to.equal("alice");
      await short.bank.close();
    });

    it("a new password ends the account's tokens", async () => {
      const h = await holder();
      const renewed = `renewed ${randomUUID()}`;
      await net.bank.store.setPasswordHash(h.accountId, await hashPassword(renewed, TEST_PASSWORD_COST));
      secrets.add(renewed);
      expect(await failure(bankWith(bearer(h.token)).getAccount({ accountId: h.accountId }))).to.include(UNAUTHENTICATED);
      expect(await failure(net.clients.bank.login({ accountId: h.accountId, password: h.password }))).to.include(UNAUTHENTICATED);
      const { accessToken } = await net.clients.bank.login({ accountId: h.accountId, password: renewed });
      secrets.add(accessToken);
      expect((await bankWith(bearer(accessToken)).getAccount({ accountId: h.accountId })).accountId).to.equal(h.accountId);
    });

    it("a new password also ends a login being checked when it was set: no token comes of it", async () => {
      const own = await ownBank("reset-mid-login");
      await own.open("bob", "bob's old password");
      const { store } = own.bank;
      // The password changes after the login read its hash and before it was checked, as `netpurse-bank set-password` racing a login would.
      const read = store.passwordHash.bind(store);
      store.passwordHash = async (id: string) => {
        const hash = await read(id);
        await store.setPasswordHash(id, await hashPassword("bob's new password", TEST_PASSWORD_COST));
        return hash;
      };
      try {
        expect(await failure(own.client.login({ accountId: "bob", password: "bob's old password" }))).to.include(UNAUTHENTICATED);
      } finally {
        store.passwordHash = read;
      }
      expect(await store.db.get("SELECT COUNT(*) AS n FROM access_tokens WHERE account_id = 'bob'")).to.deep.equal({ n: 0 });
      secrets.add("bob's new password");
      const { accessToken } = await own.login("bob", "bob's new password");
      expect((await own.client.getAccount({ accountId: "bob" }, { metadata: bearer(accessToken) })).accountId).to.equal("bob");
      await own.bank.close();
    });

    it("a new password set while a load offer is asked ends the token there too: no hold", async () => {
      const h = await holder();
      const own = await ownBank("reset-mid-offer");
      await own.open("carol", "carol's password");
      const { accessToken } = await own.login("carol", "carol's password");
      const { store } = own.bank;
      // The password changes right after the token was checked, before the hold is made.
      const lookUp = store.accessToken.bind(store);
      let reset = false;
      store.accessToken = async (hash, q) => {
        const row = await lookUp(hash, q);
        if (!reset) {
          reset = true;
          await store.setPasswordHash("carol", await hashPassword("carol's new password", TEST_PASSWORD_COST));
        }
        return row;
      };
      secrets.add("carol's new password");
      const purse = purseState(await h.reader.readPurse());
      const asked = { transactionId: txnId(randomUUID()), accountId: "carol", amount: money(1_000, EUR, 2), purse };
      try {
        expect(await failure(own.client.createLoadOffer(asked, { metadata: bearer(accessToken) }))).to.include(UNAUTHENTICATED);
      } finally {
        store.accessToken = lookUp;
      }
      expect(await store.db.get("SELECT COUNT(*) AS n FROM holds WHERE account_id = 'carol'")).to.deep.equal({ n: 0 });
      await own.bank.close();
    });

    it("logins the bank could not check (its database failing) lock nothing: the right password works after", async () => {
      const own = await ownBank("failing-books");
      await own.open("dave", "dave's password");
      const { store } = own.bank;
      const read = store.passwordHash.bind(store);
      store.passwordHash = () => Promise.reject(new Error("disk I/O error"));
      try {
        for (let i = 0; i < DEFAULT_LOGIN_LIMITS.maxFailuresPerAccount + 1; i++) {
          const f = await refusal(own.client.login({ accountId: "dave", password: "dave's password" }));
          expect(f.code).to.not.equal("RESOURCE_EXHAUSTED");
        }
      } finally {
        store.passwordHash = read;
      }
      const { accessToken } = await own.login("dave", "dave's password");
      expect((await own.client.getAccount({ accountId: "dave" }, { metadata: bearer(accessToken) })).accountId).to.equal("dave");
      await own.bank.close();
    });

    it("an account opened before passwords existed cannot log in until given one", async () => {
      // As the migration leaves an older bank.db: the account, no credentials.
      await net.bank.store.open({ accountId: "older-account", holder: "From before logins", currency: EUR, exponent: 2, openingMinor: 5_000 });
      expect(await failure(net.clients.bank.login({ accountId: "older-account", password: "anything at all" }))).to.include(UNAUTHENTICATED);
      await net.bank.store.setPasswordHash("older-account", await hashPassword("given one now", TEST_PASSWORD_COST));
      secrets.add("given one now");
      const { accessToken } = await net.clients.bank.login({ accountId: "older-account", password: "given one now" });
      secrets.add(accessToken);
      expect((await bankWith(bearer(accessToken)).getAccount({ accountId: "older-account" })).balance?.amountMinor).to.equal(5_000n);
    });

    it("Login refuses malformed input: INVALID_ARGUMENT naming the field", async () => {
      expect(await failure(net.clients.bank.login({ accountId: "not an id", password: "whatever it is" }))).to.include({ code: "INVALID_ARGUMENT" });
      const empty = await failure(net.clients.bank.login({ accountId: "someone", password: "" }));
      expect(empty).to.include({ code: "INVALID_ARGUMENT" });
      expect(empty.details).to.match(/^password: /);
      expect(await failure(net.clients.bank.login({ accountId: "someone", password: "x".repeat(1_025) }))).to.include({ code: "INVALID_ARGUMENT" });
    });
  });

  describe("the account's funds cannot be frozen with offers", () => {
    it(`offers asked again and again with made-up cards stop at the cap of ${DEFAULT_MAX_HOLDS_PER_ACCOUNT} holds (RESOURCE_EXHAUSTED TOO_MANY_HOLDS); the rest of the funds stay available`, async () => {
      const h = await holder();
      const asHolder = net.bankAs(h.accountId);
      const real = purseState(await h.reader.readPurse());
      const offer = (id: string = randomUUID()) => ({
        transactionId: txnId(id),
        accountId: h.accountId,
        amount: money(1_000, EUR, 2),
        purse: { ...real, purseId: purseId(randomBytes(8).toString("hex")) },
      });
      const made: string[] = [];
      const refused: Refusal[] = [];
      for (let i = 0; i < 10; i++) {
        const asked = offer();
        const e = await asHolder.createLoadOffer(asked).then(
          () => undefined,
          (x: unknown) => x ?? new Error("refused without a reason"),
        );
        if (e === undefined) made.push(asked.transactionId.value);
        else refused.push(refusalOf(e));
      }
      expect(made).to.have.length(DEFAULT_MAX_HOLDS_PER_ACCOUNT);
      expect(refused).to.have.length(10 - DEFAULT_MAX_HOLDS_PER_ACCOUNT);
      for (const r of refused) expect(r).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_HOLDS" });
      expect(refused[0]?.retryAfterMs).to.be.greaterThan(0);
      const a = await account(net, h.accountId);
      expect(a).to.deep.include({ balance: 100_000, available: 100_000 - DEFAULT_MAX_HOLDS_PER_ACCOUNT * 1_000 });
      expect(a.holds).to.have.length(DEFAULT_MAX_HOLDS_PER_ACCOUNT);
      // A retry of an offer already made still gets its offer at the cap: a lost answer is never a lost hold.
      const first = a.holds.find((x) => x.transactionId?.value === made[0]);
      const again = await asHolder.createLoadOffer({ ...offer(made[0]), purse: { ...real, purseId: first?.purseId } });
      expect(again.offer?.transactionId?.value).to.equal(made[0]);
      // Once the bank releases holds nobody came back for, offers are made again.
      await net.bank.server.resolveStaleHolds(0);
      expect(await account(net, h.accountId)).to.deep.include({ available: 100_000 });
      await asHolder.createLoadOffer(offer());
      expect((await account(net, h.accountId)).available).to.equal(99_000);
    });
  });

  describe("password guessing", () => {
    it(`an account is locked after ${DEFAULT_LOGIN_LIMITS.maxFailuresPerAccount} failed logins, even for the right password, for 15 minutes (RESOURCE_EXHAUSTED with RetryInfo); other accounts are not`, async () => {
      const b = await ownBank("guessed-bank");
      await b.open("target", "the target's password");
      await b.open("bystander", "the bystander's password");
      for (let i = 0; i < DEFAULT_LOGIN_LIMITS.maxFailuresPerAccount; i++) {
        secrets.add(`guess number ${i}`);
        const f = await failure(b.client.login({ accountId: "target", password: `guess number ${i}` }));
        expect(f, `guess ${i}`).to.include(UNAUTHENTICATED);
        expect(f.details).to.equal("wrong account id or password");
      }
      const locked = await refusal(b.client.login({ accountId: "target", password: "the target's password" }));
      expect(locked).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_ATTEMPTS" });
      expect(locked.retryAfterMs).to.be.within(14 * 60_000, 15 * 60_000);
      expect(await failure(b.client.login({ accountId: "target", password: "the target's password" }))).to.include({
        code: "RESOURCE_EXHAUSTED",
      });
      // The bystander, from the same address, logs in: the address has not reached its own limit.
      expect((await b.login("bystander", "the bystander's password")).accountId).to.equal("bystander");
      // An unknown account answers as a wrong password does: no account list can be read from the answers.
      expect(await failure(b.client.login({ accountId: "nobody-here", password: "the target's password" }))).to.deep.equal(
        await failure(b.client.login({ accountId: "bystander", password: "not the bystander's" })),
      );
      await b.bank.close();
    });

    it(`an address failing across many accounts is refused after ${DEFAULT_LOGIN_LIMITS.maxFailuresPerAddress} failures, even for a right password of an account it never guessed`, async () => {
      const b = await ownBank("sprayed-bank");
      const accounts = Array.from({ length: DEFAULT_LOGIN_LIMITS.maxFailuresPerAddress }, (_, i) => `sprayed-${i}`);
      for (const a of accounts) await b.open(a, `${a}'s own password`);
      await b.open("untouched", "the untouched password");
      secrets.add("Password1!");
      // One guess per account, the same popular password on each: no account reaches its own limit.
      for (const a of accounts) expect(await failure(b.client.login({ accountId: a, password: "Password1!" })), a).to.include(UNAUTHENTICATED);
      const refused = await refusal(b.client.login({ accountId: "untouched", password: "the untouched password" }));
      expect(refused).to.include({ code: "RESOURCE_EXHAUSTED", reason: "TOO_MANY_ATTEMPTS" });
      expect(refused.retryAfterMs).to.be.within(14 * 60_000, 15 * 60_000);
      const f = await failure(b.client.login({ accountId: "sprayed-0", password: "sprayed-0's own password" }));
      expect(f.details).to.contain("from your address");
      await b.bank.close();
    });
  });

  // A suite of its own, so that it runs after every other (mocha runs a suite's own tests before its nested suites).
  describe("the log", () => {
    it("has no password or access token in any line, though the logins and refusals are logged", () => {
      const text = logged.join("");
      expect(text).to.contain("login refused: wrong account id or password");
      expect(text).to.contain("login refused: locked after failed logins");
      expect(text).to.contain("account holder logged in");
      expect(text).to.contain("refused an access token for another account");
      expect(secrets.size).to.be.greaterThan(20);
      for (const s of secrets) expect(text.includes(s), `a secret of ${s.length} characters is in the log`).to.equal(false);
    });
  });
});
