// Server bootstrap shared by every netpurse service: TLS (mutual inside the
// operator's network) with the peer's SPIFFE identity handed to handlers and
// checked against each RPC's access rule; bounded messages, streams,
// connections, handshakes and idle time; keepalive; health; reflection;
// error mapping and call logs.

import * as grpc from "@grpc/grpc-js";
import {
  composeServerMiddleware,
  ServerError,
  Status,
  type CallContext,
  type ServerMiddleware,
  type ServerMiddlewareCall,
  type ServiceImplementation,
  type TsProtoServiceDefinition,
} from "nice-grpc";
import { errorDetailsServerMiddleware } from "nice-grpc-error-details";
import { HealthDefinition, HealthServiceImpl, HealthState } from "nice-grpc-server-health";
import { ServerReflection, ServerReflectionService } from "nice-grpc-server-reflection";
import { randomUUID } from "node:crypto";
import { chmodSync, lstatSync, unlinkSync } from "node:fs";
import { createServer as createTcpServer, type Server as TcpServer, type Socket } from "node:net";
import { ErrorReason } from "../../gen/netpurse/card/v1/card.js";
import { answers } from "../socket.js";
import type { Logger } from "../log.js";
import { identityFromSubjectAltName, parseSpiffeId, spiffeId, type Identity, type Kind } from "../pki/identity.js";
import { isRevoked } from "../pki/revocation.js";
import { reflectionDescriptorSet } from "./descriptors.js";
import { unixSocketPath } from "./client.js";
import { NetpurseError, reasonName } from "./errors.js";
import { addService } from "./grpc-js-server.js";
import { serverCredentials, type ServerTls } from "./tls.js";
import { StoreUnavailable } from "../store/db.js";

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

/** Metadata key under which the server interceptor hands the peer's proven identity to handlers. */
const PEER_METADATA = "netpurse-peer";
const INSECURE = "insecure";
const ANONYMOUS = "anonymous";

/**
 * Reads the identity the peer's certificate proves (its SPIFFE ID, verified
 * against the installation's CA and revocation list by the TLS handshake)
 * and hands it to handlers in the metadata, after removing any value a
 * client put under that key itself: a peer is trusted only for what its
 * certificate proves, never for what it says.
 */
const peerInterceptor =
  (trustDomain: string | undefined): grpc.ServerInterceptor =>
  (_method, call) =>
    new grpc.ServerInterceptingCall(call, {
      start(next) {
        next({
          onReceiveMetadata(metadata, mdNext) {
            metadata.remove(PEER_METADATA);
            let peer = INSECURE;
            if (trustDomain !== undefined) {
              const cert = call.getAuthContext().sslPeerCertificate;
              // A connection made before its certificate was revoked proves nothing for a new call.
              const id = cert && !isRevoked(cert.serialNumber) ? identityFromSubjectAltName(cert.subjectaltname, trustDomain) : undefined;
              peer = id && cert ? `${spiffeId(id)} ${cert.serialNumber}` : ANONYMOUS;
            }
            metadata.set(PEER_METADATA, peer);
            mdNext(metadata);
          },
        });
      },
    });

/** Who called: an identity its certificate (of that serial number) proved, a caller without one, or any caller on a server run without TLS (--insecure). */
export type Peer = ({ proven: true; serial: string } & Identity) | { proven: false; insecure: boolean };

export function peerOf(context: CallContext): Peer {
  const v = context.metadata.get(PEER_METADATA) ?? INSECURE;
  if (v === INSECURE) return { proven: false, insecure: true };
  const [uri = "", serial = ""] = v.split(" ");
  const id = v === ANONYMOUS ? undefined : parseSpiffeId(uri);
  return id ? { proven: true, serial, ...id } : { proven: false, insecure: false };
}

/** Whether a proven peer's certificate has been revoked since its call began (for long-lived streams). */
export const peerRevoked = (p: Peer) => p.proven && isRevoked(p.serial);

