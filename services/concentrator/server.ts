import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import type { Security } from "../../lib/pki/security.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { Concentrator } from "./concentrator.js";
import { WatchedPsamRegistry } from "./psam-registry.js";

export interface ConcentratorConfig {
  security: Security;
  listen?: string;
  concentratorId?: string;
  /** The issuer's PSAM registry file; required unless the network runs --insecure. */
  psamRegistry?: string;
  paymentServerWindow?: number;
  terminalQueueLimit?: number;
  keepaliveIntervalMs?: number;
  maxLeaseMs?: number;
  maxLeasesPerPaymentServer?: number;
  queuedJobTtlMs?: number;
  livenessProofMs?: number;
  closeBatchesTimeoutMs?: number;
}

/** The concentrator's defaults, in one place for the code and its --help. */
export const CONCENTRATOR_DEFAULTS = {
  paymentServerWindow: 1024,
  terminalQueueLimit: 1024,
  keepaliveIntervalMs: 10_000,
  /** Longer than a payment server holds a PSAM for a cardholder's answer (60 s). */
  maxLeaseMs: 120_000,
  maxLeasesPerPaymentServer: 1024,
  queuedJobTtlMs: 10_000,
  livenessProofMs: 2_000,
  /** An operator's CloseBatches waits this long for each terminal host (a close takes milliseconds; the CLI waits 10 s). */
  closeBatchesTimeoutMs: 5_000,
} as const;

/** Starts the terminal concentrator's gRPC server (in this process). */
export async function startConcentrator(c: ConcentratorConfig) {
  const log = createLogger("concentrator");
  if (!c.psamRegistry && !c.security.insecure)
    throw new Error("the concentrator needs the issuer's PSAM registry (--psam-registry FILE) to know which terminal holds which PSAM");
  const registry = c.psamRegistry ? await WatchedPsamRegistry.open(c.psamRegistry, log) : undefined;
  const d = CONCENTRATOR_DEFAULTS;
  const concentrator = new Concentrator({
    concentratorId: c.concentratorId ?? "concentrator-1",
    ...(registry ? { psamRegistry: registry } : {}),
    paymentServerWindow: c.paymentServerWindow ?? d.paymentServerWindow,
    terminalQueueLimit: c.terminalQueueLimit ?? d.terminalQueueLimit,
    keepaliveIntervalMs: c.keepaliveIntervalMs ?? d.keepaliveIntervalMs,
    maxLeaseMs: c.maxLeaseMs ?? d.maxLeaseMs,
    maxLeasesPerPaymentServer: c.maxLeasesPerPaymentServer ?? d.maxLeasesPerPaymentServer,
    queuedJobTtlMs: c.queuedJobTtlMs ?? d.queuedJobTtlMs,
    livenessProofMs: c.livenessProofMs ?? d.livenessProofMs,
    closeBatchesTimeoutMs: c.closeBatchesTimeoutMs ?? d.closeBatchesTimeoutMs,
    log,
  });
  const server = await startGrpcServer({
    address: c.listen ?? defaultAddress("concentrator"),
    // Only peers of the operator's network: terminal hosts, payment servers, operators (the pool, closing batches).
    services: [
      service(TerminalConcentratorServiceDefinition, concentrator.service, {
        all: [],
        attachTerminal: ["terminal"],
        connectPaymentServer: ["payment"],
        listTerminals: ["operator"],
        closeBatches: ["operator"],
      }),
    ],
    // Inside the operator's network only: no TLS connection without a certificate of the installation's CA,
    // so a stranger cannot even hold a connection (and a place under the connection cap) here.
    transport: c.security.server("require"),
    log,
    // Streams live long: a connection is recycled after 12 h, with 10 minutes for the calls on it.
    limits: { maxMessageBytes: 256 * 1024, maxConcurrentStreams: 1024, maxConnectionAgeMs: 12 * 3_600_000, maxConnectionAgeGraceMs: 10 * 60_000 },
  });
  return {
    address: server.address,
    concentrator,
    async close() {
      registry?.stop();
      concentrator.close();
      await server.shutdown();
    },
  };
}
