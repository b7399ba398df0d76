// The bank's credentials: password hashes (scrypt, salted, constant-time
// comparison) and the failed-login limiter, whose memory stays bounded
// whatever account ids and addresses an attacker varies.

import { expect } from "chai";
import {
  accessTokenHash,
  ACCESS_TOKEN_SHAPE,
  hashPassword,
  newAccessToken,
  PASSWORD_COST,
  passwordProblem,
  verifyPassword,
} from "../../services/bank/credentials.js";
import { DEFAULT_LOGIN_LIMITS, LoginLimiter } from "../../services/bank/login-limiter.js";

const CHEAP = { ln: 10, r: 8, p: 1 };

describe("unit: the bank's password hashes", () => {
  it("are salted scrypt with their cost written in, and verify only the password they were made from", async () => {
    const a = await hashPassword("correct horse battery", CHEAP);
    const b = await hashPassword("correct horse battery", CHEAP);
    expect(a).to.match(/^\$scrypt\$ln=10,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/);
    expect(a).to.not.equal(b); // a fresh salt each time
    expect(a).to.not.contain("correct horse");
    expect(await verifyPassword("correct horse battery", a)).to.equal(true);
    expect(await verifyPassword("correct horse batterY", a)).to.equal(false);
    expect(await verifyPassword("", a)).to.equal(false);
  });

  it("the bank's own cost is N = 2^15, r = 8, p = 3", async () => {
    expect(PASSWORD_COST).to.deep.equal({ ln: 15, r: 8, p: 3 });
    expect(await hashPassword("some password")).to.match(/^\$scrypt\$ln=15,r=8,p=3\$/);
  });

  it("no stored hash (no account, or none set yet), a malformed one or one of an absurd cost verifies nothing", async () => {
    expect(await verifyPassword("anything", undefined)).to.equal(false);
    expect(await verifyPassword("anything", "plain text")).to.equal(false);
    const real = await hashPassword("anything", CHEAP);
    expect(await verifyPassword("anything", real.replace("ln=10", "ln=40"))).to.equal(false);
    expect(await verifyPassword("anything", real.slice(0, -4))).to.equal(false);
  });

  it("a password to set needs 8..1024 bytes", () => {
    expect(passwordProblem("short")).to.contain("at least 8");
    expect(passwordProblem("x".repeat(1_025))).to.contain("at most 1024");
    expect(passwordProblem("long enough")).to.equal(undefined);
  });

  it("access tokens are 32 random bytes, kept by their SHA-256 only", () => {
    const t = newAccessToken();
    expect(t).to.match(ACCESS_TOKEN_SHAPE);
    expect(newAccessToken()).to.not.equal(t);
    expect(accessTokenHash(t))
      .to.match(/^[0-9a-f]{64}$/)
      .and.not.contain(t);
  });
});

