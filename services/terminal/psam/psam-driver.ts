// The terminal host's side of the PSAM protocol: the commands of docs/apdu.md
// sent through a CardTransport, so a software PSAM and a PSAM in a PC/SC
// reader are driven alike.

import { ApduError, selectCommand, SW, type CommandApdu } from "../../../lib/apdu/apdu.js";
import { exchange, type CardTransport } from "../../../lib/apdu/transport.js";
import {
  BatchRecord,
  CloseBatchResponse,
  DRAW_P1_RETURN_EXPECTED_SIGNATURE,
  DrawAmountCommand,
  DrawAmountResponse,
  DrawAmountResponseWithSignature,
  PendingDebitRecord,
  PSAM_AID,
  PSAM_CLA,
  PsamIns,
  PsamStatusResponse,
  ReverseDebitCommand,
  ReverseDebitResponse,
  VerifyDebitCommand,
  VerifyDebitResponse,
  type DrawAmount,
  type PsamBatchRecord,
  type PsamStatus,
} from "../../../lib/protocol/psam.js";
import { DebitCommand } from "../../../lib/protocol/purse.js";
import { LayoutError } from "../../../lib/protocol/layout.js";

function cmd(ins: number, data: Buffer = Buffer.alloc(0), p1 = 0, p2 = 0): CommandApdu {
  return { cla: PSAM_CLA, ins, p1, p2, data, le: 256 };
}

export class PsamDriver {
  constructor(private readonly transport: CardTransport) {}

  private async send(c: CommandApdu, what: string): Promise<Buffer> {
    const r = await exchange(this.transport, c);
    if (r.sw !== SW.OK) throw new ApduError(r.sw, `PSAM refused ${what}`);
    return r.data;
  }

  async connect(): Promise<void> {
    await this.transport.reset();
    await this.send(selectCommand(PSAM_AID), "SELECT");
  }

  /**
   * Step 688: replays the card's answer to reset, its INITIALIZE FOR
   * PURCHASE response and the amount to the PSAM, one command at a time, and
   * returns the DEBIT command (and the expected card signature when asked)
   * with the PSAM's MAC over it, for the payment server to check.
   */
  async issueDebitCommand(p: { cardAtr: Buffer; initializeResponse: Buffer; draw: DrawAmount; returnExpectedSignature: boolean }): Promise<{
    debitCommand: Buffer;
    psamCounter: number;
    expectedCardSignature?: Buffer;
    issuedMac: Buffer;
  }> {
    await this.send(cmd(PsamIns.CARD_RESET, p.cardAtr), "CARD RESET");
    await this.send(cmd(PsamIns.INITIALIZE, p.initializeResponse), "INITIALIZE");
    const data = await this.send(
      cmd(PsamIns.DRAW_AMOUNT, DrawAmountCommand.encode(p.draw), p.returnExpectedSignature ? DRAW_P1_RETURN_EXPECTED_SIGNATURE : 0),
      "DRAW AMOUNT",
    );
    if (p.returnExpectedSignature) {
      const r = decodeAnswer(() => DrawAmountResponseWithSignature.decode(data), "DRAW AMOUNT");
      return {
        debitCommand: r.debitCommand,
        psamCounter: DebitCommand.decode(r.debitCommand).psamCounter,
        expectedCardSignature: r.expectedCardSignature,
        issuedMac: r.issuedMac,
      };
    }
    const r = decodeAnswer(() => DrawAmountResponse.decode(data), "DRAW AMOUNT");
    return { debitCommand: r.debitCommand, psamCounter: DebitCommand.decode(r.debitCommand).psamCounter, issuedMac: r.issuedMac };
  }

  /** VERIFY DEBIT: the PSAM's verdict on the card's answer, with its MAC. */
  async verifyDebit(psamCounter: number, debitResponse: Buffer) {
    const data = await this.send(cmd(PsamIns.VERIFY_DEBIT, VerifyDebitCommand.encode({ psamCounter, debitResponse })), "VERIFY DEBIT");
    return decodeAnswer(() => VerifyDebitResponse.decode(data), "VERIFY DEBIT");
  }

  /** REVERSE DEBIT: returns the PSAM's MAC saying the debit is cancelled. */
  async reverseDebit(psamCounter: number): Promise<Buffer> {
    const data = await this.send(cmd(PsamIns.REVERSE_DEBIT, ReverseDebitCommand.encode({ psamCounter })), "REVERSE DEBIT");
    return decodeAnswer(() => ReverseDebitResponse.decode(data), "REVERSE DEBIT").reversalMac;
  }

  async readStatus(): Promise<PsamStatus> {
    return PsamStatusResponse.decode(await this.send(cmd(PsamIns.READ_STATUS), "READ STATUS"));
  }

  /** The purchase key versions the PSAM holds, ascending: the cards it can serve. */
  async readKeyVersions(): Promise<number[]> {
    return [...(await this.send(cmd(PsamIns.READ_KEY_VERSIONS), "READ KEY VERSIONS"))];
  }

  async readPending() {
    const out = [];
    for (let i = 0; i < 256; i++) {
      const r = await exchange(this.transport, cmd(PsamIns.READ_PENDING, Buffer.alloc(0), i));
      if (r.sw === SW.RECORD_NOT_FOUND) break;
      if (r.sw !== SW.OK) throw new ApduError(r.sw, "PSAM refused READ PENDING");
      out.push(PendingDebitRecord.decode(r.data));
    }
    return out;
  }

  async readBatchRecord(index: number): Promise<PsamBatchRecord | undefined> {
    const r = await exchange(this.transport, cmd(PsamIns.READ_BATCH_RECORD, Buffer.alloc(0), index >> 8, index & 0xff));
    if (r.sw === SW.RECORD_NOT_FOUND) return undefined;
    if (r.sw !== SW.OK) throw new ApduError(r.sw, "PSAM refused READ BATCH RECORD");
    return BatchRecord.decode(r.data);
  }

  async closeBatch() {
    return CloseBatchResponse.decode(await this.send(cmd(PsamIns.CLOSE_BATCH), "CLOSE BATCH"));
  }

  /** The last closed batch's summary again, or undefined when none was closed yet. */
  async lastClosedBatch() {
    const r = await exchange(this.transport, cmd(PsamIns.CLOSE_BATCH, Buffer.alloc(0), 0x01));
    if (r.sw === SW.REFERENCED_DATA_NOT_FOUND) return undefined;
    if (r.sw !== SW.OK) throw new ApduError(r.sw, "PSAM refused CLOSE BATCH (last closed)");
    return CloseBatchResponse.decode(r.data);
  }

  /** The current batch's records, oldest first. */
  async readBatch(): Promise<PsamBatchRecord[]> {
    const out: PsamBatchRecord[] = [];
    for (let i = 0; i < 0x10000; i++) {
      const r = await this.readBatchRecord(i);
      if (!r) break;
      out.push(r);
    }
    return out;
  }
}

/** Decodes a PSAM's answer; one of the wrong length is the PSAM's failure, not the job's. */
function decodeAnswer<T>(decode: () => T, what: string): T {
  try {
    return decode();
  } catch (e) {
    if (e instanceof LayoutError) throw new Error(`the PSAM's answer to ${what} is malformed: ${e.message}`, { cause: e });
    throw e;
  }
}
