// A PSAM's batch record as ClearingService.SubmitBatch carries it: the one
// conversion the terminal hosts, the tests and the benchmark use.

import type { BatchRecord } from "../../gen/netpurse/clearing/v1/clearing.js";
import { merchantId, txnId } from "../../lib/ids.js";
import { money } from "../../lib/money.js";
import type { PsamBatchRecord } from "../../lib/protocol/psam.js";

/** The record's amount goes with exponent 0: the PSAM does not know it, clearing takes it from the merchant's registration. */
export function batchRecordMessage(r: PsamBatchRecord): BatchRecord {
  return {
    psamCounter: r.psamCounter,
    purseId: { value: r.purseId },
    keyVersion: r.keyVersion,
    sessionCounter: r.sessionCounter,
    challenge: r.challenge,
    cardCounter: r.cardCounter,
    balanceAfter: BigInt(r.balanceAfter),
    amount: money(r.amount, r.currency, 0),
    dateTime: new Date(r.dateTime * 1000),
    transactionId: txnId(r.transactionRef),
    merchantId: merchantId(r.merchantId),
    cardSignature: r.cardSignature,
    recordMac: r.recordMac,
  };
}
