// What the property-based clearing invariant needs beside the in-process
// network (test/support/network.ts): clearing and the load server restarted
// on their addresses and data, terminal hosts whose batches pass through a
// relay that keeps a copy of each submission clearing acknowledged (so the
// test can send one again as a host would after a crash), a client journal
// that drops a purchase at any step, and the wait for every outbox to reach
// clearing.

import type { Channel } from "nice-grpc";
import { Status, type CallContext } from "nice-grpc";
import { ClearingServiceDefinition, type SubmitBatchRequest, type SubmitBatchResponse } from "../../gen/netpurse/clearing/v1/clearing.js";
import type { Receipt } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { Sealed } from "../../gen/netpurse/card/v1/card.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";
import { NetpurseError, passOn } from "../../lib/grpc/errors.js";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { peerOf } from "../../lib/grpc/server.js";
import { streamOf } from "../../lib/streams.js";
import { SqliteJournal } from "../../client/daemon/journal.js";
import type { DebitSent } from "../../client/purchase.js";
import { startClearing } from "../../services/clearing/server.js";
import { startLoadServer } from "../../services/load/server.js";
import { CLEARING_ID, psamRegistryPath } from "../../services/network/pki.js";
import type { TerminalConfig } from "../../services/terminal/server.js";
import { restartHost, standInClearing } from "./batches.js";
import { FAST_REPORTING } from "./load-clearing.js";
import { Crash } from "./load.js";
import { waitFor, type Network } from "./network.js";

/** The load server's reporting, short enough that a load reaches clearing within a second after an outage. */

/** The terminal hosts' batch submitter, retrying within half a second after clearing was away. */
export const FAST_SUBMITTER: TerminalConfig["submitter"] = { deadlineMs: 5_000, retryMinMs: 50, retryMaxMs: 500 };

/** Stops clearing and starts it again on its address, with its data; `net.clearingServer` is the new one (the caller closes it at the end). */
export async function restartClearing(net: Network): Promise<void> {
  const address = net.clearingServer.address;
  await net.clearingServer.close();
  net.clearingServer = await startClearing({
    security: await net.security.of("clearing", CLEARING_ID),
    listen: address,
    dir: net.paths.clearing,
    psamRegistry: psamRegistryPath(net.data),
  });
}

/** Stops the load server and starts it again on its address and data, reporting to clearing with FAST_REPORTING. */
export async function restartLoadServer(net: Network): Promise<void> {
  const address = net.load.address;
  await net.load.close();
  net.load = await startLoadServer({
    security: await net.security.of("load", "load-1"),
    listen: address,
    dir: net.paths.load,
    clearing: net.clearingServer.address,
    reporting: FAST_REPORTING,
  });
}

/** A batch submission as a terminal host sent it, and clearing's first answer to it. */
export interface CapturedSubmission {
  terminalId: string;
  messages: SubmitBatchRequest[];
  ack: SubmitBatchResponse;
}

/**
 * A relay in front of clearing for the terminal hosts: it serves
 * ClearingService with clearing's own certificate, passes each SubmitBatch on
 * to clearing under the certificate of the terminal that sent it (so clearing
 * checks that terminal's PSAMs as it would directly), answers what clearing
 * answered or its error, and keeps each acknowledged submission whole.
 * Its other RPCs are UNIMPLEMENTED: only terminal hosts call it.
 */
