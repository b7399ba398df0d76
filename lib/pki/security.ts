// How a process secures its links, from its command line: TLS with the
// installation's certificates (the default), or plaintext behind an explicit
// --insecure for local debugging. A service holds an identity (its key and
// certificate); a cardholder's process holds only the CA bundle it checks
// servers with.

import { X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { ClientCerts, ClientTls } from "../grpc/tls.js";
import type { Transport } from "../grpc/server.js";
import { pkiPaths, readTlsMaterial, type TlsMaterial } from "./authority.js";
import { DEFAULT_TRUST_DOMAIN, parseSpiffeId, type Identity, type Kind } from "./identity.js";

/** What a channel to a server is given: TLS checking the server (and presenting our identity), or plaintext. */
export type ChannelSecurity = { tls: ClientTls } | { insecure: true };

export class Security {
  private constructor(
    readonly insecure: boolean,
    readonly trustDomain: string,
    private readonly ca: Buffer | undefined,
    private readonly material: TlsMaterial | undefined,
    private readonly crlPath: string | undefined,
    /** This process's own identity, when it has one. */
    readonly identity: Identity | undefined,
  ) {}

  /** No TLS at all (--insecure). */
  static insecure(): Security {
    return new Security(true, DEFAULT_TRUST_DOMAIN, undefined, undefined, undefined, undefined);
  }

  /** A service of the operator's network: its key and certificate for `identity`, the CA and the revocation list, from the PKI folder. */
  static async forService(pkiDir: string, identity: { kind: Kind; id: string }): Promise<Security> {
    const material = await readTlsMaterial(pkiDir, identity);
    const own = new X509Certificate(material.cert);
    const uri = (own.subjectAltName ?? "")
      .split(",")
      .map((s) => s.trim())
      .find((s) => s.startsWith("URI:spiffe://"));
    const id = uri ? parseSpiffeId(uri.slice(4)) : undefined;
    if (!id || id.kind !== identity.kind || id.id !== identity.id) {
      throw new Error(
        `${pkiPaths(pkiDir).cert(identity)} is not the certificate of ${identity.kind}/${identity.id} (it names ${own.subjectAltName ?? "nothing"})`,
      );
    }
    return new Security(false, id.trustDomain, material.ca, material, pkiPaths(pkiDir).crl, id);
  }

  /** A cardholder's process: only the CA bundle its servers' certificates must chain to. */
  static async forCardholder(caFile: string, trustDomain = DEFAULT_TRUST_DOMAIN): Promise<Security> {
    let ca: Buffer;
    try {
      ca = await readFile(caFile);
    } catch {
      throw new Error(`the CA bundle ${caFile} is missing: give --ca FILE (the installation's ca.crt), or --insecure for a plaintext network`);
    }
    return new Security(false, trustDomain, ca, undefined, undefined, undefined);
  }

  /** The transport of a server this process runs. */
  server(clientCerts: ClientCerts): Transport {
    if (this.insecure) return { insecure: true };
    if (!this.material) throw new Error("a server needs its own key and certificate (it has only a CA bundle)");
    return {
      tls: {
        material: this.material,
        ...(this.crlPath ? { crlPath: this.crlPath } : {}),
        clientCerts,
        trustDomain: this.trustDomain,
      },
    };
  }

  /** This process's key and certificate as a channel presents them (for tests that mix authorities). */
  clientIdentity(): { cert: Buffer; key: Buffer } {
    if (!this.material) throw new Error("this process holds no identity");
    return { cert: this.material.cert, key: this.material.key };
  }

  /** The security of a channel to a server that must prove `expect` (a kind, and an id when it matters). */
  channel(expect?: { kind: Kind; id?: string }): ChannelSecurity {
    if (this.insecure) return { insecure: true };
    if (!this.ca) throw new Error("no CA to check servers with");
    return {
      tls: {
        ca: this.ca,
        ...(this.material ? { identity: { cert: this.material.cert, key: this.material.key } } : {}),
        ...(expect ? { expect: { trustDomain: this.trustDomain, ...expect } } : {}),
      },
    };
  }
}

/** The PKI folder of a data folder. */
export const pkiDirOf = (dataDir: string) => join(dataDir, "pki");
