// Terminal hosts that misbehave, for the tests of PSAM verdicts: each speaks
// AttachTerminal to the real concentrator like a terminal host (hello with
// its slots, pongs, one result per job) but decides its answers itself.
//   - A rogue host: a compromised terminal host. It announces its PSAMs (new
//     ids, so the pool picks them first) but never asks them: it answers
//     every job "DEBIT command issued", "RECORDED" or "reversed", with the
//     expected card signature of its choosing and made-up MACs.
//   - A tampering host: real software PSAMs answer its jobs, and it flips one
//     bit in the PSAM's MAC of the answers it is told to.

import { randomBytes } from "node:crypto";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { ApduError } from "../../lib/apdu/apdu.js";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { AsyncQueue } from "../../lib/async-queue.js";
import { psamId as toPsamId, hexOf, txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import { DebitCommand, DebitResponse } from "../../lib/protocol/purse.js";
import {
  DebitVerdict,
  PsamJobStatus,
  PsamSlotState,
  type AttachTerminalRequest,
  type PsamJob,
  type PsamJobResult,
  type PsamSlot,
  type TerminalConcentratorServiceDefinition,
} from "../../gen/netpurse/terminal/v1/terminal.js";
import { PsamDriver } from "../../services/terminal/psam/psam-driver.js";
import { SoftwarePsam } from "../../services/terminal/psam/software-psam.js";
import { waitFor } from "./network.js";

type ConcentratorClient = Client<typeof TerminalConcentratorServiceDefinition, DeadlineOptions>;

/** What a test terminal puts in a job's result besides the job's own ids. */
export type Answer = Pick<PsamJobResult, "status" | "statusWord" | "message" | "slot" | "outcome">;

/** A terminal host played by the test: it attaches, answers pings, and answers every job with `answer`. */
export class TestTerminal {
  /** Every job it was sent, oldest first. */
  readonly jobs: PsamJob[] = [];
  private out: AsyncQueue<AttachTerminalRequest> | undefined;
  private abort = new AbortController();

  constructor(
    private readonly client: ConcentratorClient,
    readonly terminalId: string,
    private readonly slots: () => Promise<PsamSlot[]>,
    private readonly answer: (job: PsamJob) => Promise<Answer>,
  ) {}

  /** Attaches (again), announcing its slots as they are now; resolves once welcomed, rejects if the concentrator ends the stream first. */
  async attach(): Promise<void> {
    this.detach();
    this.abort = new AbortController();
    const out = new AsyncQueue<AttachTerminalRequest>();
    this.out = out;
    out.push({ message: { $case: "hello", value: { terminalId: this.terminalId, window: 8, slots: await this.slots() } } });
    let welcomed = false;
    let ended: unknown;
    const stream = this.client.attachTerminal(out, { signal: this.abort.signal });
    const run = async () => {
      for await (const m of stream) {
        const msg = m.message;
        if (msg?.$case === "welcome") welcomed = true;
        else if (msg?.$case === "ping") out.push({ message: { $case: "pong", value: { nonce: msg.value.nonce } } });
        else if (msg?.$case === "job") this.handle(out, msg.value);
      }
    };
    // Ends when the test detaches it, the concentrator refuses it, or the network stops.
    run()
      .catch((e: unknown) => (ended = e ?? "ended"))
      .finally(() => {
        ended ??= "ended";
        out.close();
      });
    await waitFor(() => welcomed || ended !== undefined, 5_000, `terminal ${this.terminalId} to be welcomed`);
    if (!welcomed) throw new Error(`terminal ${this.terminalId} was not welcomed: ${String(ended)}`);
  }

  private handle(out: AsyncQueue<AttachTerminalRequest>, job: PsamJob): void {
    this.jobs.push(job);
    const base = { jobId: job.jobId, terminalId: this.terminalId, psamId: job.psamId };
    this.answer(job).then(
      (a) => out.push({ message: { $case: "result", value: { ...base, ...a } } }),
      (e: unknown) =>
        out.push({
          message: {
            $case: "result",
            value: { ...base, status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_FAILED, statusWord: 0, message: String(e), slot: undefined, outcome: undefined },
          },
        }),
    );
  }

  /** Jobs of one kind it was sent. */
  jobsOf(kind: NonNullable<PsamJob["task"]>["$case"]): PsamJob[] {
    return this.jobs.filter((j) => j.task?.$case === kind);
  }

  /** Ends its stream: the concentrator detaches it. */
  detach(): void {
    this.out?.close();
    this.abort.abort();
  }
}

/** A slot as a terminal host announces it. */
function slot(index: number, id: string, o: Partial<PsamSlot> = {}): PsamSlot {
  return {
    slot: index,
    psamId: toPsamId(id),
    keyVersions: [1],
    currencies: [978],
    state: PsamSlotState.PSAM_SLOT_STATE_READY,
    psamCounter: 0,
    pendingDebits: [],
    batchCount: 0,
    reader: "",
    ...o,
  };
}

const ok = (outcome: PsamJobResult["outcome"]): Answer => ({
  status: PsamJobStatus.PSAM_JOB_STATUS_OK,
  statusWord: 0x9000,
  message: "",
  slot: undefined,
  outcome,
});

/**
 * A compromised terminal host: it announces the PSAMs `psamIds` but never
 * asks them; every job is answered as done, with `expectedSignature` as the
 * card signature "the PSAM" expects and random bytes for every MAC.
 */
export function rogueTerminal(client: ConcentratorClient, o: { terminalId: string; psamIds: string[]; expectedSignature: Buffer }) {
  const ids = o.psamIds;
  let counter = 0;
  const answer = async (job: PsamJob): Promise<Answer> => {
    const task = job.task;
    switch (task?.$case) {
      case "issueDebitCommand": {
        const psamCounter = ++counter;
        const debitCommand = DebitCommand.encode({
          amount: Number(task.value.amount?.amountMinor ?? 0n),
          currency: task.value.amount?.currency ?? 978,
          psamId: Buffer.from(hexOf(job.psamId?.value), "hex"),
          psamCounter,
          dateTime: Math.floor(Date.now() / 1000),
          transactionRef: job.transactionId?.value ?? "00000000-0000-0000-0000-000000000000",
          psamSignature: randomBytes(8),
        });
        return ok({
          $case: "debitCommandIssued",
          value: {
            debitCommand,
            psamCounter,
            expectedCardSignature: task.value.returnExpectedSignature ? o.expectedSignature : Buffer.alloc(0),
            issuedMac: randomBytes(8),
          },
        });
      }
      case "verifyDebit": {
        const a = DebitResponse.decode(task.value.debitResponse);
        return ok({
          $case: "debitVerified",
          value: {
            verdict: DebitVerdict.DEBIT_VERDICT_RECORDED,
            recordMac: randomBytes(8),
            batchNumber: 1,
            newBalance: money(a.balance, 978, 0),
            cardResult: 0,
            verdictMac: randomBytes(8),
          },
        });
      }
      case "reverseDebit":
        return ok({ $case: "debitReversed", value: { psamCounter: task.value.psamCounter, reversalMac: randomBytes(8) } });
      default:
        return { status: PsamJobStatus.PSAM_JOB_STATUS_INVALID, statusWord: 0, message: "no task", slot: undefined, outcome: undefined };
    }
  };
  const terminal = new TestTerminal(client, o.terminalId, async () => ids.map((id, i) => slot(i, id)), answer);
  return { terminal, psamIds: ids };
}

/** How many answers of each kind get one bit of the PSAM's MAC flipped (Infinity: all of them). */
export interface Flips {
  issued: number;
  verdict: number;
  reversal: number;
}

/** A MAC with its first bit flipped. */
export function flipped(mac: Uint8Array): Buffer {
  const b = Buffer.from(mac);
  b.writeUInt8(b.readUInt8(0) ^ 0x01, 0);
  return b;
}

/**
 * A terminal host whose genuine software PSAMs (the files given) answer
 * every job, and which flips one bit of the PSAM's MAC in the answers
 * `flips` says, as a tampering host or concentrator in between would.
 */
export async function tamperingTerminal(client: ConcentratorClient, o: { terminalId: string; psamFiles: string[]; flips: Flips }) {
  const psams = await Promise.all(
    o.psamFiles.map(async (f) => {
      const psam = await SoftwarePsam.open(f);
      const driver = new PsamDriver(new InProcessTransport(psam));
      await driver.connect();
      return { psam, driver };
    }),
  );
  const slotOf = async (i: number): Promise<PsamSlot> => {
    const p = psams[i];
    if (!p) throw new Error(`no PSAM in slot ${i}`);
    const { psam, driver } = p;
    const st = await driver.readStatus();
    const pending = await driver.readPending();
    return slot(i, psam.psamId, {
      psamCounter: st.psamCounter,
      batchCount: st.batchCount,
      pendingDebits: pending.map((p) => ({
        psamCounter: p.psamCounter,
        transactionId: txnId(p.transactionRef),
        amount: money(p.amount, p.currency, 0),
        paymentServerId: "",
      })),
    });
  };
  const take = (kind: keyof Flips): boolean => {
    if (o.flips[kind] <= 0) return false;
    o.flips[kind]--;
    return true;
  };
  const answer = async (job: PsamJob): Promise<Answer> => {
    const i = psams.findIndex((p) => p.psam.psamId === hexOf(job.psamId?.value));
    const p = psams[i];
    if (!p) return { status: PsamJobStatus.PSAM_JOB_STATUS_NO_SUCH_PSAM, statusWord: 0, message: "no such PSAM", slot: undefined, outcome: undefined };
    const task = job.task;
    try {
      let outcome: PsamJobResult["outcome"];
      switch (task?.$case) {
        case "issueDebitCommand": {
          const t = task.value;
          const issued = await p.driver.issueDebitCommand({
            cardAtr: Buffer.from(t.cardAtr),
            initializeResponse: Buffer.from(t.initializeResponse),
            draw: {
              amount: Number(t.amount?.amountMinor ?? 0n),
              currency: t.amount?.currency ?? 0,
              transactionRef: job.transactionId?.value ?? "",
              merchantId: t.merchantId?.value ?? "",
            },
            returnExpectedSignature: t.returnExpectedSignature,
          });
          outcome = {
            $case: "debitCommandIssued",
            value: {
              debitCommand: issued.debitCommand,
              psamCounter: issued.psamCounter,
              expectedCardSignature: issued.expectedCardSignature ?? Buffer.alloc(0),
              issuedMac: take("issued") ? flipped(issued.issuedMac) : issued.issuedMac,
            },
          };
          break;
        }
        case "verifyDebit": {
          const v = await p.driver.verifyDebit(task.value.psamCounter, Buffer.from(task.value.debitResponse));
          const a = DebitResponse.decode(task.value.debitResponse);
          outcome = {
            $case: "debitVerified",
            value: {
              verdict: v.verdict === 0 ? DebitVerdict.DEBIT_VERDICT_RECORDED : DebitVerdict.DEBIT_VERDICT_DECLINED_BY_CARD,
              recordMac: v.recordMac,
              batchNumber: v.batchNumber,
              newBalance: money(a.balance, 978, 0),
              cardResult: a.result,
              verdictMac: take("verdict") ? flipped(v.verdictMac) : v.verdictMac,
            },
          };
          break;
        }
        case "reverseDebit": {
          const mac = await p.driver.reverseDebit(task.value.psamCounter);
          outcome = { $case: "debitReversed", value: { psamCounter: task.value.psamCounter, reversalMac: take("reversal") ? flipped(mac) : mac } };
          break;
        }
        default:
          return { status: PsamJobStatus.PSAM_JOB_STATUS_INVALID, statusWord: 0, message: "no task", slot: undefined, outcome: undefined };
      }
      return { ...ok(outcome), slot: await slotOf(i) };
    } catch (e) {
      if (!(e instanceof ApduError)) throw e;
      return { status: PsamJobStatus.PSAM_JOB_STATUS_PSAM_REFUSED, statusWord: e.sw, message: e.message, slot: await slotOf(i), outcome: undefined };
    }
  };
  const terminal = new TestTerminal(client, o.terminalId, () => Promise.all(psams.map((_, i) => slotOf(i))), answer);
  return { terminal, psamIds: psams.map((p) => p.psam.psamId) };
}
