// Replicas behind one target: a list of addresses or a DNS name, balanced
// call by call with grpc-js's round_robin, skipping a replica whose health
// says it cannot serve, or that is down.
//
// grpc-js 1.14 balances (pick_first, round_robin) but does not implement
// client-side health checking (gRFC A17: it ignores `healthCheckConfig` in a
// service config). The load-balancing policy registered here adds it, through
// grpc-js's load-balancer API: it wraps each subchannel that its child policy
// (round_robin) makes, watches grpc.health.v1.Health/Watch over that
// subchannel's own connection, holds the subchannel in CONNECTING until the
// first answer, and marks it unhealthy while the answer is not SERVING, which
// round_robin treats as a failed backend (the mechanism of grpc-js's own
// outlier detection). It also names each listed backend for TLS by its own
// address, since a channel has one name and replicas at several addresses
// do not share one.

import * as grpc from "@grpc/grpc-js";
import { ClientError, createClient, Status } from "nice-grpc";
import { HealthDefinition } from "nice-grpc-server-health";
import { HealthCheckResponse_ServingStatus } from "nice-grpc-server-health/lib/proto/grpc/health/v1/health.js";
import { isIPv4, isIPv6 } from "node:net";
import { resolve as resolvePath } from "node:path";

type SubchannelInterface = grpc.experimental.SubchannelInterface;
type ConnectivityStateListener = grpc.experimental.ConnectivityStateListener;
type TypedLoadBalancingConfig = grpc.experimental.TypedLoadBalancingConfig;
const State = grpc.connectivityState;

/** A backend of a list: an IP address and its port. */
export interface Backend {
  host: string;
  port: number;
}

/**
 * What an address names: one server at host:port (as given, passed to grpc-js
 * unchanged), a Unix socket, a DNS name whose every address is a replica, or
 * a list of replicas by IP address.
 */
export type Target =
  | { kind: "address"; address: string }
  | { kind: "unix"; path: string }
  | { kind: "dns"; host: string; port: number }
  | { kind: "list"; family: "ipv4" | "ipv6"; backends: Backend[] };

/** An address that names no server, with what is wrong with it. */
export class InvalidTarget extends Error {
  override name = "InvalidTarget";
}

/** The path of a `unix:PATH` or `unix:///ABSOLUTE_PATH` address (gRPC's names for a Unix domain socket), made absolute; undefined for anything else. */
export function unixSocketPath(address: string): string | undefined {
  if (address.startsWith("unix://")) return resolvePath(address.slice("unix://".length));
  if (address.startsWith("unix:")) return resolvePath(address.slice("unix:".length));
  return undefined;
}

function port(text: string, where: string): number {
  const n = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(n >= 1 && n <= 65_535)) throw new InvalidTarget(`${where}: the port must be 1..65535, not ${JSON.stringify(text)}`);
  return n;
}

/** host:port or [v6]:port, the port required. */
function hostPort(entry: string, where: string): { host: string; port: number } {
  const [, host, portText] = /^\[([^\]]+)\]:([^:]*)$/.exec(entry) ?? /^([^:[\]]+):([^:]*)$/.exec(entry) ?? [];
  if (host === undefined || portText === undefined)
    throw new InvalidTarget(`${where}: ${JSON.stringify(entry)} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:7420)`);
  return { host, port: port(portText, where) };
}

function listed(entries: string[], family: "ipv4" | "ipv6" | undefined, address: string): Target {
  const backends: Backend[] = [];
  let listFamily = family;
  for (const raw of entries) {
    const entry = raw.trim();
    if (entry === "") throw new InvalidTarget(`${address}: an empty entry in the list`);
    const hp = hostPort(entry, address);
    // localhost is where a test or `npm start` runs its replicas; servers listen on 127.0.0.1 by default.
    const host = hp.host === "localhost" ? "127.0.0.1" : hp.host;
    const f = isIPv4(host) ? "ipv4" : isIPv6(host) ? "ipv6" : undefined;
    if (!f)
      throw new InvalidTarget(
        `${address}: ${hp.host} is not an IP address; a list names its servers by IP address (or localhost), and a DNS name with several addresses is dns:///NAME:PORT`,
      );
    if (family && f !== family) throw new InvalidTarget(`${address}: ${hp.host} is not an ${family === "ipv4" ? "IPv4" : "IPv6"} address`);
    // grpc-js resolves a list of one family at a time (its ipv4: and ipv6: schemes).
    if (listFamily && f !== listFamily) throw new InvalidTarget(`${address}: a list holds IPv4 or IPv6 addresses, not both`);
    listFamily = f;
    if (backends.some((b) => b.host === host && b.port === hp.port)) throw new InvalidTarget(`${address}: ${entry} is listed twice`);
    backends.push({ host, port: hp.port });
  }
  return { kind: "list", family: listFamily ?? "ipv4", backends };
}

