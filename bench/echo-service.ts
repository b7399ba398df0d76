// A unary echo of raw bytes, for the benchmark's transport baseline. It has
// no .proto: its definition has the shape ts-proto generates (name, full
// name, methods with message types), so the project's own server bootstrap
// (which registers services by their full name) and client factory take it
// like any netpurse service, and the baseline pays the same per-call costs.

import { randomBytes, randomUUID } from "node:crypto";
import { ConfirmationMode } from "../gen/netpurse/card/v1/card.js";
import { DrawRequest, ProcessDrawRequestRequest } from "../gen/netpurse/payment/v1/payment.js";
import { SoftwareCard } from "../client/card/software-card.js";
import { money } from "../lib/money.js";
import { InitializeForPurchaseResponse, LogRecord } from "../lib/protocol/purse.js";
import { seal } from "../lib/protocol/encryption-layer.js";
import { DEMO_SHOP, EUR } from "../services/network/layout.js";
import { RawBytes } from "./raw-bytes.js";

export const EchoDefinition = {
  name: "Echo",
  fullName: "netpurse.bench.Echo",
  methods: {
    echo: {
      name: "Echo",
      requestType: RawBytes,
      requestStream: false,
      responseType: RawBytes,
      responseStream: false,
      options: {},
    },
  },
} as const;

/**
 * The identity the echo server's certificate carries, from a throwaway CA
 * of the run: an existing kind ("load" is as good as any, nothing checks
 * it but the echo's own client), so the PKI needs no benchmark-only kind.
 */
export const ECHO_IDENTITY = { kind: "load", id: "echo" } as const;

export const echoImplementation = {
  echo: async (request: Uint8Array): Promise<Uint8Array> => request,
};

/**
 * The size of a real draw request on the wire (the first and larger of the
 * cardholder's two calls to the payment server), so the echo carries what a
 * purchase carries.
 */
export function drawRequestBytes(): number {
  const id = randomUUID();
  const key = randomBytes(32);
  const drawRequest = DrawRequest.encode({
    transactionId: { value: id },
    merchantId: { value: DEMO_SHOP.merchantId },
    amount: money(99, EUR, 2),
    confirmationMode: ConfirmationMode.CONFIRMATION_MODE_PSAM_VERIFIES,
    cardAtr: SoftwareCard.ATR,
    initializeResponse: Buffer.alloc(InitializeForPurchaseResponse.size),
    cardLog: Array.from({ length: 4 }, () => Buffer.alloc(LogRecord.size)),
  }).finish();
  const request = ProcessDrawRequestRequest.encode({
    transactionId: { value: id },
    merchantId: { value: DEMO_SHOP.merchantId },
    keyNonce: randomBytes(16),
    encryptedSessionKey: seal(key, "SESSION_KEY", id, randomBytes(32)),
    drawRequest: seal(key, "DRAW_REQUEST", id, drawRequest),
  }).finish();
  return request.length;
}
