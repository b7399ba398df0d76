// TLS for netpurse's gRPC links: server credentials that ask for (or
// require) a client certificate from the installation's CA, check it against
// the revocation list (reloaded when the file changes), and bound the
// handshake; and channel credentials that check the server's certificate
// and, inside the operator's network, its SPIFFE identity, presenting the
// caller's own certificate.

import * as grpc from "@grpc/grpc-js";
import { checkServerIdentity, type PeerCertificate } from "node:tls";
import type { TlsMaterial } from "../pki/authority.js";
import { identityFromSubjectAltName, type Kind } from "../pki/identity.js";
import { followRevocationList } from "../pki/revocation.js";

/** Whether a server asks its peers for a certificate: always (inside the operator's network) or optionally (public endpoints that some internal peers also call). */
export type ClientCerts = "require" | "request";

export interface ServerTls {
  material: TlsMaterial;
  /** The revocation list's file, reloaded when it changes. */
  crlPath?: string;
  clientCerts: ClientCerts;
  trustDomain: string;
}

export interface ClientTls {
  /** The CA bundle the server's certificate must chain to. */
  ca: Buffer;
  /** The caller's own key and certificate, inside the operator's network. */
  identity?: { cert: Buffer; key: Buffer };
  /** The kind (and id) of SPIFFE identity the server must prove. */
  expect?: { trustDomain: string; kind: Kind; id?: string };
}

/** grpc-js server credentials with netpurse's options; the secure context is replaced when the revocation list changes. */
class NetpurseServerCredentials extends grpc.ServerCredentials {
  private context: { ca: Buffer; cert: Buffer[]; key: Buffer[]; crl: Buffer };
  private readonly unfollow: () => void;

  constructor(tls: ServerTls, handshakeTimeoutMs: number) {
    const context = { ca: tls.material.ca, cert: [tls.material.cert], key: [tls.material.key], crl: tls.material.crl };
    super(
      {
        requestCert: true,
        rejectUnauthorized: tls.clientCerts === "require",
        handshakeTimeout: handshakeTimeoutMs,
        minVersion: "TLSv1.2",
      },
      context,
    );
    this.context = context;
    this.unfollow = tls.crlPath
      ? followRevocationList(tls.crlPath, (crl) => {
          this.context = { ...this.context, crl };
          this.updateSecureContextOptions(this.context);
        })
      : () => undefined;
  }

  stop(): void {
    this.unfollow();
  }

  _equals(other: grpc.ServerCredentials): boolean {
    return other === this;
  }
}

/** Server credentials for `tls`; a TLS handshake not finished within `handshakeTimeoutMs` is cut. */
export function serverCredentials(tls: ServerTls, handshakeTimeoutMs: number): grpc.ServerCredentials & { stop(): void } {
  return new NetpurseServerCredentials(tls, handshakeTimeoutMs);
}

/** Channel credentials: the server's certificate must chain to `ca`, name the host dialled, and (when expected) carry the SPIFFE identity. */
export function channelCredentials(tls: ClientTls): grpc.ChannelCredentials {
  return grpc.credentials.createSsl(tls.ca, tls.identity?.key ?? null, tls.identity?.cert ?? null, {
    checkServerIdentity: (host: string, cert: PeerCertificate) => {
      const hostError = checkServerIdentity(host, cert);
      if (hostError) return hostError;
      if (!tls.expect) return undefined;
      const id = identityFromSubjectAltName(cert.subjectaltname, tls.expect.trustDomain);
      if (!id || id.kind !== tls.expect.kind || (tls.expect.id !== undefined && id.id !== tls.expect.id)) {
        const want = `spiffe://${tls.expect.trustDomain}/${tls.expect.kind}/${tls.expect.id ?? "*"}`;
        return new Error(`the server at ${host} is not ${want} (its certificate names ${cert.subjectaltname ?? "no identity"})`);
      }
      return undefined;
    },
  });
}
