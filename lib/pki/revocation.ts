// The installation's revocation list, as this process knows it: read at
// start and again whenever the file changes. The TLS handshake checks it for
// new connections; servers also check each new call and their long-lived
// streams against it, since a connection or a stream opened before a
// certificate was revoked would otherwise outlive the revocation.

import "reflect-metadata"; // @peculiar/x509 needs it loaded first
import { X509Crl } from "@peculiar/x509";
import { readFileSync, unwatchFile, watchFile } from "node:fs";

const revoked = new Set<string>();
const watched = new Map<string, Set<(crl: Buffer) => void>>();

function load(path: string): Buffer | undefined {
  try {
    const pem = readFileSync(path);
    const crl = new X509Crl(pem.toString("utf8"));
    for (const e of crl.entries) revoked.add(e.serialNumber.toLowerCase().replace(/^0+/, ""));
    return pem;
  } catch {
    return undefined; // a file being replaced: the next change reads it whole
  }
}

/** Follows a revocation list file; `onChange` gets its new content. Returns a function that stops following. */
export function followRevocationList(path: string, onChange: (crl: Buffer) => void = () => undefined): () => void {
  let listeners = watched.get(path);
  if (!listeners) {
    listeners = new Set();
    watched.set(path, listeners);
    load(path);
    const all = listeners;
    watchFile(path, { interval: 1_000, persistent: false }, () => {
      const crl = load(path);
      if (crl) for (const l of all) l(crl);
    });
  }
  listeners.add(onChange);
  return () => {
    const l = watched.get(path);
    l?.delete(onChange);
    if (l?.size === 0) {
      watched.delete(path);
      unwatchFile(path);
    }
  };
}

/** Whether a certificate serial number (hex, as Node or X.509 tools print it) is on a followed revocation list. */
export function isRevoked(serialHex: string): boolean {
  return revoked.has(serialHex.toLowerCase().replace(/^0+/, ""));
}
