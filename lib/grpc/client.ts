// Client channels shared by every netpurse caller: bounded messages,
// keepalive, a default deadline, and the server's error reason attached to
// the ClientError.

import {
  ClientError,
  createChannel,
  createClientFactory,
  Metadata,
  type Channel,
  type ClientMiddleware,
  type ClientMiddlewareCall,
  type CallOptions,
} from "nice-grpc";
import { deadlineMiddleware, type DeadlineOptions } from "nice-grpc-client-middleware-deadline";
import { reasonFromTrailer, type ReasonedClientError } from "./errors.js";
import { TIMEOUT_METADATA } from "./server.js";

/**
 * nice-grpc enforces deadlines on the client side only; this tells the server
 * the time left too (as grpc-timeout does for grpcurl), so a server can give
 * up before the caller's deadline with a precise error.
 */
const timeoutHeaderMiddleware: ClientMiddleware<{}, DeadlineOptions> = async function* (call, options) {
  if (options.deadline == null) return yield* call.next(call.request, options);
  const left = options.deadline instanceof Date ? options.deadline.getTime() - Date.now() : options.deadline;
  const metadata = Metadata(options.metadata);
  metadata.set(TIMEOUT_METADATA, String(Math.max(0, Math.floor(left))));
  return yield* call.next(call.request, { ...options, metadata });
};

async function* reasonMiddleware<Req, Res>(call: ClientMiddlewareCall<Req, Res>, options: CallOptions) {
  let trailer: import("nice-grpc").Metadata | undefined;
  try {
    return yield* call.next(call.request, {
      ...options,
      onTrailer(t) {
        trailer = t;
        options.onTrailer?.(t);
      },
    });
  } catch (e) {
    if (e instanceof ClientError && trailer) {
      const reason = reasonFromTrailer(trailer);
      if (reason !== undefined) (e as ReasonedClientError).reason = reason;
    }
    throw e;
  }
}

export function openChannel(address: string, opts: { maxMessageBytes?: number } = {}): Channel {
  const max = opts.maxMessageBytes ?? 64 * 1024;
  return createChannel(address, undefined, {
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

/** Client factory: deadlines (sent to the server too) and error reasons. */
export function clientFactory() {
  // The last middleware added runs first.
  return createClientFactory().use(deadlineMiddleware).use(timeoutHeaderMiddleware).use(reasonMiddleware);
}

export const DEFAULT_DEADLINE_MS = 15_000;

/** One channel per address, opened on first use: callers that reach many servers by address (from offers) share connections. */
export class ChannelCache {
  private readonly channels = new Map<string, Channel>();

  get(address: string): Channel {
    let c = this.channels.get(address);
    if (!c) {
      c = openChannel(address);
      this.channels.set(address, c);
    }
    return c;
  }

  close(): void {
    for (const c of this.channels.values()) c.close();
    this.channels.clear();
  }
}
