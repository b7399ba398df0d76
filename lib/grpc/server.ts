// Server bootstrap shared by every netpurse service: bounded message sizes
// and streams, keepalive, health, reflection, error mapping and call logs.

import * as grpc from "@grpc/grpc-js";
import {
  createServer,
  ServerError,
  Status,
  type CallContext,
  type ServerMiddlewareCall,
  type Server,
  type ServiceImplementation,
  type TsProtoServiceDefinition,
} from "nice-grpc";
import { HealthDefinition, HealthServiceImpl, HealthState } from "nice-grpc-server-health";
import { ServerReflection, ServerReflectionService } from "nice-grpc-server-reflection";
import { randomUUID } from "node:crypto";
import { errorDetailsServerMiddleware } from "nice-grpc-error-details";
import { NetpurseError, reasonName } from "./errors.js";
import { reflectionDescriptorSet } from "./descriptors.js";
import type { Logger } from "../log.js";

/** Metadata key under which the server interceptor hands the call's deadline (ms since epoch) to handlers. */
const DEADLINE_METADATA = "netpurse-deadline-ms";

/**
 * grpc-js reads each call's deadline from the standard grpc-timeout header
 * (sent by grpc-js, grpcurl, buf curl, any gRPC client, and netpurse's own
 * clients), but nice-grpc's call context does not carry it: this interceptor
 * hands it to handlers in the metadata, so they can give up just before it
 * with a precise error (RESOURCE_EXHAUSTED rather than a bare timeout). A
 * value a client put under that key itself is removed first.
 */
const deadlineInterceptor: grpc.ServerInterceptor = (_method, call) =>
  new grpc.ServerInterceptingCall(call, {
    start(next) {
      next({
        onReceiveMetadata(metadata, mdNext) {
          metadata.remove(DEADLINE_METADATA);
          const d = call.getDeadline();
          const ms = d instanceof Date ? d.getTime() : d;
          if (Number.isFinite(ms)) metadata.set(DEADLINE_METADATA, String(ms));
          mdNext(metadata);
        },
      });
    },
  });

/** The caller's deadline in ms since the epoch, if it set one. */
export function callDeadline(context: CallContext): number | undefined {
  const v = context.metadata.get(DEADLINE_METADATA);
  return v ? Number(v) : undefined;
}

export interface ServerLimits {
  /** Largest message accepted or sent, bytes. */
  maxMessageBytes: number;
  /** Concurrent streams per HTTP/2 connection. */
  maxConcurrentStreams: number;
}

const DEFAULT_LIMITS: ServerLimits = { maxMessageBytes: 64 * 1024, maxConcurrentStreams: 256 };

function errorMiddleware(log: Logger) {
  return async function* <Req, Res>(call: ServerMiddlewareCall<Req, Res>, context: CallContext) {
    const started = Date.now();
    try {
      const out = yield* call.next(call.request, context);
      log.debug("rpc ok", { method: call.method.path, ms: Date.now() - started });
      return out;
    } catch (e) {
      if (e instanceof NetpurseError) {
        log.info("rpc refused", { method: call.method.path, code: Status[e.code], reason: reasonName(e.reason), details: e.details });
        throw e;
      }
      if (e instanceof ServerError) {
        log.info("rpc refused", { method: call.method.path, code: Status[e.code], details: e.details });
        throw e;
      }
      if (e instanceof Error && e.name === "AbortError") throw e;
      const ref = randomUUID().slice(0, 8);
      log.error("rpc failed", { method: call.method.path, ref, error: (e as Error)?.stack ?? String(e) });
      throw new ServerError(Status.INTERNAL, `internal error (ref ${ref}); the operation may be retried`);
    }
  };
}

export interface RunningServer {
  /** host:port actually bound. */
  address: string;
  port: number;
  server: Server;
  health: HealthState;
  shutdown(): Promise<void>;
}

/** A service to serve: its full name (for health and reflection) and how to add it to a server. */
export interface ServiceEntry {
  fullName: string;
  addTo(server: Server): void;
}

/** Pairs a generated service definition with its implementation, type-checked against each other. */
export function service<S extends TsProtoServiceDefinition>(definition: S, implementation: ServiceImplementation<S>): ServiceEntry {
  return { fullName: definition.fullName, addTo: (server) => server.add(definition, implementation) };
}

/**
 * Starts a gRPC server with health and reflection on `address` (host:port;
 * port 0 picks a free one).
 */
export async function startGrpcServer(p: { address: string; services: ServiceEntry[]; log: Logger; limits?: Partial<ServerLimits> }): Promise<RunningServer> {
  const limits = { ...DEFAULT_LIMITS, ...p.limits };
  const server = createServer({
    "grpc.max_receive_message_length": limits.maxMessageBytes,
    "grpc.max_send_message_length": limits.maxMessageBytes,
    "grpc.max_concurrent_streams": limits.maxConcurrentStreams,
    "grpc-node.max_session_memory": 16, // MiB per HTTP/2 session
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
    "grpc.http2.min_ping_interval_without_data_ms": 5_000,
    interceptors: [deadlineInterceptor],
  })
    .use(errorMiddleware(p.log))
    .use(errorDetailsServerMiddleware);
  const health = HealthState();
  const names: string[] = [];
  for (const s of p.services) {
    s.addTo(server);
    names.push(s.fullName);
    health.setStatus("healthy", s.fullName);
  }
  server.add(HealthDefinition, HealthServiceImpl(health));
  server.add(ServerReflectionService, ServerReflection(reflectionDescriptorSet(), [...names, "grpc.health.v1.Health"]));
  const port = await server.listen(p.address);
  const host = p.address.slice(0, p.address.lastIndexOf(":"));
  const address = `${host}:${port}`;
  p.log.info("listening", { address, services: names.join(",") });
  return {
    address,
    port,
    server,
    health,
    async shutdown() {
      for (const n of names) health.setStatus("unhealthy", n);
      // Give in-flight calls a moment, then cut long-lived streams.
      const timer = setTimeout(() => server.forceShutdown(), 2_000);
      await server.shutdown();
      clearTimeout(timer);
    },
  };
}
