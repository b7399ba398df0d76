// nice-grpc service implementations served by a grpc-js Server that netpurse
// owns. nice-grpc's createServer() keeps its grpc-js Server to itself, and
// with it the one door through which a server can take its connections from
// a listener of its own (grpc-js's connection injector): netpurse needs that
// door to cap connections and bound handshakes. So the services are adapted
// here with nice-grpc's own per-call handlers, exactly as its listen() does.
// Those handlers are internal to nice-grpc (pinned by the lock file); their
// presence is checked when this module loads, so an upgrade that moves them
// fails at start, loudly, not at the first call.

import * as grpc from "@grpc/grpc-js";
import type { CompatServiceDefinition, ServerMiddleware } from "nice-grpc";
import { createRequire } from "node:module";

interface MethodDefinition {
  path: string;
  requestStream: boolean;
  responseStream: boolean;
}

type HandlerFactory = (definition: MethodDefinition, implementation: (...args: never[]) => unknown, middleware?: ServerMiddleware) => grpc.UntypedHandleCall;

const require = createRequire(import.meta.url);

function load<T>(module: string, name: string): T {
  const f = (require(module) as Record<string, unknown>)[name];
  if (typeof f !== "function") throw new Error(`nice-grpc changed: ${module} has no ${name}; netpurse's server adapter needs updating`);
  return f as T;
}

const handlers = {
  unary: load<HandlerFactory>("nice-grpc/lib/server/handleUnaryCall.js", "createUnaryMethodHandler"),
  serverStreaming: load<HandlerFactory>("nice-grpc/lib/server/handleServerStreamingCall.js", "createServerStreamingMethodHandler"),
  clientStreaming: load<HandlerFactory>("nice-grpc/lib/server/handleClientStreamingCall.js", "createClientStreamingMethodHandler"),
  bidiStreaming: load<HandlerFactory>("nice-grpc/lib/server/handleBidiStreamingCall.js", "createBidiStreamingMethodHandler"),
};
const normalize = load<(d: CompatServiceDefinition) => Record<string, MethodDefinition>>(
  "nice-grpc/lib/service-definitions/index.js",
  "normalizeServiceDefinition",
);
const toGrpcJs = load<(d: Record<string, MethodDefinition>) => grpc.ServiceDefinition>(
  "nice-grpc/lib/service-definitions/index.js",
  "toGrpcJsServiceDefinition",
);

/** Adds a nice-grpc service implementation to a grpc-js server, every call going through `middleware`. */
export function addService(server: grpc.Server, definition: CompatServiceDefinition, implementation: object, middleware: ServerMiddleware): void {
  const methods = normalize(definition);
  const impl = implementation as Record<string, (...args: never[]) => unknown>;
  const grpcImplementation: grpc.UntypedServiceImplementation = {};
  for (const [name, method] of Object.entries(methods)) {
    const fn = impl[name];
    if (typeof fn !== "function") throw new Error(`${method.path}: no implementation of ${name}`);
    const bound = fn.bind(implementation);
    const factory = method.requestStream
      ? method.responseStream
        ? handlers.bidiStreaming
        : handlers.clientStreaming
      : method.responseStream
        ? handlers.serverStreaming
        : handlers.unary;
    grpcImplementation[name] = factory(method, bound, middleware);
  }
  server.addService(toGrpcJs(methods), grpcImplementation);
}
