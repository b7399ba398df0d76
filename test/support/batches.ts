// Fixtures for the tests of batch submission: genuine debits recorded straight
// into a PSAM's batch (a card and the PSAM driven in the test's process, as
// the client daemon and a terminal host would), a terminal host restarted
// with the batch options a test needs, and a clearing service that takes a
// batch and never answers.

import { randomUUID } from "node:crypto";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { ServerError, Status } from "nice-grpc";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import {
  ClearingServiceDefinition,
  type ClearingServiceImplementation,
  type SubmitBatchRequest,
  type SubmitBatchResponse,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { Issuer } from "../../services/issuer/issuer.js";
import { paths } from "../../services/network/layout.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { startTerminalHost, type TerminalConfig } from "../../services/terminal/server.js";
import { EUR } from "./fixtures.js";
import { waitFor, type Network } from "./network.js";

/** The file of PSAM `index` of a terminal host, as ensureDemoData provisions it. */
export const psamFileOf = (data: string, terminalId: string, index = 0) => join(paths(data).terminal(terminalId), "psams", `psam-${index}.psam.json`);

/** A new card from the data folder's issuer, holding `value` minor units of EUR. */
export async function issueCard(data: string, name: string, value = 50_000): Promise<string> {
  const issuer = await Issuer.open(paths(data).issuer);
  try {
    const path = join(paths(data).cards, `${name}.card.json`);
    await issuer.personaliseCard({ path, currency: EUR, exponent: 2, initialValue: value, maxBalance: 100_000, expiry: "2099-12-31" });
    return path;
  } finally {
    await issuer.close();
  }
}

/**
 * Pays `amounts` to `merchantId` with the card at `cardPath` through the PSAM
 * in `psamFile`: each debit signed by the PSAM, made and signed by the card,
 * verified and recorded in the PSAM's batch. `currency` (default EUR) is the
 * PSAM's: a programme code redeems points from the card's purse of that
 * programme through the programme's PSAM. The PSAM's file must not be in use
 * by a running terminal host.
 */
export async function recordDebits(p: { psamFile: string; cardPath: string; merchantId: string; amounts: number[]; currency?: number }) {
  const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(p.cardPath)));
  const atr = await reader.connect();
  const driver = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(p.psamFile)));
  await driver.connect();
  const debits: { transactionRef: string; amount: number; psamCounter: number }[] = [];
  for (const amount of p.amounts) {
    const init = await reader.initializeForPurchase(p.currency);
    const transactionRef = randomUUID();
    const issued = await driver.issueDebitCommand({
      cardAtr: atr,
      initializeResponse: init.raw,
      draw: { amount, currency: p.currency ?? EUR, transactionRef, merchantId: p.merchantId },
      returnExpectedSignature: false,
    });
    const answer = await reader.debit(issued.debitCommand);
    const v = await driver.verifyDebit(issued.psamCounter, answer.raw);
    if (v.verdict !== 0) throw new Error(`the PSAM did not record debit ${issued.psamCounter}`);
    debits.push({ transactionRef, amount, psamCounter: issued.psamCounter });
  }
  return debits;
}

/**
 * Replaces the network's terminal host `id` with one started with `options`
 * (batch closing, clearing's address, the submitter's timing), and waits
 * until the payment server sees its PSAMs again. The network's close() stops it.
 */
export async function restartHost(net: Network, id: string, options: Partial<TerminalConfig>) {
  await stopHost(net, id);
  const psams = net.payment.pool.counts().total + (await psamFilesOf(net, id));
  const h = await startTerminalHost({
    security: await net.security.of("terminal", id),
    terminalId: id,
    concentrator: net.concentrator.address,
    dir: net.paths.terminal(id),
    ...options,
  });
  net.hosts.set(id, h);
  await h.host.whenConnected();
  await waitFor(() => net.payment.pool.counts().total === psams, 10_000, `the payment server to see terminal ${id}'s PSAMs again`);
  return h;
}

/** Stops the network's terminal host `id`, if it runs, and waits until the payment server no longer counts its PSAMs. */
export async function stopHost(net: Network, id: string): Promise<void> {
  const h = net.hosts.get(id);
  if (!h) return;
  const left = net.payment.pool.counts().total - (await psamFilesOf(net, id));
  await h.close();
  net.hosts.delete(id);
  await waitFor(() => net.payment.pool.counts().total === left, 5_000, `the payment server to see terminal ${id} go`);
}

const psamFilesOf = async (net: Network, id: string) => (await readdir(join(net.paths.terminal(id), "psams"))).filter((n) => n.endsWith(".psam.json")).length;

/**
 * A stand-in for the clearing service: a real gRPC server with a clearing
 * certificate, open to terminal hosts, serving SubmitBatch as given; its
 * other RPCs are UNIMPLEMENTED.
 */
export async function standInClearing(security: Security, submitBatch: ClearingServiceImplementation["submitBatch"], name: string) {
  const unimplemented = async (): Promise<never> => {
    throw new ServerError(Status.UNIMPLEMENTED, `${name} serves SubmitBatch only`);
  };
  const impl: ClearingServiceImplementation = {
    submitBatch,
    submitLoads: unimplemented,
    getSettlement: unimplemented,
    closeSettlementDay: unimplemented,
    getMerchantStatement: unimplemented,
    getBatch: unimplemented,
    listQuarantined: unimplemented,
    runAudit: unimplemented,
  };
  return startGrpcServer({
    address: "127.0.0.1:0",
    services: [service(ClearingServiceDefinition, impl, { all: ["terminal"] })],
    transport: security.server("require"),
    log: createLogger(name),
  });
}

/** A stand-in clearing whose SubmitBatch reads the whole batch and answers what `answer` makes of it (or throws). */
export async function fakeClearing(security: Security, answer: (batch: SubmitBatchRequest[]) => Promise<SubmitBatchResponse>) {
  const received: SubmitBatchRequest[][] = [];
  const server = await standInClearing(
    security,
    async (requests): Promise<SubmitBatchResponse> => {
      const batch: SubmitBatchRequest[] = [];
      received.push(batch);
      for await (const m of requests) batch.push(m);
      return answer(batch);
    },
    "fake clearing",
  );
  return {
    address: server.address,
    /** Each submission's messages, as they arrived. */
    received,
    close: () => server.shutdown(),
  };
}

/** The trailer of a submission as a fake clearing service received it. */
export const trailerOf = (batch: SubmitBatchRequest[]) => {
  const last = batch.at(-1)?.item;
  return last?.$case === "trailer" ? last.value : undefined;
};

/** A clearing service that reads each batch and then answers nothing until closed (then UNAVAILABLE): one too slow to answer. */
export async function stalledClearing(security: Security) {
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  const fake = await fakeClearing(security, async () => {
    await released;
    throw new ServerError(Status.UNAVAILABLE, "clearing is stopping");
  });
  return {
    ...fake,
    async close() {
      release();
      await fake.close();
    },
  };
}