/**
 * Parses a server address: `HOST:PORT` (one server, as always), `unix:PATH`,
 * `dns:///NAME:PORT` (every address the name resolves to),
 * `IP:PORT,IP:PORT,…` (localhost allowed, IPv6 in brackets) or grpc-js's
 * `ipv4:IP:PORT,…` and `ipv6:[IP]:PORT,…`. Throws InvalidTarget, saying
 * what is wrong.
 */
export function parseTarget(address: string): Target {
  const socket = unixSocketPath(address);
  if (socket !== undefined) return { kind: "unix", path: socket };
  if (address.startsWith("dns:")) {
    const rest = address.startsWith("dns:///") ? address.slice("dns:///".length) : address.slice("dns:".length);
    if (rest.startsWith("//")) throw new InvalidTarget(`${address}: a DNS server of its own (dns://SERVER/NAME:PORT) is not supported; use dns:///NAME:PORT`);
    const hp = hostPort(rest, address);
    return { kind: "dns", ...hp };
  }
  if (address.startsWith("ipv4:") || address.startsWith("ipv6:")) {
    return listed(address.slice(5).split(","), address.startsWith("ipv4:") ? "ipv4" : "ipv6", address);
  }
  if (address.includes(",")) return listed(address.split(","), undefined, address);
  return { kind: "address", address };
}

/** Whether a target may reach several replicas, and so is balanced and health-checked. */
export const isReplicated = (t: Target): t is Extract<Target, { kind: "dns" | "list" }> => t.kind === "dns" || t.kind === "list";

const hostText = (host: string) => (isIPv6(host) ? `[${host}]` : host);

/** The target string grpc-js resolves. */
export function grpcTarget(t: Target): string {
  switch (t.kind) {
    case "address":
      return t.address;
    case "unix":
      // unix:///ABSOLUTE_PATH, the form nice-grpc passes on unchanged.
      return `unix://${t.path}`;
    case "dns":
      return `dns:///${hostText(t.host)}:${t.port}`;
    case "list":
      return `${t.family}:${t.backends.map((b) => `${hostText(b.host)}:${b.port}`).join(",")}`;
  }
}

/** TLS names no server by an IP address (RFC 6066): on loopback the certificate's "localhost" is the name checked. */
export const isLoopback = (host: string) => host === "127.0.0.1" || host === "::1" || host === "[::1]";

/** The name a backend's certificate must carry when it is dialled at `host`: the host itself, or localhost on loopback. */
export const tlsNameOf = (host: string) => (isLoopback(host) ? "localhost" : host);

/** The load-balancing policy registered below. */
export const REPLICAS_POLICY = "netpurse_replicas";

/**
 * The service config of a replicated target: round_robin under the policy
 * that health-checks each backend for `healthService` (the empty name: the
 * server as a whole), and, for a list, names each backend for TLS by its
 * address.
 */
export function replicasServiceConfig(t: Extract<Target, { kind: "dns" | "list" }>, healthService: string): string {
  return JSON.stringify({
    loadBalancingConfig: [
      {
        [REPLICAS_POLICY]: { healthCheckConfig: { serviceName: healthService }, nameBackendsByAddress: t.kind === "list", childPolicy: [{ round_robin: {} }] },
      },
    ],
  });
}

/** How long a backend may take to give its first health answer before it counts as unhealthy for a while. */
const FIRST_ANSWER_MS = 5_000;
/** Waits before watching a backend's health again after the watch failed: as the channel's reconnect back-off. */
const WATCH_BACKOFF_MS = { first: 250, max: 1_000 };

/**
 * A subchannel whose health is watched while it is connected: CONNECTING
 * until the first answer (so no call goes to a backend of unknown health
 * while another is known to serve), then READY, and unhealthy whenever the
 * answer is not SERVING or the watch fails (until it is watched again). A
 * server without a health service (UNIMPLEMENTED) counts as serving, as A17
 * says.
 */