/** Who may call an RPC: anyone (the public's endpoints, where messages prove themselves), or peers whose certificate proves one of these kinds. */
export type Access = "public" | readonly Kind[];

/** A service's access rules: one for all its RPCs, and exceptions by method name. */
export type AccessRules<S> = { all: Access } & { [M in keyof S]?: Access };

const describePeer = (p: Peer) => (p.proven ? spiffeId(p) : p.insecure ? "an insecure caller" : "a caller without a certificate");

function accessMiddleware(rules: { all: Access } & Record<string, Access | undefined>, log: Logger): ServerMiddleware {
  return async function* <Req, Res>(call: ServerMiddlewareCall<Req, Res>, context: CallContext) {
    const method = call.method.path.slice(call.method.path.lastIndexOf("/") + 1);
    const rule = rules[method.charAt(0).toLowerCase() + method.slice(1)] ?? rules.all;
    if (rule !== "public") {
      const peer = peerOf(context);
      if (!peer.proven && !peer.insecure) {
        log.warn("refused a caller without a certificate", { method: call.method.path, peer: context.peer });
        throw new NetpurseError(
          Status.UNAUTHENTICATED,
          ErrorReason.ERROR_REASON_UNAUTHENTICATED,
          `${call.method.path} needs a client certificate from the installation's CA proving one of: ${rule.join(", ")}`,
        );
      }
      if (peer.proven && !rule.includes(peer.kind)) {
        log.warn("refused a peer not allowed this call", { method: call.method.path, peer: describePeer(peer) });
        throw new NetpurseError(
          Status.PERMISSION_DENIED,
          ErrorReason.ERROR_REASON_NOT_ALLOWED,
          `${describePeer(peer)} may not call ${call.method.path} (only ${rule.join(", ")})`,
        );
      }
    }
    return yield* call.next(call.request, context);
  };
}

export interface ServerLimits {
  /** Largest message accepted or sent, bytes. */
  maxMessageBytes: number;
  /** Largest message sent, bytes, when answers may be larger than requests (a page of a list); maxMessageBytes when absent. */
  maxSendBytes?: number;
  /** Concurrent streams per HTTP/2 connection. */
  maxConcurrentStreams: number;
  /** Connections open at once; more are closed as they arrive. */
  maxConnections: number;
  /** Connections open at once from one IPv4 address or IPv6 /64, so that one source cannot take every slot; more from it are closed as they arrive. */
  maxConnectionsPerAddress: number;
  /** A TLS handshake not finished in this time is cut (a half-open connection holds nothing longer). */
  handshakeTimeoutMs: number;
  /** A connection with no call for this long is closed. */
  idleTimeoutMs: number;
  /** A connection older than this is asked to go (GOAWAY) and reconnect, so no connection lives forever... */
  maxConnectionAgeMs: number;
  /** ...and calls still running then get this long to finish. */
  maxConnectionAgeGraceMs: number;
}

export const DEFAULT_LIMITS: ServerLimits = {
  maxMessageBytes: 64 * 1024,
  maxConcurrentStreams: 256,
  maxConnections: 1_000,
  maxConnectionsPerAddress: 100,
  handshakeTimeoutMs: 5_000,
  idleTimeoutMs: 5 * 60_000,
  maxConnectionAgeMs: 60 * 60_000,
  maxConnectionAgeGraceMs: 5 * 60_000,
};

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
      if (e instanceof StoreUnavailable) {
        log.error("rpc failed: the store is unavailable", { method: call.method.path, error: e.message });
        throw new ServerError(Status.UNAVAILABLE, e.message);
      }
      const ref = randomUUID().slice(0, 8);
      log.error("rpc failed", { method: call.method.path, ref, error: (e as Error)?.stack ?? String(e) });
      throw new ServerError(Status.INTERNAL, `internal error (ref ${ref}); the operation may be retried`);
    }
  };
}

