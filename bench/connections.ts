// The TCP connections between the benchmark's processes, from what Linux
// shows in /proc: which process holds each socket (/proc/PID/fd), and which
// sockets listen and which are connected (/proc/net/tcp, tcp6). A connection
// from process A to a port process B listens on is a link A → B. Counted
// when the measuring window opens and when it closes: a connection found at
// the close and not at the open was opened (and, with TLS, handshaken)
// inside the window. Elsewhere than Linux there is nothing to read and the
// counts are undefined.

import { readdirSync, readFileSync, readlinkSync } from "node:fs";

export interface Link {
  /** The process that opened the connections, and the one that accepted them. */
  from: string;
  to: string;
  connections: number;
}

export interface ConnectionCounts {
  /** Connections between the processes when the window closed, by client → server process. */
  links: Link[];
  /** Their sum. */
  open: number;
  /** Connections open at the close that were not open at the open: each a TLS handshake when TLS is on. */
  openedInWindow: number;
}

const LISTEN = "0A";
const ESTABLISHED = "01";

interface Socket {
  localPort: number;
  remotePort: number;
  state: string;
  inode: string;
}

/** Sockets of /proc/net/tcp and tcp6 (the host's, which every process of the run shares). */
function sockets(): Socket[] {
  const out: Socket[] = [];
  for (const file of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    let text: string;
    try {
      text = readFileSync(file, "utf8");
    } catch {
      continue;
    }
    // "sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...", addresses as hex IP:port.
    for (const line of text.split("\n").slice(1)) {
      const [, local = "", remote = "", state = "", , , , , , inode = ""] = line.trim().split(/\s+/);
      if (!inode) continue;
      const port = (address: string) => parseInt(address.slice(address.lastIndexOf(":") + 1), 16);
      out.push({ localPort: port(local), remotePort: port(remote), state, inode });
    }
  }
  return out;
}

/** Socket inode → the name of the process holding it, for the given processes. */
function owners(processes: Map<string, number>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [name, pid] of processes) {
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        const inode = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1];
        if (inode) out.set(inode, name);
      } catch {
        // closed meanwhile
      }
    }
  }
  return out;
}

/** The connections between `processes` now, each as "client port → server port" with its link. */
function snapshot(processes: Map<string, number>): Map<string, { from: string; to: string }> {
  const all = sockets();
  const owner = owners(processes);
  const listener = new Map<number, string>();
  for (const s of all) {
    const name = owner.get(s.inode);
    if (s.state === LISTEN && name) listener.set(s.localPort, name);
  }
  const out = new Map<string, { from: string; to: string }>();
  for (const s of all) {
    const from = owner.get(s.inode);
    const to = listener.get(s.remotePort);
    // The client's end: its remote port is a server's listening port (the server's end has the client's ephemeral port there).
    if (s.state === ESTABLISHED && from && to) out.set(`${s.localPort}→${s.remotePort}`, { from, to });
  }
  return out;
}

/** Counts the connections between processes at the window's open and close (the `window` hooks of closedLoop). */
export class ConnectionSampler {
  private first: Map<string, { from: string; to: string }> | undefined;
  private last: Map<string, { from: string; to: string }> | undefined;

  constructor(private readonly pids: () => Map<string, number>) {}

  opened(): void {
    this.first = snapshot(this.pids());
  }

  closed(): void {
    this.last = snapshot(this.pids());
  }

  counts(): ConnectionCounts | undefined {
    if (!this.first || !this.last || this.last.size === 0) return undefined;
    const byLink = new Map<string, Link>();
    for (const { from, to } of this.last.values()) {
      const key = `${from} ${to}`;
      const link = byLink.get(key) ?? { from, to, connections: 0 };
      link.connections++;
      byLink.set(key, link);
    }
    const first = this.first;
    return {
      links: [...byLink.values()].sort((a, b) => a.from.localeCompare(b.from) || a.to.localeCompare(b.to)),
      open: this.last.size,
      openedInWindow: [...this.last.keys()].filter((k) => !first.has(k)).length,
    };
  }
}