class HealthCheckedSubchannel extends grpc.experimental.BaseSubchannelWrapper {
  private readonly listeners = new Set<ConnectivityStateListener>();
  private reported: grpc.connectivityState;
  /** Whether the backend has answered on this connection. */
  private answered = false;
  private watching: AbortController | undefined;
  private retry: NodeJS.Timeout | undefined;
  private backoffMs = WATCH_BACKOFF_MS.first;
  private destroyed = false;
  private keepaliveTime = 0;
  private readonly childListener: ConnectivityStateListener = (_subchannel, _previous, next, keepaliveTime, errorMessage) => {
    this.keepaliveTime = keepaliveTime;
    this.onChildState(next, errorMessage);
  };

  constructor(
    child: SubchannelInterface,
    private readonly serviceName: string,
  ) {
    super(child);
    this.reported = this.translate(child.getConnectivityState());
    child.addConnectivityStateListener(this.childListener);
    if (child.getConnectivityState() === State.READY) this.watch();
  }

  /** The subchannel this one wraps, which a picker hands on (grpc-js's rule for policies that wrap). */
  wrapped(): SubchannelInterface {
    return this.child;
  }

  private translate(state: grpc.connectivityState): grpc.connectivityState {
    return state === State.READY && !this.answered ? State.CONNECTING : state;
  }

  override getConnectivityState(): grpc.connectivityState {
    return this.reported;
  }
  override addConnectivityStateListener(listener: ConnectivityStateListener): void {
    this.listeners.add(listener);
  }
  override removeConnectivityStateListener(listener: ConnectivityStateListener): void {
    this.listeners.delete(listener);
  }

  private report(state: grpc.connectivityState, errorMessage?: string): void {
    if (state === this.reported) return;
    const previous = this.reported;
    this.reported = state;
    for (const l of [...this.listeners]) l(this, previous, state, this.keepaliveTime, errorMessage);
  }

  private onChildState(state: grpc.connectivityState, errorMessage?: string): void {
    if (this.destroyed) return;
    if (state === State.READY) {
      this.answered = false;
      this.watch();
    } else {
      this.stopWatching();
      this.answered = false;
      // Health belongs to a connection: the next one starts unknown (CONNECTING until its first answer).
      this.setHealthy(true);
    }
    this.report(this.translate(state), errorMessage);
  }

  private onHealth(serving: boolean): void {
    if (this.destroyed) return;
    this.answered = true;
    this.setHealthy(serving);
    this.report(this.translate(this.child.getConnectivityState()));
  }

  private stopWatching(): void {
    const w = this.watching;
    this.watching = undefined;
    w?.abort();
    clearTimeout(this.retry);
    this.retry = undefined;
  }

  private watch(): void {
    if (this.destroyed || this.watching || this.retry) return;
    const abort = new AbortController();
    this.watching = abort;
    // watchUntilEnd handles the watch's own failures; anything else leaves the replica unhealthy rather than unhandled.
    this.watchUntilEnd(abort).catch(() => this.onHealth(false));
  }

  private async watchUntilEnd(abort: AbortController): Promise<void> {
    // nice-grpc types its channel as grpc-js's Channel class; it only hands it to grpc-js as channelOverride, which takes any Channel.
    const health = createClient(HealthDefinition, this.child.getChannel() as grpc.Channel);
    const silent = setTimeout(() => abort.abort(), FIRST_ANSWER_MS);
    silent.unref();
    try {
      for await (const answer of health.watch({ service: this.serviceName }, { signal: abort.signal })) {
        clearTimeout(silent);
        this.backoffMs = WATCH_BACKOFF_MS.first;
        this.onHealth(answer.status === HealthCheckResponse_ServingStatus.SERVING);
      }
    } catch (e) {
      if (this.watching === abort && e instanceof ClientError && e.code === Status.UNIMPLEMENTED) {
        clearTimeout(silent);
        this.onHealth(true);
        return; // no health service: serving while connected; `watching` stays set, so it is not asked again on this connection
      }
    } finally {
      clearTimeout(silent);
    }
    if (this.watching !== abort) return; // stopped: disconnected or destroyed
    // The watch failed or the server ended it: unhealthy until it answers again.
    this.watching = undefined;
    this.onHealth(false);
    this.retry = setTimeout(() => {
      this.retry = undefined;
      if (this.child.getConnectivityState() === State.READY) this.watch();
    }, this.backoffMs);
    this.retry.unref();
    this.backoffMs = Math.min(this.backoffMs * 2, WATCH_BACKOFF_MS.max);
  }