export interface RunningServer {
  /** host:port actually bound, or unix:PATH. */
  address: string;
  /** The TCP port bound (0 on a Unix socket). */
  port: number;
  health: HealthState;
  /**
   * Says whether this server can serve now, in its health (the server as a
   * whole, "", and each of its services): a service that lost what it needs
   * (its database, say) says false, and clients that reach it among replicas
   * (lib/grpc/client.ts openChannel) send their calls to the others until it
   * says true again. Logged when it changes, with `why`.
   */
  setServing(serving: boolean, why?: string): void;
  /** Connections open now (for operators and tests). */
  connections(): Promise<number>;
  shutdown(): Promise<void>;
}

// nice-grpc types a middleware that adds nothing to the call context with {}.
// eslint-disable-next-line @typescript-eslint/no-empty-object-type
type NoExtension = {};

/** A service to serve: its definition, its implementation and who may call each of its RPCs. */
export interface ServiceEntry {
  fullName: string;
  addTo(server: grpc.Server, middleware: (rules: { all: Access }) => ServerMiddleware): void;
}

/** Pairs a generated service definition with its implementation (type-checked against each other) and its access rules. */
export function service<S extends TsProtoServiceDefinition>(
  definition: S,
  implementation: ServiceImplementation<S>,
  access: AccessRules<ServiceImplementation<S>>,
): ServiceEntry {
  return { fullName: definition.fullName, addTo: (server, middleware) => addService(server, definition, implementation, middleware(access)) };
}

/**
 * How a server is reached: TLS with the installation's certificates; or
 * plaintext on this machine only, on loopback or a Unix socket, for a
 * cardholder's own machine (`local`); or, only with --insecure for
 * debugging, plaintext anywhere.
 */
export type Transport = { tls: ServerTls } | { local: true } | { insecure: true };

const LOOPBACK = new Set(["127.0.0.1", "::1", "[::1]", "localhost"]);

/** The longest path a Unix socket address holds on Linux (sun_path is 108 bytes with its final NUL; 104 on macOS). */
export const MAX_UNIX_SOCKET_PATH_BYTES = 107;

/**
 * Starts a gRPC server with health and reflection on `address` (host:port,
 * port 0 picks a free one; or unix:PATH, a Unix domain socket). Connections
 * are taken by a listener of our own (to cap them) and handed to grpc-js,
 * which runs TLS and HTTP/2.
 */
