import { defaultAddress } from "../../lib/config.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { TerminalConcentratorServiceDefinition } from "../../gen/netpurse/terminal/v1/terminal.js";
import { Concentrator } from "./concentrator.js";

export interface ConcentratorConfig {
  listen?: string;
  concentratorId?: string;
  paymentServerWindow?: number;
  terminalQueueLimit?: number;
  keepaliveIntervalMs?: number;
}

/** Starts the terminal concentrator's gRPC server (in this process). */
export async function startConcentrator(c: ConcentratorConfig = {}) {
  const log = createLogger("concentrator");
  const concentrator = new Concentrator({
    concentratorId: c.concentratorId ?? "concentrator-1",
    paymentServerWindow: c.paymentServerWindow ?? 1024,
    terminalQueueLimit: c.terminalQueueLimit ?? 1024,
    keepaliveIntervalMs: c.keepaliveIntervalMs ?? 10_000,
    log,
  });
  const server = await startGrpcServer({
    address: c.listen ?? defaultAddress("concentrator"),
    services: [service(TerminalConcentratorServiceDefinition, concentrator.service)],
    log,
    limits: { maxMessageBytes: 256 * 1024, maxConcurrentStreams: 1024 },
  });
  return {
    address: server.address,
    concentrator,
    async close() {
      concentrator.close();
      await server.shutdown();
    },
  };
}