  override ref(): void {
    if (this.destroyed) {
      this.destroyed = false;
      this.child.addConnectivityStateListener(this.childListener);
      this.onChildState(this.child.getConnectivityState());
    }
    super.ref();
  }

  protected override destroy(): void {
    super.destroy();
    this.destroyed = true;
    this.stopWatching();
    this.child.removeConnectivityStateListener(this.childListener);
  }
}

/** Hands on the subchannel each wrapper wraps, as grpc-js requires of a policy that wraps subchannels. */
class UnwrappingPicker implements grpc.experimental.Picker {
  constructor(private readonly inner: grpc.experimental.Picker) {}
  pick(args: grpc.experimental.PickArgs): grpc.experimental.PickResult {
    const r = this.inner.pick(args);
    return r.subchannel instanceof HealthCheckedSubchannel ? { ...r, subchannel: r.subchannel.wrapped() } : r;
  }
}

class ReplicasConfig implements TypedLoadBalancingConfig {
  constructor(
    readonly serviceName: string,
    readonly nameBackendsByAddress: boolean,
    readonly childPolicy: TypedLoadBalancingConfig,
  ) {}
  getLoadBalancerName(): string {
    return REPLICAS_POLICY;
  }
  toJsonObject(): object {
    return {
      [REPLICAS_POLICY]: {
        healthCheckConfig: { serviceName: this.serviceName },
        nameBackendsByAddress: this.nameBackendsByAddress,
        childPolicy: [this.childPolicy.toJsonObject()],
      },
    };
  }
  static createFromJson(obj: unknown): ReplicasConfig {
    const o = (obj ?? {}) as { healthCheckConfig?: { serviceName?: unknown }; nameBackendsByAddress?: unknown; childPolicy?: unknown };
    const serviceName = o.healthCheckConfig?.serviceName ?? "";
    if (typeof serviceName !== "string") throw new Error("healthCheckConfig.serviceName must be a string");
    if (!Array.isArray(o.childPolicy)) throw new Error("childPolicy must be a list of load-balancing configs");
    const child = grpc.experimental.selectLbConfigFromList(o.childPolicy as Parameters<typeof grpc.experimental.selectLbConfigFromList>[0]);
    if (!child) throw new Error("no childPolicy that grpc-js knows");
    return new ReplicasConfig(serviceName, o.nameBackendsByAddress === true, child);
  }
}

class ReplicasBalancer implements grpc.experimental.LoadBalancer {
  private readonly child: grpc.experimental.ChildLoadBalancerHandler;
  private config: ReplicasConfig | undefined;

  constructor(helper: grpc.experimental.ChannelControlHelper) {
    this.child = new grpc.experimental.ChildLoadBalancerHandler(
      grpc.experimental.createChildChannelControlHelper(helper, {
        createSubchannel: (address, args) => {
          // Each listed backend proves the name it is dialled by, as a single address would.
          const named = this.config?.nameBackendsByAddress && "host" in address ? { ...args, "grpc.ssl_target_name_override": tlsNameOf(address.host) } : args;
          return new HealthCheckedSubchannel(helper.createSubchannel(address, named), this.config?.serviceName ?? "");
        },
        updateState: (state, picker, errorMessage) => helper.updateState(state, state === State.READY ? new UnwrappingPicker(picker) : picker, errorMessage),
      }),
    );
  }

  updateAddressList(
    endpoints: grpc.experimental.StatusOr<grpc.experimental.Endpoint[]>,
    config: TypedLoadBalancingConfig,
    options: grpc.ChannelOptions,
    resolutionNote: string,
  ): boolean {
    if (!(config instanceof ReplicasConfig)) return false;
    this.config = config;
    return this.child.updateAddressList(endpoints, config.childPolicy, options, resolutionNote);
  }
  exitIdle(): void {
    this.child.exitIdle();
  }
  resetBackoff(): void {
    this.child.resetBackoff();
  }
  destroy(): void {
    this.child.destroy();
  }
  getTypeName(): string {
    return REPLICAS_POLICY;
  }
}

grpc.experimental.registerLoadBalancerType(REPLICAS_POLICY, ReplicasBalancer, ReplicasConfig);
