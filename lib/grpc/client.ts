// Client channels shared by every netpurse caller: TLS that checks the
// server's identity, bounded messages, keepalive, a deadline sent as the
// standard grpc-timeout, and the server's rich error details (reason, field,
// retry delay) on the ClientError.

import {
  ChannelCredentials,
  createChannel,
  createClientFactory,
  Metadata,
  type Channel,
  type Client,
  type ClientMiddleware,
  type CompatServiceDefinition,
} from "nice-grpc";
import { deadlineMiddleware, type DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { errorDetailsClientMiddleware } from "nice-grpc-error-details";
import type { Kind } from "../pki/identity.js";
import type { ChannelSecurity, Security } from "../pki/security.js";
import { grpcTarget, isLoopback, isReplicated, parseTarget, replicasServiceConfig } from "./balancing.js";
import { channelCredentials } from "./tls.js";

export { InvalidTarget, parseTarget, unixSocketPath } from "./balancing.js";

/** The standard grpc-timeout value for `ms` (at most 8 digits, then a coarser unit). */
function grpcTimeout(ms: number): string {
  const left = Math.max(0, Math.ceil(ms));
  return left < 1e8 ? `${left}m` : `${Math.ceil(left / 1000)}S`;
}

/**
 * nice-grpc enforces a deadline on the client side only (it aborts the call)
 * and never hands it to grpc-js: this sends it to the server too, as the
 * standard grpc-timeout header every gRPC server reads, so that a server can
 * give up before the caller's deadline with a precise error.
 */
const grpcTimeoutMiddleware: ClientMiddleware<DeadlineOptions> = async function* (call, options) {
  if (options.deadline == null) return yield* call.next(call.request, options);
  const left = options.deadline instanceof Date ? options.deadline.getTime() - Date.now() : options.deadline;
  const metadata = Metadata(options.metadata);
  metadata.set("grpc-timeout", grpcTimeout(left));
  return yield* call.next(call.request, { ...options, metadata });
};

/**
 * A channel to `address`: TLS checking the server's certificate (and
 * presenting ours, inside the operator's network), or plaintext when the
 * process runs --insecure.
 *
 * `address` is one server (`HOST:PORT`, `unix:PATH`), as always; or replicas
 * of one server: `dns:///NAME:PORT` (every address NAME resolves to) or a
 * list `IP:PORT,IP:PORT,…` (also `ipv4:…`/`ipv6:…`). Replicas get calls in
 * turn (round_robin), each call one replica; one whose health
 * (grpc.health.v1, of the server as a whole: RunningServer.setServing) is
 * not SERVING, or that cannot be reached, gets none until it is back.
 * Each replica proves the name it is reached by: NAME for dns:, its own
 * address for a list (localhost on loopback). Throws InvalidTarget for an
 * address that names no server.
 */
export function openChannel(address: string, security: ChannelSecurity, opts: { maxMessageBytes?: number } = {}): Channel {
  const max = opts.maxMessageBytes ?? 64 * 1024;
  const target = parseTarget(address);
  const tls = "tls" in security;
  // The one name a channel's TLS checks (a list's backends are named one by one by the balancing policy).
  const host = target.kind === "address" ? /^(127\.0\.0\.1|\[::1\]):/.exec(address)?.[1] : target.kind === "dns" ? target.host : undefined;
  return createChannel(grpcTarget(target), tls ? channelCredentials(security.tls) : ChannelCredentials.createInsecure(), {
    ...(tls && host !== undefined && isLoopback(host) ? { "grpc.ssl_target_name_override": "localhost" } : {}),
    ...(isReplicated(target)
      ? {
          "grpc.service_config": replicasServiceConfig(target, ""),
          // The balancing is ours to say, not a DNS TXT record's.
          "grpc.service_config_disable_resolution": 1,
        }
      : {}),
    "grpc.max_receive_message_length": max,
    "grpc.max_send_message_length": max,
    "grpc.keepalive_time_ms": 30_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.enable_retries": 0, // retries are the caller's, by transaction id
    // A server back after an outage is reached within a second or two: a caller's own retries
    // (a few seconds at most) must not all fall inside the channel's reconnect back-off.
    "grpc.initial_reconnect_backoff_ms": 250,
    "grpc.max_reconnect_backoff_ms": 1_000,
  });
}

/**
 * Per-call metadata carrying an access token, `authorization: Bearer TOKEN`
 * (the gRPC convention). Per call rather than on the channel: one channel to
 * a bank serves every account the caller acts for. Sent over TLS, except on
 * a network run with --insecure.
 */
export const bearer = (token: string) => Metadata({ authorization: `Bearer ${token}` });

/** Client factory: deadlines (sent to the server as grpc-timeout) and the rich error model (RichClientError). */
export function clientFactory() {
  // The last middleware added runs first: grpc-timeout must see the deadline before deadlineMiddleware takes it.
  return createClientFactory().use(deadlineMiddleware).use(grpcTimeoutMiddleware).use(errorDetailsClientMiddleware);
}

/** The deadline of a call on a purchase's or a load's path, and of the client daemon's calls. */
export const DEFAULT_DEADLINE_MS = 15_000;

/** The deadline of a command-line tool's call, which a person waits for. */
export const CLI_DEADLINE_MS = 10_000;

/** One channel per address and expected server, opened on first use: callers that reach many servers by address (from offers) share connections. */
export class ChannelCache {
  private readonly channels = new Map<string, Channel>();
  /** Clients by service and channel: making one wraps every method of the service anew, a cost no call should pay. */
  private readonly clients = new Map<string, unknown>();
  private readonly factory = clientFactory();

  constructor(private readonly security: Security) {}

  /** A client of `definition` on the channel to `address` (see get), made once. */
  client<D extends CompatServiceDefinition & { fullName: string }>(
    definition: D,
    address: string,
    expect: { kind: Kind; id?: string },
  ): Client<D, DeadlineOptions> {
    const key = `${definition.fullName} ${address} ${expect.kind}/${expect.id ?? "*"}`;
    let c = this.clients.get(key) as Client<D, DeadlineOptions> | undefined;
    if (!c) {
      c = this.factory.create(definition, this.get(address, expect));
      this.clients.set(key, c);
    }
    return c;
  }

  /** A channel to `address`, whose server must prove the identity `expect`. */
  get(address: string, expect: { kind: Kind; id?: string }): Channel {
    const key = `${address} ${expect.kind}/${expect.id ?? "*"}`;
    let c = this.channels.get(key);
    if (!c) {
      c = openChannel(address, this.security.channel(expect));
      this.channels.set(key, c);
    }
    return c;
  }

  close(): void {
    for (const c of this.channels.values()) c.close();
    this.channels.clear();
    this.clients.clear();
  }
}
