// The transport baseline: a unary echo of a draw request's worth of bytes,
// to a server process on loopback, through the project's channel options,
// client middleware and server bootstrap, with TLS or plaintext as the
// purchases it is compared with. What a purchase costs beyond this is
// netpurse's own work.

import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import type { Client } from "nice-grpc";
import type { DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { clientFactory, DEFAULT_DEADLINE_MS, openChannel } from "../lib/grpc/client.js";
import { CertificateAuthority, pkiPaths } from "../lib/pki/authority.js";
import { Security } from "../lib/pki/security.js";
import { Launcher } from "../services/network/launcher.js";
import { drawRequestBytes, ECHO_IDENTITY, EchoDefinition } from "./echo-service.js";
import { stopOnInterrupt } from "./interrupt.js";
import { closedLoop, type LoadResult, type Phases } from "./load.js";
import { PROCESS, SERVICE_ENV } from "./network.js";
import { CpuSampler, machineCpu } from "./proc.js";

const ECHO_SERVER = "bench/echo-server.ts";
export const ECHO_PROCESS = "echo-server";

export interface EchoResult extends LoadResult {
  concurrency: number;
  /** Server TLS with the server's certificate checked, as a cardholder's link; or plaintext. */
  tls: boolean;
  payloadBytes: number;
  /** CPU during the measuring window, % of one core: the echo server and this process. */
  cpuPercent: Record<string, number>;
  /** The whole machine's busy CPU during the window, % of one core. */
  machineCpuPercent?: number;
}

/**
 * Starts one echo server and measures it at each concurrency in turn. With
 * `tls`, a throwaway CA in the echo's temporary folder issues the server's
 * key and certificate; the server asks for client certificates as netpurse's
 * servers do, and the client, like a cardholder, holds only the CA bundle and
 * checks the server's name and identity.
 */
export async function measureEcho(concurrencies: number[], phases: Phases, tls: boolean): Promise<EchoResult[]> {
  const logDir = await mkdtemp(join(tmpdir(), "netpurse-bench-echo-"));
  const launcher = new Launcher(logDir, { env: SERVICE_ENV });
  const tidy = async () => {
    await launcher.stopAll();
    await rm(logDir, { recursive: true, force: true });
  };
  const forget = stopOnInterrupt(tidy);
  try {
    process.stderr.write(`[echo, TLS ${tls ? "on" : "off"}] starting the echo server\n`);
    const pki = join(logDir, "pki");
    if (tls) await (await CertificateAuthority.init(pki)).issue(ECHO_IDENTITY);
    const server = await launcher.start(ECHO_PROCESS, ECHO_SERVER, ["--listen", "127.0.0.1:0", ...(tls ? ["--pki", pki] : [])]);
    const channel = openChannel(server.address, tls ? (await Security.forCardholder(pkiPaths(pki).caCert)).channel(ECHO_IDENTITY) : { insecure: true });
    try {
      const payload = randomBytes(drawRequestBytes());
      const call = echoCall(clientFactory().create(EchoDefinition, channel), payload);
      const results: EchoResult[] = [];
      for (const concurrency of concurrencies) {
        const cpu = new CpuSampler(
          () =>
            new Map([
              [ECHO_PROCESS, server.child.pid!],
              [PROCESS.bench, process.pid],
            ]),
        );
        const load = await closedLoop({
          label: `echo, ${concurrency} concurrent, TLS ${tls ? "on" : "off"}`,
          workers: concurrency,
          phases,
          operation: call,
          window: cpu,
        });
        results.push({ concurrency, tls, payloadBytes: payload.length, ...load, cpuPercent: cpu.percent(), ...machineCpu(cpu) });
      }
      return results;
    } finally {
      channel.close();
    }
  } finally {
    forget();
    await tidy();
  }
}

/** One timed echo, with the deadline every netpurse call carries (its middleware is part of the cost). */
function echoCall(echo: Client<typeof EchoDefinition, DeadlineOptions>, payload: Buffer): () => Promise<number> {
  return async () => {
    const started = performance.now();
    const answer = await echo.echo(payload, { deadline: DEFAULT_DEADLINE_MS });
    if (answer.length !== payload.length) throw new Error(`the echo answered ${answer.length} bytes for ${payload.length}`);
    return performance.now() - started;
  };
}
