// The clearing service alone, in this process, with everything a test needs
// to feed it genuine and forged batches and loads: the issuer, a real
// software card, two real software PSAMs provisioned for two terminal hosts,
// the load server's real security module, clearing's keys and merchant
// registry, and a client under any identity of the installation. Forgeries
// are made the way an attacker holding a given key would make them: the
// PSAM's batch key re-MACs records and trailers, and nothing here signs as
// the card.

import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { ClientError, type Status } from "nice-grpc";
import type { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import {
  ClearingServiceDefinition,
  LoadOutcome,
  LoadProof,
  type BatchTrailer,
  type CardBalance,
  type LoadRecord,
  type SubmitBatchRequest,
} from "../../gen/netpurse/clearing/v1/clearing.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { fieldOf, reasonOf } from "../../lib/grpc/errors.js";
import { psamId as toPsamId, purseId as toPurseId, txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { CertificateAuthority } from "../../lib/pki/authority.js";
import type { Kind } from "../../lib/pki/identity.js";
import { pkiDirOf, type Security } from "../../lib/pki/security.js";
import { InitializeForLoadCommand } from "../../lib/protocol/load.js";
import { batchMac, batchRecordMac, type PsamBatchRecord } from "../../lib/protocol/psam.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import { addClearingMerchant } from "../../services/clearing/merchants.js";
import { startClearing } from "../../services/clearing/server.js";
import type { Issuer } from "../../services/issuer/issuer.js";
import { SoftwareHsm } from "../../services/load/hsm.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { EUR, makeCard, makeIssuer, makePsam, tempDir } from "./fixtures.js";
import { testSecurity, type TestSecurity } from "./network.js";
import { batchRecordMessage } from "../../services/clearing/records.js";

/** terminal-1's PSAM. */
export const PSAM = "c1ea0001";
/** terminal-2's PSAM. */
export const OTHER_PSAM = "c1ea0002";
/** A shop clearing pays, through acq-1. */
export const SHOP = "clear-shop";
/** Another registered merchant: the one an attacker would have paid. */
export const THIEF = "thief-shop";
export const ACQUIRER = "acq-1";
export const BANK = "bank-1";
/** The card's value at personalisation. */
export const OPENING = 10_000;

/** A clearing client under one identity; close() ends its channel. */
export function clearingClient(address: string, security: Security, o: { maxMessageBytes?: number } = {}) {
  const channel = openChannel(address, security.channel({ kind: "clearing" }), o);
  return Object.assign(clientFactory().create(ClearingServiceDefinition, channel), { close: () => channel.close() });
}
export type ClearingClient = ReturnType<typeof clearingClient>;

/**
 * A genuine load, as the load server reports it to clearing: the card's
 * INITIALIZE FOR LOAD, the security module's LOAD command, the card's answer.
 */
export async function genuineLoadRecord(
  reader: PurseReader,
  hsm: SoftwareHsm,
  o: { amount: number; bankId: string; at: Date; transactionId?: string },
): Promise<LoadRecord> {
  const id = o.transactionId ?? randomUUID();
  const authorised = { amount: o.amount, currency: EUR, bankId: o.bankId, dateTime: Math.floor(o.at.getTime() / 1000), transactionRef: id };
  const init = await reader.initializeForLoad(authorised);
  const issued = await hsm.issueLoad(authorised, 2, init.parsed);
  const answer = await reader.load(issued.command);
  return {
    transactionId: txnId(id),
    bankId: o.bankId,
    purseId: { value: init.parsed.purseId },
    amount: money(o.amount, EUR, 2),
    outcome: LoadOutcome.LOAD_OUTCOME_LOADED,
    proof: LoadProof.LOAD_PROOF_S3,
    authorised: InitializeForLoadCommand.encode(authorised),
    initializeResponse: init.raw,
    loadCommand: issued.command,
    loadAnswer: answer.raw,
    settledAt: o.at,
  };
}

/** What a refused call ended with: its status, ErrorInfo reason and named field. */
export interface Refusal {
  code: Status;
  reason: ErrorReason | undefined;
  field: string | undefined;
  details: string;
}

/** The refusal a call ends with; fails the test if the call succeeds, or fails without a gRPC status. */
export async function refusal(p: Promise<unknown>): Promise<Refusal> {
  try {
    await p;
  } catch (e) {
    if (!(e instanceof ClientError)) throw e;
    return { code: e.code, reason: reasonOf(e), field: fieldOf(e), details: e.details };
  }
  throw new Error("expected the call to be refused");
}

export { streamOf as stream } from "../../lib/streams.js";

/** A PSAM's batch record as SubmitBatch carries it. */
export const asMessage = batchRecordMessage;

/** A closed batch as a terminal host holds it: the PSAM's records and the trailer. */
export interface ClosedBatch {
  records: PsamBatchRecord[];
  trailer: BatchTrailer;
}

/** A record without its record MAC: what an attacker with the PSAM's batch key changes and MACs again. */
export function unmaced(r: PsamBatchRecord): Omit<PsamBatchRecord, "recordMac"> {
  const copy: Partial<PsamBatchRecord> = { ...r };
  delete copy.recordMac;
  return copy as Omit<PsamBatchRecord, "recordMac">;
}

/** The messages of a submission: each record, then the trailer. */
export const submission = (b: ClosedBatch): SubmitBatchRequest[] => [
  ...b.records.map((r): SubmitBatchRequest => ({ item: { $case: "record", value: asMessage(r) } })),
  { item: { $case: "trailer", value: b.trailer } },
];

/**
 * A batch made with the PSAM's batch key (a stolen PSAM): every record
 * re-MACed for `batchNumber`, and a trailer whose count and total are the
 * records' and whose MAC verifies. The card signatures are left as they are.
 */
export function forgeBatch(batchKey: Buffer, psamHex: string, batchNumber: number, records: Omit<PsamBatchRecord, "recordMac">[]): ClosedBatch {
  const psamId = Buffer.from(psamHex, "hex");
  const remaced = records.map((r) => ({ ...r, recordMac: batchRecordMac(batchKey, psamId, batchNumber, r) }));
  const total = remaced.reduce((s, r) => s + r.amount, 0);
  return {
    records: remaced,
    trailer: {
      psamId: toPsamId(psamHex),
      batchNumber,
      count: remaced.length,
      total: money(total, EUR, 0),
      batchMac: batchMac(batchKey, { psamId, batchNumber, count: remaced.length, total, currency: EUR }),
      closedAt: new Date(),
    },
  };
}

/** The clearing service with its issuer, card, PSAMs and security module (see the top of this file). */
export async function startClearingBench() {
  const { dir, cleanup } = await tempDir("netpurse-clearing-bench-");
  const issuer: Issuer = await makeIssuer(dir);
  await CertificateAuthority.init(pkiDirOf(dir));
  const security: TestSecurity = await testSecurity(dir);
  const cardPath = await makeCard(issuer, dir, { value: OPENING });
  const psamPaths = {
    [PSAM]: await makePsam(issuer, dir, { psamId: PSAM }),
    [OTHER_PSAM]: await makePsam(issuer, dir, { psamId: OTHER_PSAM, name: "other" }),
  };
  await issuer.assignPsam(PSAM, "terminal-1");
  await issuer.assignPsam(OTHER_PSAM, "terminal-2");
  const registryPath = join(dir, "psams.json");
  await issuer.exportPsamRegistry(registryPath);
  await issuer.exportClearingKeys(join(dir, "clearing", "keys.json"));
  for (const m of [SHOP, THIEF]) {
    await addClearingMerchant(join(dir, "clearing", "merchants.json"), { merchantId: m, name: m, acquirerId: ACQUIRER, currency: EUR, exponent: 2 });
  }
  const hsmPath = join(dir, "hsm.json");
  await issuer.provisionHsm({ path: hsmPath });
  const hsm = await SoftwareHsm.open(hsmPath);

  const clock = { now: new Date("2026-11-29T12:00:00Z") };
  const server = await startClearing({
    security: await security.of("clearing", "clearing-1"),
    listen: "127.0.0.1:0",
    dir: join(dir, "clearing"),
    psamRegistry: registryPath,
    clock: () => clock.now,
  });
  const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(cardPath)));
  await reader.connect();
  const drivers = new Map<string, PsamDriver>();
  for (const [id, path] of Object.entries(psamPaths)) {
    const d = new PsamDriver(new InProcessTransport(await SoftwarePsam.open(path)));
    await d.connect();
    drivers.set(id, d);
  }
  const driver = (id: string) => drivers.get(id) ?? assertNever(`no PSAM ${id} on the bench`);
  const clients: ClearingClient[] = [];

  const bench = {
    dir,
    issuer,
    security,
    registryPath,
    server,
    clock,
    reader,
    /** A clearing client as `kind`/`id` (its certificate issued on first use); closed with the bench. */
    async as(kind: Kind, id: string, o: { maxMessageBytes?: number } = {}): Promise<ClearingClient> {
      const c = clearingClient(server.address, await security.of(kind, id), o);
      clients.push(c);
      return c;
    },
    /** One genuine purchase between the card and a PSAM: the debit ends in the PSAM's open batch. */
    async purchase(amount: number, o: { psam?: string; merchant?: string; transactionRef?: string } = {}): Promise<{ transactionRef: string }> {
      const psam = driver(o.psam ?? PSAM);
      const atr = await reader.connect();
      const init = await reader.initializeForPurchase();
      const transactionRef = o.transactionRef ?? randomUUID();
      const issued = await psam.issueDebitCommand({
        cardAtr: atr,
        initializeResponse: init.raw,
        draw: { amount, currency: EUR, transactionRef, merchantId: o.merchant ?? SHOP },
        returnExpectedSignature: false,
      });
      const debit = await reader.debit(issued.debitCommand);
      const v = await psam.verifyDebit(issued.psamCounter, debit.raw);
      if (v.verdict !== 0) throw new Error(`PSAM ${o.psam ?? PSAM} did not record debit ${issued.psamCounter}`);
      return { transactionRef };
    },
    /** Reads a PSAM's batch and closes it: what its terminal host sends. */
    async closeBatch(psamHex = PSAM): Promise<ClosedBatch> {
      const psam = driver(psamHex);
      const records = await psam.readBatch();
      const c = await psam.closeBatch();
      return {
        records,
        trailer: {
          psamId: toPsamId(psamHex),
          batchNumber: c.batchNumber,
          count: c.count,
          total: money(c.total, c.currency, 0),
          batchMac: c.batchMac,
          closedAt: clock.now,
        },
      };
    },
    /** One genuine load made by the card and the load server's security module, as the load server reports it. */
    genuineLoad(amount: number, o: { transactionId?: string } = {}): Promise<LoadRecord> {
      return genuineLoadRecord(reader, hsm, { amount, bankId: BANK, at: clock.now, ...o });
    },
    /** The card's balance now, in minor units. */
    balance: async () => (await reader.readPurse()).balance,
    /** The card as the audit takes it: read from the card, with its opening value. */
    async cardAtHand(): Promise<CardBalance> {
      const p = await reader.readPurse();
      return { purseId: toPurseId(p.purseId.toString("hex")), balance: money(p.balance, EUR, 2), openingValue: money(OPENING, EUR, 2) };
    },
    async close(): Promise<void> {
      for (const c of clients) c.close();
      await server.close();
      await issuer.close();
      await cleanup();
    },
  };
  return bench;
}

export type ClearingBench = Awaited<ReturnType<typeof startClearingBench>>;

function assertNever(message: string): never {
  throw new Error(message);
}
