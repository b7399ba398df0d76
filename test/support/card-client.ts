// A cardholder's client without the daemon, for tests that must misbehave
// (lie about the card, alter the DEBIT command, replay): a software card
// through the real APDU transport, and helpers to build draw requests.

import { ClientError } from "nice-grpc";
import { InProcessTransport } from "../../lib/apdu/transport.js";
import { reasonName, type ReasonedClientError } from "../../lib/grpc/errors.js";
import { PurseReader } from "../../client/card/purse-reader.js";
import { SoftwareCard } from "../../client/card/software-card.js";
import type { PaymentOffer } from "../../gen/netpurse/merchant/v1/merchant.js";
import type { DrawRequest } from "../../gen/netpurse/payment/v1/payment.js";

export async function openCard(path: string): Promise<PurseReader> {
  const reader = new PurseReader(new InProcessTransport(await SoftwareCard.open(path)));
  await reader.connect();
  return reader;
}

/** Initializes the card for a purchase and packages its answers with the offer, as the client module does. */
export async function drawRequestFor(reader: PurseReader, offer: PaymentOffer, patchInit?: (raw: Buffer) => Buffer): Promise<DrawRequest> {
  const init = await reader.initializeForPurchase();
  return {
    transactionId: offer.transactionId,
    merchantId: offer.merchantId,
    amount: offer.amount,
    confirmationMode: offer.confirmationMode,
    cardAtr: reader.answerToReset,
    initializeResponse: patchInit ? patchInit(init.raw) : init.raw,
  };
}

/** The gRPC code name, reason and message of a failed call (for assertions). */
export async function failure(p: Promise<unknown>): Promise<{ code: string; reason: string; details: string }> {
  try {
    await p;
  } catch (e) {
    if (e instanceof ClientError) {
      const r = (e as ReasonedClientError).reason;
      const { Status } = await import("nice-grpc");
      return { code: Status[e.code]!, reason: r === undefined ? "" : reasonName(r).replace("ERROR_REASON_", ""), details: e.details };
    }
    throw e;
  }
  throw new Error("the call succeeded; a failure was expected");
}
