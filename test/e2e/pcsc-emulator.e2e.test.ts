// End to end through real PC/SC: software cards and a software PSAM served by
// the emulator to pcscd's vpcd driver, reached with opensc-tool as any PC/SC
// application reaches a reader. Skipped loudly (the reason on stderr) where
// pcscd, vpcd, opensc-tool or root are missing, or another pcscd runs. The
// last suite drives the emulator's vpcd link with a fake vpcd and needs none
// of that: it always runs.

import { expect } from "chai";
import { execFile, spawn, spawnSync, type ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { readFile, stat } from "node:fs/promises";
import { connect, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { SoftwareCard, type CardFile } from "../../client/card/software-card.js";
import { decodeResponse, encodeCommand, selectCommand, SW } from "../../lib/apdu/apdu.js";
import { readState } from "../../lib/apdu/state-log.js";
import { PSAM_AID } from "../../lib/protocol/psam.js";
import { PURSE_AID, ReadPurseResponse } from "../../lib/protocol/purse.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { FrameReader, VirtualCard, vpcdFrame } from "../../services/emulator/virtual-card.js";
import { findProgram } from "../../services/emulator/pcscd.js";
import { startEmulatorProcess, type EmulatorProcess } from "../../services/emulator/emulator-process.js";
import { makeCard, makeIssuer, makePsam, tempDir } from "../support/fixtures.js";
import { waitFor } from "../support/network.js";
import { emulatedReadersOrSkip, openscReaders, openscSend, pcscUnavailable, skipLoudly, type TestReaders } from "../support/pcsc.js";

const ROOT = new URL("../..", import.meta.url).pathname;
const EMULATOR = join(ROOT, "bin/netpurse-emulator");

const SELECT_PURSE = encodeCommand(selectCommand(PURSE_AID)).toString("hex");
const SELECT_PSAM = encodeCommand(selectCommand(PSAM_AID)).toString("hex");
const READ_PURSE = "805C000000";

async function cardFile(path: string): Promise<CardFile> {
  return readState<CardFile>(path);
}

/** SELECT and READ PURSE through opensc-tool; the purse as the card reported it. */
async function readPurse(reader: string) {
  const [select, read] = await openscSend(reader, [SELECT_PURSE, READ_PURSE]);
  expect(select?.sw, "SELECT purse").to.equal("9000");
  expect(read?.sw, "READ PURSE").to.equal("9000");
  return ReadPurseResponse.decode(read!.data);
}

/** The TCP ports listening on IPv4 and IPv6, with their local addresses, from /proc/net. */
async function listeners(port: number): Promise<string[]> {
  const found: string[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    const text = await readFile(file, "utf8").catch(() => "");
    for (const line of text.split("\n").slice(1)) {
      const [, local, , state] = line.trim().split(/\s+/);
      if (!local || state !== "0A") continue; // 0A: LISTEN
      const [addr, hexPort] = local.split(":");
      if (parseInt(hexPort!, 16) !== port) continue;
      // /proc/net/tcp writes an IPv4 address as one little-endian word.
      found.push(addr!.length === 8 ? Buffer.from(addr!, "hex").reverse().join(".") : `[${addr}]`);
    }
  }
  return found;
}

/** The machine's first IPv4 address that is not loopback, if it has one. */
function externalIpv4(): string | undefined {
  for (const list of Object.values(networkInterfaces())) {
    for (const a of list ?? []) if (a.family === "IPv4" && !a.internal) return a.address;
  }
  return undefined;
}

/** How a TCP connection attempt ends: "connected", or the error code. */
function tryConnect(host: string, port: number): Promise<string> {
  return new Promise((resolve) => {
    const s = connect({ host, port });
    s.setTimeout(3_000, () => {
      s.destroy();
      resolve("timeout");
    });
    s.once("connect", () => {
      s.destroy();
      resolve("connected");
    });
    s.once("error", (e: NodeJS.ErrnoException) => resolve(e.code ?? e.message));
  });
}

describe("emulated PC/SC readers: software cards and a PSAM behind pcscd, through opensc-tool", function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  let issuer: Issuer | undefined;
  let cards: string[];
  let r: TestReaders | undefined;

  before(async function () {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
    cards = [await makeCard(issuer, dir, { name: "one", value: 1234 }), await makeCard(issuer, dir, { name: "two", value: 5678 })];
    const psam = await makePsam(issuer, dir);
    r = await emulatedReadersOrSkip(this, {
      cards: [
        { name: "netpurse test card 1", app: await SoftwareCard.open(cards[0]!) },
        { name: "netpurse test card 2", app: await SoftwareCard.open(cards[1]!) },
        { name: "netpurse test PSAM 1", app: await SoftwarePsam.open(psam) },
      ],
      portBase: 36_200,
    });
  });

  after(async () => {
    // Runs even when a test failed: pcscd must not outlive the suite.
    await r?.close();
    await issuer?.close();
    await cleanup();
  });

  const reader = (i: number) => r!.readers[i]!;

  it("lists one reader per card and PSAM, each with its card in", async () => {
    expect(r!.readers.map((x) => x.name)).to.deep.equal(["netpurse test card 1 00 00", "netpurse test card 2 00 00", "netpurse test PSAM 1 00 00"]);
    const listed = await openscReaders();
    for (const x of r!.readers) {
      const found = listed.find((l) => l.name === x.name);
      expect(found, `${x.name} in opensc-tool -l`).to.not.equal(undefined);
      expect(found!.card, `a card in ${x.name}`).to.equal(true);
    }
  });

  it("answers SELECT of the purse and READ PURSE with 9000 and the purse of each card's file, both served at once", async () => {
    for (const [i, path] of cards.entries()) {
      const file = await cardFile(path);
      const purse = await readPurse(reader(i).name);
      expect(purse.purseId.toString("hex")).to.equal(file.purseId);
      expect(purse.providerId.toString("hex")).to.equal(file.providerId);
      expect(purse.balance).to.equal(file.balance);
      expect(purse.balance).to.equal(i === 0 ? 1234 : 5678);
      expect(purse.currency).to.equal(file.currency);
      expect(purse.counter).to.equal(file.counter);
    }
  });

  it("has the PSAM answer SELECT of its AID with 9000, and SELECT of the purse with 6A82", async () => {
    const [psam, purse] = await openscSend(reader(2).name, [SELECT_PSAM, SELECT_PURSE]);
    expect(psam?.sw).to.equal("9000");
    expect(purse?.sw).to.equal("6A82");
  });

  it("shows the reader empty once the card is removed, and the card again once it is inserted", async () => {
    const card = reader(0).card;
    await card.remove();
    await waitFor(async () => (await openscReaders()).find((l) => l.name === reader(0).name)?.card === false, 10_000, "the reader to show no card");
    // The other readers keep their cards.
    expect((await openscReaders()).find((l) => l.name === reader(1).name)?.card).to.equal(true);
    const err = await promisify(execFile)("opensc-tool", ["-r", reader(0).name, "-s", SELECT_PURSE]).then(
      () => undefined,
      (e: Error & { stderr?: string }) => e,
    );
    expect(err, "opensc-tool on an empty reader").to.not.equal(undefined);
    card.insert();
    await card.whenReady();
    await waitFor(async () => (await openscReaders()).find((l) => l.name === reader(0).name)?.card === true, 10_000, "the card back in the reader");
    expect((await readPurse(reader(0).name)).balance).to.equal(1234);
  });

  it("gets the cards back after pcscd restarts, without restarting the emulator", async () => {
    const before = r!.pcscd!.pid;
    const dropped = new Promise((resolve) => reader(1).card.once("disconnect", resolve));
    await r!.pcscd!.restart();
    await dropped;
    expect(r!.pcscd!.pid).to.be.a("number").and.not.equal(before);
    await Promise.all(r!.readers.map((x) => x.card.whenReady()));
    await waitFor(
      async () => (await openscReaders()).filter((l) => r!.readers.some((x) => x.name === l.name) && l.card).length === 3,
      10_000,
      "every card back",
    );
    expect((await readPurse(reader(1).name)).balance).to.equal(5678);
  });

  it("keeps answering vpcd while this process's main thread waits in a synchronous PC/SC call", async () => {
    // opensc-tool run synchronously: its SCardConnect powers the card up and reads its ATR through vpcd
    // while this thread, which also serves the card application, is blocked (as it is in a pcsclite
    // SCardEstablishContext or SCardReleaseContext). The card's link answers from its own thread.
    const started = Date.now();
    const run = spawnSync("opensc-tool", ["-r", reader(1).name, "-a"], { encoding: "utf8", timeout: 15_000 });
    expect(run.error, "opensc-tool did not hang").to.equal(undefined);
    expect(run.status, run.stderr).to.equal(0);
    expect(run.stdout.trim()).to.equal([...SoftwareCard.ATR].map((b) => b.toString(16).padStart(2, "0")).join(":"));
    expect(Date.now() - started).to.be.lessThan(5_000);
  });

  it("has vpcd listen on 127.0.0.1 only: its port is refused on the machine's network address", async function () {
    const port = reader(0).port;
    expect(await listeners(port)).to.deep.equal(["127.0.0.1"]);
    expect(await listeners(port + 1), "vpcd's second slot").to.deep.equal(["127.0.0.1"]);
    const ip = externalIpv4();
    if (!ip) skipLoudly(this, "this machine has no non-loopback IPv4 address to try vpcd's port on (the listener check above passed)");
    expect(await tryConnect(ip, port)).to.equal("ECONNREFUSED");
  });
});

describe("netpurse-emulator: several cards and a PSAM from one process, with its own pcscd", function () {
  this.timeout(30_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  let issuer: Issuer | undefined;
  let cards: string[];
  let psam: string;
  let child: ChildProcess | undefined;
  let exited: Promise<number | null> = Promise.resolve(null);
  let out = "";
  let pcscdPid: number | undefined;

  before(async function () {
    const reason = await pcscUnavailable();
    if (reason) skipLoudly(this, reason);
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
    cards = [await makeCard(issuer, dir, { name: "a", value: 111 }), await makeCard(issuer, dir, { name: "b", value: 222 })];
    psam = await makePsam(issuer, dir);
    const c = spawn(EMULATOR, ["--card", cards[0]!, "--card", cards[1]!, "--psam", psam, "--port-base", "36300", "--pcscd", join(dir, "pcscd")], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    child = c;
    exited = new Promise((resolve) => c.once("exit", (code) => resolve(code)));
    c.stdout.on("data", (d: Buffer) => (out += d.toString()));
    c.stderr.on("data", (d: Buffer) => (out += d.toString()));
    await waitFor(() => /listening on/.test(out) || c.exitCode !== null, 20_000, "netpurse-emulator to start");
    expect(c.exitCode, out).to.equal(null);
    pcscdPid = Number(/pcscd pid (\d+)/.exec(out)?.[1]);
  });

  after(async () => {
    if (child && child.exitCode === null) {
      child.kill("SIGTERM");
      await exited;
    }
    if (pcscdPid && alive(pcscdPid)) process.kill(pcscdPid, "SIGTERM");
    await issuer?.close();
    await cleanup();
  });

  it("prints which reader serves which file", () => {
    expect(out).to.contain(`reader "netpurse card 1 00 00" serves card ${cards[0]} (vpcd 127.0.0.1:36300)`);
    expect(out).to.contain(`reader "netpurse card 2 00 00" serves card ${cards[1]} (vpcd 127.0.0.1:36302)`);
    expect(out).to.contain(`reader "netpurse PSAM 1 00 00" serves PSAM ${psam} (vpcd 127.0.0.1:36304)`);
  });

  it("serves each card's own purse and the PSAM", async () => {
    expect((await readPurse("netpurse card 1 00 00")).balance).to.equal(111);
    expect((await readPurse("netpurse card 2 00 00")).balance).to.equal(222);
    expect((await openscSend("netpurse PSAM 1 00 00", [SELECT_PSAM]))[0]?.sw).to.equal("9000");
  });

  it("stops its pcscd and itself on SIGTERM", async () => {
    expect(pcscdPid).to.be.a("number");
    expect(alive(pcscdPid!), "pcscd running").to.equal(true);
    child!.kill("SIGTERM");
    expect(await exited).to.equal(0);
    await waitFor(() => !alive(pcscdPid!), 5_000, "pcscd to be gone");
    expect(await findRunningPcscd()).to.deep.equal([]);
  });
});

describe("startEmulatorProcess: the cards in a child process, taken out and put back over its IPC channel", function () {
  this.timeout(60_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  let issuer: Issuer | undefined;
  let e: EmulatorProcess | undefined;

  before(async function () {
    const reason = await pcscUnavailable();
    if (reason) skipLoudly(this, reason);
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
    const card = await makeCard(issuer, dir, { value: 777 });
    const psam = await makePsam(issuer, dir);
    e = await startEmulatorProcess({ dir: join(dir, "emulator"), cards: [card], psams: [psam], pcscd: true, portBase: 36_400 });
  });

  after(async () => {
    await e?.close();
    await issuer?.close();
    await cleanup();
  });

  it("names the readers as netpurse-emulator does, and serves them from the child", async () => {
    expect(e!.readers.map((r) => [r.name, r.port])).to.deep.equal([
      ["netpurse card 1 00 00", 36_400],
      ["netpurse PSAM 1 00 00", 36_402],
    ]);
    expect(e!.pid).to.not.equal(process.pid);
    expect((await readPurse("netpurse card 1 00 00")).balance).to.equal(777);
  });

  it("takes a card out and puts it back on request", async () => {
    const name = "netpurse card 1 00 00";
    await e!.control.remove(name);
    await waitFor(async () => (await openscReaders()).find((l) => l.name === name)?.card === false, 10_000, "the reader to show no card");
    expect((await openscReaders()).find((l) => l.name === "netpurse PSAM 1 00 00")?.card).to.equal(true);
    await e!.control.insert(name);
    await e!.control.whenReady(name);
    await waitFor(async () => (await openscReaders()).find((l) => l.name === name)?.card === true, 10_000, "the card back");
    expect((await readPurse(name)).balance).to.equal(777);
    const unknown = await e!.control.remove("no such reader").then(
      () => undefined,
      (err: Error) => err,
    );
    expect(unknown?.message).to.contain('no reader "no such reader"');
  });

  it("stops the child and pcscd on close()", async () => {
    const pcscdPid = e!.pcscd!.pid!;
    const childPid = e!.pid!;
    await e!.close();
    expect(alive(childPid), "the emulator").to.equal(false);
    expect(alive(pcscdPid), "pcscd").to.equal(false);
    e = undefined;
  });
});

/** Whether a process runs (a zombie does not). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return !stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z");
  } catch {
    return false;
  }
}

async function findRunningPcscd(): Promise<number[]> {
  const { stdout } = await promisify(execFile)("pgrep", ["-x", "pcscd"]).catch(() => ({ stdout: "" }));
  return stdout
    .split("\n")
    .filter(Boolean)
    .map(Number)
    .filter((pid) => alive(pid));
}

describe("netpurse-emulator's command line", function () {
  this.timeout(30_000);

  it("explains itself with --help, and reader-conf with its own --help", async () => {
    const { stdout } = await promisify(execFile)(EMULATOR, ["--help"]);
    for (const o of ["--card FILE", "--psam FILE", "--port-base N", "--pcscd DIR", "reader-conf"]) expect(stdout).to.contain(o);
    const sub = await promisify(execFile)(EMULATOR, ["reader-conf", "--help"]);
    expect(sub.stdout).to.contain("--dir DIR");
  });

  it("refuses to start without a card or PSAM (exit 1), and reader-conf without --dir (exit 2)", async () => {
    const none = await promisify(execFile)(EMULATOR, []).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e,
    );
    expect(none?.code).to.equal(1);
    expect(none?.stderr).to.contain("give at least one --card FILE or --psam FILE");
    const noDir = await promisify(execFile)(EMULATOR, ["reader-conf", "--card", "x.card.json"]).then(
      () => undefined,
      (e: { code: number; stderr: string }) => e,
    );
    expect(noDir?.code).to.equal(2);
    expect(noDir?.stderr).to.contain("--dir DIR is required");
  });

  it("writes a system pcscd's reader configuration with reader-conf: one entry and driver copy per reader, a private folder", async function () {
    if (!(await findProgram("cc"))) skipLoudly(this, "no C compiler (cc) to build the vpcd loopback shim");
    const { dir, cleanup } = await tempDir();
    try {
      const out = join(dir, "conf");
      const { stdout } = await promisify(execFile)(EMULATOR, [
        "reader-conf",
        "--dir",
        out,
        "--card",
        "a.card.json",
        "--psam",
        "p.psam.json",
        "--port-base",
        "40000",
      ]);
      expect(stdout).to.contain('"netpurse card 1 00 00" on vpcd port 40000');
      expect(stdout).to.contain('"netpurse PSAM 1 00 00" on vpcd port 40002');
      expect(stdout).to.contain(`Environment=LD_PRELOAD=${out}/vpcd-loopback.so`);
      const psamEntry = await readFile(join(out, "reader.conf.d/netpurse-1.conf"), "utf8");
      expect(psamEntry).to.contain('FRIENDLYNAME "netpurse PSAM 1"');
      expect(psamEntry).to.contain("DEVICENAME /dev/null:40002");
      expect(psamEntry).to.contain(`LIBPATH ${out}/drivers/netpurse-1.so`);
      expect((await stat(join(out, "drivers/netpurse-0.so"))).size).to.be.greaterThan(0);
      expect((await stat(join(out, "vpcd-loopback.so"))).size).to.be.greaterThan(0);
      expect((await stat(out)).mode & 0o777).to.equal(0o700);
    } finally {
      await cleanup();
    }
  });
});

describe("the virtual card's vpcd link, against a fake vpcd (no pcscd needed)", function () {
  this.timeout(15_000);
  let dir: string;
  let cleanup: () => Promise<void> = async () => {};
  let issuer: Issuer | undefined;
  let cardPath: string;
  let server: Server;
  let sockets: Socket[];
  let card: VirtualCard | undefined;

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir());
    issuer = await makeIssuer(dir);
    cardPath = await makeCard(issuer, dir, { value: 4321 });
    sockets = [];
    server = createServer((s) => sockets.push(s));
    await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
    card = new VirtualCard(await SoftwareCard.open(cardPath), (server.address() as AddressInfo).port, { minBackoffMs: 20, maxBackoffMs: 50 });
    card.insert();
    await waitFor(() => sockets.length === 1, 5_000, "the card to connect");
  });

  afterEach(async () => {
    await card?.remove();
    for (const s of sockets) s.destroy();
    await new Promise((resolve) => server.close(resolve));
    await issuer?.close();
    await cleanup();
  });

  /** Sends raw bytes as vpcd would, and collects the card's answers (payloads), `count` of them. */
  async function exchange(s: Socket, bytes: Buffer[], count: number): Promise<Buffer[]> {
    const frames = new FrameReader(65_535);
    const got: Buffer[] = [];
    const onData = (d: Buffer) => {
      for (const f of frames.push(d)) if (f.kind === "payload") got.push(f.bytes);
    };
    s.on("data", onData);
    try {
      for (const b of bytes) s.write(b);
      await waitFor(() => got.length >= count, 5_000, `${count} answers from the card`);
      // Anything beyond what was expected would show here.
      await new Promise((resolve) => setTimeout(resolve, 50));
      return got;
    } finally {
      s.off("data", onData);
    }
  }

  const command = (hex: string) => vpcdFrame(Buffer.from(hex, "hex"));
  const GET_ATR = vpcdFrame(Buffer.from([0x04]));

  it("answers GET ATR with the card's ATR without resetting it: a session survives vpcd's presence polls", async () => {
    const s = sockets[0]!;
    const [atr, select, , read] = await exchange(s, [GET_ATR, command(SELECT_PURSE), GET_ATR, command(READ_PURSE)], 4);
    expect(atr).to.deep.equal(SoftwareCard.ATR);
    expect(decodeResponse(select!).sw).to.equal(SW.OK);
    const purse = decodeResponse(read!);
    expect(purse.sw).to.equal(SW.OK);
    expect(ReadPurseResponse.decode(purse.data).balance).to.equal(4321);
    // Power on (a reset) does end the session: READ PURSE needs SELECT again.
    const [again] = await exchange(s, [vpcdFrame(Buffer.from([0x01])), command(READ_PURSE)], 1);
    expect(decodeResponse(again!).sw).to.equal(SW.CONDITIONS_NOT_SATISFIED);
  });

  it("answers an oversized frame with 6700 without buffering it, ignores empty frames and unknown controls, and goes on serving", async () => {
    const refused: unknown[] = [];
    card!.on("refused", (d) => refused.push(d));
    const s = sockets[0]!;
    const huge = Buffer.alloc(2 + 65_535, 0xaa);
    huge.writeUInt16BE(65_535, 0);
    const select = command(SELECT_PURSE);
    // The oversized frame in pieces, an empty frame, an unknown control, a 2-byte "APDU", then a real
    // SELECT and READ PURSE sent one byte at a time.
    const pieces = [huge.subarray(0, 1000), huge.subarray(1000), vpcdFrame(Buffer.alloc(0)), vpcdFrame(Buffer.from([0x07])), command("00A4")];
    const bytewise = [...Buffer.concat([select, command(READ_PURSE)])].map((b) => Buffer.from([b]));
    const answers = await exchange(s, [...pieces, ...bytewise], 4);
    expect(answers.map((a) => decodeResponse(a).sw)).to.deep.equal([SW.WRONG_LENGTH, SW.WRONG_LENGTH, SW.OK, SW.OK]);
    expect(ReadPurseResponse.decode(decodeResponse(answers[3]!).data).balance).to.equal(4321);
    expect(refused).to.have.length(3);
    expect(card!.ready).to.equal(true);
  });

  it("reconnects when vpcd drops it, and stays out once removed", async () => {
    const disconnects: unknown[] = [];
    card!.on("disconnect", (d) => disconnects.push(d));
    sockets[0]!.destroy();
    await waitFor(() => sockets.length === 2, 5_000, "the card to reconnect");
    const [atr] = await exchange(sockets[1]!, [GET_ATR], 1);
    expect(atr).to.deep.equal(SoftwareCard.ATR);
    expect(disconnects).to.have.length(1);
    await card!.remove();
    expect(card!.inserted).to.equal(false);
    await new Promise((resolve) => setTimeout(resolve, 300));
    expect(sockets).to.have.length(2);
    card!.insert();
    await waitFor(() => sockets.length === 3, 5_000, "the card inserted again");
  });
});