export async function startBatchRelay(net: Network) {
  const clearingAddress = net.clearingServer.address;
  const captured: CapturedSubmission[] = [];
  const channels = new Map<string, Channel>();
  const factory = clientFactory();
  const asTerminal = async (terminalId: string) => {
    let channel = channels.get(terminalId);
    if (!channel) {
      channel = openChannel(clearingAddress, (await net.security.of("terminal", terminalId)).channel({ kind: "clearing" }));
      channels.set(terminalId, channel);
    }
    return factory.create(ClearingServiceDefinition, channel);
  };
  const server = await standInClearing(
    await net.security.of("clearing", CLEARING_ID),
    async (requests: AsyncIterable<SubmitBatchRequest>, context: CallContext): Promise<SubmitBatchResponse> => {
      const peer = peerOf(context);
      // The access rule admits terminal hosts only; their id is what their certificate proves.
      if (!peer.proven) throw new NetpurseError(Status.UNAUTHENTICATED, ErrorReason.ERROR_REASON_UNAUTHENTICATED, "a terminal certificate is needed");
      const messages: SubmitBatchRequest[] = [];
      for await (const m of requests) messages.push(m);
      const clearing = await asTerminal(peer.id);
      let ack: SubmitBatchResponse;
      try {
        ack = await clearing.submitBatch(streamOf(messages), { signal: context.signal });
      } catch (e) {
        passOn(e, "clearing");
      }
      captured.push({ terminalId: peer.id, messages, ack });
      return ack;
    },
    "batch relay",
  );
  return {
    address: server.address,
    /** Every submission clearing acknowledged, in the order of the acknowledgements. */
    captured,
    /** Sends a captured submission to clearing again, as its terminal host would after a crash before it stored the acknowledgement. */
    async resend(s: CapturedSubmission): Promise<SubmitBatchResponse> {
      return (await asTerminal(s.terminalId)).submitBatch(streamOf(s.messages));
    },
    async close() {
      await server.shutdown();
      for (const c of channels.values()) c.close();
    },
  };
}

export type BatchRelay = Awaited<ReturnType<typeof startBatchRelay>>;

/** Restarts terminal host `id` sending its batches through `relay`, with FAST_SUBMITTER, and waits until the payment server sees its PSAMs again. */
export const restartTerminal = (net: Network, id: string, relay: BatchRelay) =>
  restartHost(net, id, { clearingAddress: relay.address, submitter: FAST_SUBMITTER });

/** The steps of the client's purchase journal a client may die after ("beforeCardAnswered": the card debited, its answer not yet journaled). */
export type PurchaseStep = "started" | "debitSent" | "beforeCardAnswered" | "cardAnswered" | "confirmed" | "receipt";
export const PURCHASE_STEPS: PurchaseStep[] = ["started", "debitSent", "beforeCardAnswered", "cardAnswered", "confirmed", "receipt"];

/** The client's purchase journal, which crashes the purchase once, at the step `crashAfter`. */
export class CrashingPurchaseJournal extends SqliteJournal {
  crashAfter: PurchaseStep | undefined;

  private crash(step: PurchaseStep) {
    if (this.crashAfter !== step) return;
    this.crashAfter = undefined;
    throw new Crash(`crashed after ${step}`);
  }
  override async started(...a: Parameters<SqliteJournal["started"]>) {
    await super.started(...a);
    this.crash("started");
  }
  override async debitSent(id: string, d: DebitSent) {
    await super.debitSent(id, d);
    this.crash("debitSent");
  }
  override async cardAnswered(id: string, sw: number, raw: Buffer) {
    this.crash("beforeCardAnswered");
    await super.cardAnswered(id, sw, raw);
    this.crash("cardAnswered");
  }
  override async confirmed(id: string, resultM: Sealed) {
    await super.confirmed(id, resultM);
    this.crash("confirmed");
  }
  override async receipt(id: string, r: Receipt, secret: Uint8Array) {
    await super.receipt(id, r, secret);
    this.crash("receipt");
  }
}

/** What is still on its way to clearing: closed batches in the terminal hosts' outboxes, settled loads in the load server's. */
export async function notYetAtClearing(net: Network): Promise<string[]> {
  const left: string[] = [];
  for (const [id, h] of net.hosts) {
    for (const b of await h.host.data.outbox())
      left.push(`${id} batch ${b.batch_number} of PSAM ${b.psam_id} (attempts ${b.attempts}, ${b.last_error || "no error"})`);
  }
  for (const r of await net.load.store.clearingReports()) {
    if (!r.reported_at && !r.refused_at) left.push(`load ${r.transaction_id} (attempts ${r.attempts}, ${r.last_error ?? "no error"})`);
  }
  return left;
}

/** Waits until every closed batch and every settled load has been acknowledged by clearing; fails naming what is left. */
export async function untilAllAtClearing(net: Network, timeoutMs = 30_000): Promise<void> {
  await waitFor(async () => (await notYetAtClearing(net)).length === 0, timeoutMs, "the outboxes to empty").catch(async () => {
    throw new Error(`after ${timeoutMs} ms these have not reached clearing: ${(await notYetAtClearing(net)).join("; ")}`);
  });
}
