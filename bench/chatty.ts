// The chatty baseline's run at one delay: a fresh data folder (issuer keys,
// the PSAMs, a card per cardholder), the remote reader server as its own
// process, and cardholders in this process whose cards it drives through the
// same delay proxy the modes' payment traffic goes through.

import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { SoftwareCard } from "../client/card/software-card.js";
import { InProcessTransport, type CardTransport } from "../lib/apdu/transport.js";
import { AsyncQueue } from "../lib/async-queue.js";
import { clientFactory, DEFAULT_DEADLINE_MS, openChannel } from "../lib/grpc/client.js";
import { Issuer } from "../services/issuer/issuer.js";
import { DEMO_SHOP, EUR, paths } from "../services/network/layout.js";
import { Launcher } from "../services/network/launcher.js";
import { DelayProxy } from "./delay-proxy.js";
import { stopOnInterrupt } from "./interrupt.js";
import { closedLoop } from "./load.js";
import type { ModeResult, ModesSettings } from "./modes.js";
import { logFindings, personaliseCardholderCards, SERVICE_ENV } from "./network.js";
import { peakMemoryMiB } from "./proc.js";
import { SONG } from "./purchases.js";
import { holdStats, WallClockWindow, type HoldSample } from "./service-records.js";
import { RemoteReaderDefinition, type HoldLog } from "./remote-reader.js";

/** The name of the baseline's rows. */
export const CHATTY = "chatty remote reader";

const REMOTE_READER_SERVER = "bench/remote-reader-server.ts";
export const REMOTE_READER_PROCESS = "remote-reader";

/** A whole purchase on one stream: as long as payOffer's two calls to the payment server may take together. */
const PURCHASE_DEADLINE_MS = 2 * DEFAULT_DEADLINE_MS;

type RemoteReaderClient = Client<typeof RemoteReaderDefinition, DeadlineOptions>;

/** Card APDUs and stream messages over the network, per successful purchase. */
class ExchangeCount {
  purchases = 0;
  roundTrips = 0;
  messages = 0;

  add(roundTrips: number, messages: number): void {
    this.purchases++;
    this.roundTrips += roundTrips;
    this.messages += messages;
  }
}

export async function measureChatty(delayMs: number, s: ModesSettings): Promise<ModeResult> {
  const label = `${CHATTY}, ${delayMs} ms each way`;
  process.stderr.write(`[${label}] setting up a data folder and starting the remote reader\n`);
  const dir = await mkdtemp(join(tmpdir(), `netpurse-bench-chatty-p${s.psams}-c${s.cardholders}-`));
  const logDir = join(dir, "logs");
  const launcher = new Launcher(logDir, { env: SERVICE_ENV });
  const proxy = await DelayProxy.fork(delayMs);
  const tidy = async () => {
    await launcher.stopAll();
    await proxy.close();
    if (!s.keepData) await rm(dir, { recursive: true, force: true });
  };
  const forget = stopOnInterrupt(tidy);
  try {
    const psamDir = await provisionPsams(dir, s.psams); // creates the issuer keys the cards are personalised with
    const cards = await Promise.all((await personaliseCardholderCards(dir, s.cardholders)).map((path) => SoftwareCard.open(path)));
    const server = await startRemoteReader(launcher, psamDir);
    proxy.forwardTo(server.address);
    const delayed = openChannel(proxy.address, { insecure: true });
    const direct = openChannel(server.address, { insecure: true });
    try {
      const reader: RemoteReaderClient = clientFactory().create(RemoteReaderDefinition, delayed);
      const transports = cards.map((card) => new InProcessTransport(card));
      const count = new ExchangeCount();
      const window = new WallClockWindow();
      const load = await closedLoop({
        label,
        workers: s.cardholders,
        phases: s.phases,
        operation: (w) => buyChatty(reader, transports[w]!, count),
        window,
        settle: true,
      });
      const log = await readHoldLog(clientFactory().create(RemoteReaderDefinition, direct));
      const peak = peakMemoryMiB(server.child.pid!); // before stopping: /proc forgets a process once it exits
      await launcher.stopAll();
      const traffic = await proxy.stats();
      return {
        approach: CHATTY,
        delayMs,
        psams: s.psams,
        cardholders: s.cardholders,
        ...load,
        purchasesCounted: count.purchases,
        roundTrips: { onPath: count.roundTrips / count.purchases, after: 0 },
        messages: count.messages / count.purchases,
        bytesPerPurchase: (traffic.bytesUp + traffic.bytesDown) / count.purchases,
        proxy: traffic,
        psamHold: holdStats(log.holds, window.openedAt, window.closedAt),
        ...(peak !== undefined ? { serverPeakMemoryMiB: peak } : {}),
        backgroundFailures: 0,
        remoteReaderFailures: log.failures,
        serviceLogs: await logFindings(logDir),
        ...(s.keepData ? { dataDir: dir } : {}),
      };
    } finally {
      delayed.close();
      direct.close();
    }
  } finally {
    forget();
    await tidy();
  }
}

/** The remote reader server process, selling the song with the PSAMs in `psamDir`. */
function startRemoteReader(launcher: Launcher, psamDir: string) {
  return launcher.start(REMOTE_READER_PROCESS, REMOTE_READER_SERVER, [
    ...["--listen", "127.0.0.1:0", "--psams", psamDir],
    ...["--amount-minor", String(SONG.priceMinor), "--merchant", DEMO_SHOP.merchantId],
  ]);
}

/** Issuer keys and `count` software PSAMs in DATA/psams, provisioned by the issuer tools as the demo network's are. */
async function provisionPsams(dir: string, count: number): Promise<string> {
  await Issuer.createKeys(paths(dir).issuer, 1);
  const issuer = await Issuer.open(paths(dir).issuer);
  try {
    const psamDir = join(dir, "psams");
    for (let i = 0; i < count; i++) await issuer.provisionPsam({ path: join(psamDir, `psam-${i}.psam.json`), currency: EUR });
    return psamDir;
  } finally {
    await issuer.close();
  }
}

/**
 * One purchase as a remote reader makes it: the card goes in (its ATR goes
 * up the stream), then every command the server sends is one round trip to
 * the card and back. The stream ends when the server has verified the debit.
 */
async function buyChatty(reader: RemoteReaderClient, card: CardTransport, count: ExchangeCount): Promise<number> {
  const started = performance.now();
  const up = new AsyncQueue<Uint8Array>();
  const send = (message: Uint8Array) => (up.push(message), sent++);
  let sent = 0;
  let received = 0;
  send(await card.reset());
  try {
    for await (const command of reader.purchase(up, { deadline: PURCHASE_DEADLINE_MS })) {
      received++;
      send(await card.transmit(Buffer.from(command)));
    }
  } finally {
    up.close();
  }
  const ms = performance.now() - started;
  count.add(received, sent + received); // each command the server sends is one round trip to the card
  return ms;
}

async function readHoldLog(reader: RemoteReaderClient): Promise<{ holds: HoldSample[]; failures: Record<string, number> }> {
  const log = JSON.parse(Buffer.from(await reader.readHolds(new Uint8Array(), { deadline: DEFAULT_DEADLINE_MS })).toString("utf8")) as HoldLog;
  return { holds: log.holds.map(([releasedAt, heldMs]) => ({ releasedAt, heldMs })), failures: log.failures };
}