export async function startGrpcServer(p: {
  address: string;
  services: ServiceEntry[];
  log: Logger;
  transport: Transport;
  limits?: Partial<ServerLimits>;
  /** Runs before every call of every service, health and reflection included (the client daemon's token check on TCP). */
  guard?: ServerMiddleware;
}): Promise<RunningServer> {
  const limits = { ...DEFAULT_LIMITS, ...p.limits };
  const tls = "tls" in p.transport ? p.transport.tls : undefined;
  const server = new grpc.Server({
    "grpc.max_receive_message_length": limits.maxMessageBytes,
    "grpc.max_send_message_length": limits.maxSendBytes ?? limits.maxMessageBytes,
    "grpc.max_concurrent_streams": limits.maxConcurrentStreams,
    "grpc-node.max_session_memory": 16, // MiB per HTTP/2 session
    "grpc.keepalive_time_ms": 60_000,
    "grpc.keepalive_timeout_ms": 20_000,
    "grpc.http2.min_ping_interval_without_data_ms": 5_000,
    "grpc.max_connection_idle_ms": limits.idleTimeoutMs,
    "grpc.max_connection_age_ms": limits.maxConnectionAgeMs,
    "grpc.max_connection_age_grace_ms": limits.maxConnectionAgeGraceMs,
    interceptors: [deadlineInterceptor, peerInterceptor(tls?.trustDomain)],
  });
  const outer = composeServerMiddleware<NoExtension, NoExtension, NoExtension>(errorMiddleware(p.log), errorDetailsServerMiddleware);
  const guarded = p.guard ? composeServerMiddleware<NoExtension, NoExtension, NoExtension>(outer, p.guard) : outer;
  const middleware = (rules: { all: Access }) => composeServerMiddleware<NoExtension, NoExtension, NoExtension>(guarded, accessMiddleware(rules, p.log));
  const health = HealthState();
  const names: string[] = [];
  for (const s of p.services) {
    s.addTo(server, middleware);
    names.push(s.fullName);
    health.setStatus("healthy", s.fullName);
  }
  const setServing = (serving: boolean, why?: string) => {
    if ((health.getStatus("") === "healthy") !== serving) p.log[serving ? "info" : "warn"](serving ? "serving again" : "not serving", { why });
    for (const n of ["", ...names]) health.setStatus(serving ? "healthy" : "unhealthy", n);
  };
  const open = { all: "public" } as const;
  addService(server, HealthDefinition, HealthServiceImpl(health), middleware(open));
  addService(server, ServerReflectionService, ServerReflection(reflectionDescriptorSet(), [...names, "grpc.health.v1.Health"]), middleware(open));
  const credentials: grpc.ServerCredentials & { stop?(): void } = tls
    ? serverCredentials(tls, limits.handshakeTimeoutMs)
    : grpc.ServerCredentials.createInsecure();
  const injector = server.createConnectionInjector(credentials);
  const perSource = new Map<string, number>();
  // Every accepted socket, so that shutdown can end one still in its TLS handshake, whose HTTP/2 session grpc-js does not know of yet.
  const sockets = new Set<Socket>();
  let dropped = 0;
  let droppedPerSource = 0;
  const tcp = createTcpServer({ noDelay: true }, (socket) => {
    const source = sourceOf(socket.remoteAddress);
    const n = perSource.get(source) ?? 0;
    if (n >= limits.maxConnectionsPerAddress) {
      droppedPerSource++;
      socket.destroy();
      return;
    }
    perSource.set(source, n + 1);
    sockets.add(socket);
    socket.once("close", () => {
      sockets.delete(socket);
      const left = (perSource.get(source) ?? 1) - 1;
      if (left > 0) perSource.set(source, left);
      else perSource.delete(source);
    });
    injector.injectConnection(socket);
  });
  tcp.maxConnections = limits.maxConnections;
  const dropLog = setInterval(() => {
    if (dropped > 0) p.log.warn("connections refused: the server holds its maximum", { refused: dropped, max: limits.maxConnections });
    if (droppedPerSource > 0)
      p.log.warn("connections refused: one source holds its maximum", { refused: droppedPerSource, maxPerAddress: limits.maxConnectionsPerAddress });
    dropped = droppedPerSource = 0;
  }, 10_000);
  dropLog.unref();
  tcp.on("drop", () => dropped++);
  const socketPath = unixSocketPath(p.address);
  if ("local" in p.transport && socketPath === undefined && !LOOPBACK.has(p.address.slice(0, p.address.lastIndexOf(":")))) {
    throw new Error(`${p.address} is not a loopback address or a Unix socket: this server is for its own machine only`);
  }
  let address: string;
  let port = 0;
  if (socketPath !== undefined) address = `unix:${await listenUnix(tcp, socketPath, p.log)}`;
  else {
    const bound = await listen(tcp, p.address);
    address = `${bound.host}:${bound.port}`;
    port = bound.port;
  }
  // An accept failure (out of files, say) is logged; the listener keeps accepting.
  tcp.on("error", (e) => p.log.error("listener error", { address: p.address, error: e.message }));
  if ("insecure" in p.transport)
    p.log.warn("INSECURE: plaintext, no peer is authenticated and every RPC is open to anyone who reaches this port; for local debugging only", { address });
  p.log.info("listening", {
    address,
    services: names.join(","),
    tls: tls
      ? `client certificates ${tls.clientCerts === "require" ? "required" : "optional"}`
      : "local" in p.transport
        ? socketPath !== undefined
          ? "Unix socket"
          : "loopback only"
        : "off",
  });
  return {
    address,
    port,
    health,
    setServing,
    connections: () => new Promise((resolve, reject) => tcp.getConnections((e, n) => (e ? reject(e) : resolve(n)))),
    async shutdown() {
      for (const n of ["", ...names]) health.setStatus("unhealthy", n);
      clearInterval(dropLog);
      tcp.close();
      // Give in-flight calls a moment, then cut long-lived streams.
      const timer = setTimeout(() => server.forceShutdown(), 2_000);
      await new Promise<void>((resolve) => server.tryShutdown(() => resolve()));
      clearTimeout(timer);
      injector.destroy();
      for (const s of sockets) s.destroy();
      credentials.stop?.();
    },
  };
}