describe("unit: the failed-login limiter", () => {
  const L = DEFAULT_LOGIN_LIMITS;
  const fail = (l: LoginLimiter, account: string, address: string, now: number) => {
    const refused = l.begin(account, address, now);
    if (!refused) l.end(account, address, false, now);
    return refused;
  };

  it("locks an account after 5 failures within 15 minutes, even for the right password, until the lock ends", () => {
    const l = new LoginLimiter();
    const t = 1_000_000;
    for (let i = 0; i < L.maxFailuresPerAccount; i++) expect(fail(l, "alice", `198.51.100.${i}`, t + i)).to.equal(undefined);
    const refused = l.begin("alice", "203.0.113.9", t + 10);
    expect(refused).to.deep.equal({ by: "account", retryAfterMs: L.lockMs - 10 + L.maxFailuresPerAccount - 1 });
    expect(l.begin("bob", "203.0.113.9", t + 10)).to.equal(undefined); // another account is not locked
    l.end("bob", "203.0.113.9", true, t + 10);
    expect(l.begin("alice", "203.0.113.9", t + L.lockMs + 5)).to.equal(undefined);
  });

  it("forgets failures older than the window; a right password clears the account's (not the address's)", () => {
    const l = new LoginLimiter();
    for (let i = 0; i < L.maxFailuresPerAccount - 1; i++) fail(l, "alice", "198.51.100.1", 0);
    expect(fail(l, "alice", "198.51.100.1", L.windowMs + 1)).to.equal(undefined); // the old four no longer count
    for (let i = 0; i < L.maxFailuresPerAccount - 2; i++) fail(l, "alice", "198.51.100.1", L.windowMs + 2);
    expect(l.begin("alice", "198.51.100.1", L.windowMs + 3)).to.equal(undefined);
    l.end("alice", "198.51.100.1", true, L.windowMs + 3);
    for (let i = 0; i < L.maxFailuresPerAccount - 1; i++) expect(fail(l, "alice", "198.51.100.2", L.windowMs + 4)).to.equal(undefined);
  });

  it("slides its window: failures bunched on both sides of where a fixed window would start again still lock", () => {
    const l = new LoginLimiter();
    expect(fail(l, "alice", "198.51.100.1", 0)).to.equal(undefined);
    // Just before and just after 15 minutes from the first failure: a window counted from it would allow 3 + 5 here.
    const guesses = [-2_000, -1_500, -1_000, 1_000, 1_500, 2_000, 2_500, 3_000].map((dt) => fail(l, "alice", `203.0.113.${dt > 0 ? 1 : 2}`, L.windowMs + dt));
    expect(guesses.filter((r) => r === undefined)).to.have.length(L.maxFailuresPerAccount);
    for (const r of guesses.slice(L.maxFailuresPerAccount)) expect(r).to.deep.include({ by: "account" });
  });

  it("an attempt the bank could not check counts neither way: no failure added, none cleared", () => {
    const l = new LoginLimiter();
    for (let i = 0; i < L.maxFailuresPerAccount - 1; i++) fail(l, "alice", "198.51.100.1", 0);
    for (let i = 0; i < 10; i++) {
      expect(l.begin("alice", "198.51.100.2", 1)).to.equal(undefined);
      l.abandon("alice", "198.51.100.2", 1);
    }
    expect(fail(l, "alice", "198.51.100.3", 2)).to.equal(undefined);
    expect(l.begin("alice", "198.51.100.4", 3)).to.deep.include({ by: "account" });
  });

  it("counts attempts still being checked: parallel guesses cannot pass the limit together", () => {
    const l = new LoginLimiter();
    const begun = Array.from({ length: 10 }, (_, i) => l.begin("alice", `198.51.100.${i}`, 0));
    expect(begun.filter((r) => r === undefined)).to.have.length(L.maxFailuresPerAccount);
    expect(begun.filter((r) => r?.by === "account")).to.have.length(10 - L.maxFailuresPerAccount);
  });

  it("refuses an address failing across many accounts after 20 failures, whatever the account, IPv6 by its /64", () => {
    const l = new LoginLimiter();
    const from = (peer: string) => LoginLimiter.addressOf(peer);
    for (let i = 0; i < L.maxFailuresPerAddress; i++) expect(fail(l, `user-${i}`, from(`2001:db8:1:2::${i + 1}:40000`), 0)).to.equal(undefined);
    expect(l.begin("someone-else", from("2001:db8:1:2::ffff:40001"), 1)).to.deep.include({ by: "address" });
    expect(l.begin("someone-else", from("2001:db8:9:9::1:40002"), 1)).to.equal(undefined);
  });

  it("takes the address of a gRPC peer, grouped as the connection limits group it", () => {
    expect(LoginLimiter.addressOf("127.0.0.1:54321")).to.equal("127.0.0.1");
    expect(LoginLimiter.addressOf("::ffff:203.0.113.7:443")).to.equal("203.0.113.7");
    expect(LoginLimiter.addressOf("2001:db8:1:2::1:50000")).to.equal("2001:db8:1:2::/64");
    expect(LoginLimiter.addressOf("[::1]:7440")).to.equal("0:0:0:0::/64");
  });

  it("keeps bounded memory when an attacker varies account ids and addresses, and never forgets a locked account for it", () => {
    const l = new LoginLimiter({ maxTracked: 500 });
    for (let i = 0; i < L.maxFailuresPerAccount; i++) fail(l, "victim", `198.51.100.${i}`, 0);
    // A flood of single failures, each to a new account from a new address.
    for (let i = 0; i < 50_000; i++) fail(l, `made-up-${i}`, `10.${(i >> 16) & 255}.${(i >> 8) & 255}.${i & 255}`, 1);
    const tracked = l.tracked();
    expect(tracked.accounts).to.be.at.most(500);
    expect(tracked.addresses).to.be.at.most(500);
    expect(l.begin("victim", "192.0.2.1", 2)).to.deep.include({ by: "account" });
  });

  it("refuses when every slot holds a locked account: memory stays bounded, and no lock is pushed out", () => {
    const l = new LoginLimiter({ maxTracked: 3, maxFailuresPerAccount: 1, maxFailuresPerAddress: 1_000 });
    for (const a of ["a", "b", "c"]) fail(l, a, "198.51.100.1", 0);
    expect(l.begin("d", "198.51.100.1", 1)).to.deep.include({ by: "account" });
    expect(l.tracked().accounts).to.equal(3);
    // Once the locks end, new accounts are tracked again.
    expect(l.begin("d", "198.51.100.1", L.lockMs + L.windowMs + 1)).to.equal(undefined);
  });
});