/**
 * The token of a call's `authorization: Bearer TOKEN` metadata (RFC 6750:
 * the scheme in any case; at most 256 characters), or undefined when there
 * is none or the metadata is of another shape. The one parser for every
 * server that takes bearer tokens.
 */
export function bearerTokenOf(context: CallContext): string | undefined {
  const header = context.metadata.get("authorization");
  return header === undefined ? undefined : /^Bearer[ \t]+(\S{1,256})[ \t]*$/i.exec(header)?.[1];
}

/** The source a connection is counted against: its IPv4 address, or the /64 of an IPv6 one (one host's usual allocation). */
export function sourceOf(address: string | undefined): string {
  if (!address) return "unknown";
  const v4 = /^(?:::ffff:)?(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (v4) return v4[1]!;
  const [head = "", tail = ""] = address.toLowerCase().split("::");
  const left = head ? head.split(":") : [];
  const right = tail ? tail.split(":") : [];
  const groups = address.includes("::") ? [...left, ...Array<string>(8 - left.length - right.length).fill("0"), ...right] : left;
  return `${groups
    .slice(0, 4)
    .map((g) => parseInt(g || "0", 16).toString(16))
    .join(":")}::/64`;
}

/**
 * Listens on a Unix socket: a file of that name left by a server that did
 * not stop cleanly (nobody answers on it) is removed first; one another
 * server still answers on, or a file that is no socket, is left alone and
 * refused. The socket is made the owner's only (0600); the folder it sits in
 * is what keeps others out (the caller's to check).
 */
async function listenUnix(server: TcpServer, path: string, log: Logger): Promise<string> {
  if (Buffer.byteLength(path) > MAX_UNIX_SOCKET_PATH_BYTES) {
    throw new Error(
      `the socket path ${path} is ${Buffer.byteLength(path)} bytes, more than the ${MAX_UNIX_SOCKET_PATH_BYTES} a Unix socket address holds; choose a shorter path`,
    );
  }
  const existing = (() => {
    try {
      return lstatSync(path);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
  })();
  if (existing && !existing.isSocket()) throw new Error(`${path} exists and is not a socket; remove it or choose another path`);
  if (existing) {
    if (await answers(path)) throw new Error(`${path}: another server is listening on it already; stop that one first`);
    unlinkSync(path);
    log.info("removed a stale socket left by a server that did not stop cleanly", { path });
  }
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => {
      server.off("error", reject);
      resolve();
    });
  });
  chmodSync(path, 0o600);
  return path;
}

function listen(tcp: TcpServer, address: string): Promise<{ host: string; port: number }> {
  const i = address.lastIndexOf(":");
  const host = address.slice(0, i).replace(/^\[|\]$/g, "");
  const port = Number(address.slice(i + 1));
  if (!host || !Number.isInteger(port) || port < 0 || port > 65_535) return Promise.reject(new Error(`not a host:port address: ${address}`));
  return new Promise((resolve, reject) => {
    tcp.once("error", reject);
    tcp.listen(port, host, () => {
      tcp.off("error", reject);
      const a = tcp.address();
      resolve({ host: address.slice(0, i), port: typeof a === "object" && a ? a.port : port });
    });
  });
}
