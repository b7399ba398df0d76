// The installation's certificate authority: a CA key and certificate, a key
// and certificate per service carrying its SPIFFE ID, and a certificate
// revocation list. All X.509 work is done by @peculiar/x509 over Node's
// WebCrypto (ECDSA P-256, SHA-256); keys are PKCS#8 PEM files of mode 0600.
//
// DATA/pki/ca.crt, ca.key           the authority
// DATA/pki/<kind>/<id>.crt, .key    one per service identity
// DATA/pki/crl.pem                  revoked certificates, signed by the CA
// DATA/pki/index.json               every certificate issued, for listing and revoking

import "reflect-metadata"; // @peculiar/x509 needs it loaded first
import * as x509 from "@peculiar/x509";
import { webcrypto, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { readJson, writeFileAtomic, writeJsonAtomic } from "../files.js";
import { DEFAULT_TRUST_DOMAIN, requireIdentity, spiffeId, type Identity } from "./identity.js";

x509.cryptoProvider.set(webcrypto);

const KEY_ALGORITHM = { name: "ECDSA", namedCurve: "P-256" } as const;
const SIGNING_ALGORITHM = { name: "ECDSA", hash: "SHA-256" } as const;
const DAY_MS = 86_400_000;

/** How long certificates are valid unless told otherwise. */
export const DEFAULT_VALIDITY_DAYS = { ca: 3650, service: 365 } as const;

/** Why a certificate is revoked (RFC 5280 reason codes; "unspecified" is written without a code). */
export const REVOCATION_REASONS = {
  unspecified: undefined,
  "key-compromise": x509.X509CrlReason.keyCompromise,
  superseded: x509.X509CrlReason.superseded,
  "cessation-of-operation": x509.X509CrlReason.cessationOfOperation,
  "affiliation-changed": x509.X509CrlReason.affiliationChanged,
} as const;
export type RevocationReason = keyof typeof REVOCATION_REASONS;

export interface IssuedEntry {
  serial: string;
  spiffeId: string;
  kind: string;
  id: string;
  notAfter: string;
  revoked?: { at: string; reason: string };
}

interface Index {
  trustDomain: string;
  issued: IssuedEntry[];
}

export interface TlsMaterial {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  crl: Buffer;
}

export const pkiPaths = (dir: string) => ({
  caCert: join(dir, "ca.crt"),
  caKey: join(dir, "ca.key"),
  crl: join(dir, "crl.pem"),
  index: join(dir, "index.json"),
  cert: (i: Pick<Identity, "kind" | "id">) => join(dir, i.kind, `${i.id}.crt`),
  key: (i: Pick<Identity, "kind" | "id">) => join(dir, i.kind, `${i.id}.key`),
});

const serial = () => {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f; // a positive INTEGER
  return b.toString("hex");
};

async function exportKey(key: webcrypto.CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await webcrypto.subtle.exportKey("pkcs8", key), "PRIVATE KEY");
}

async function importKey(pem: string): Promise<webcrypto.CryptoKey> {
  return webcrypto.subtle.importKey("pkcs8", x509.PemConverter.decodeFirst(pem), KEY_ALGORITHM, true, ["sign"]);
}

async function newKeys(): Promise<webcrypto.CryptoKeyPair> {
  return webcrypto.subtle.generateKey(KEY_ALGORITHM, true, ["sign", "verify"]);
}

export class CertificateAuthority {
  private constructor(
    readonly dir: string,
    readonly trustDomain: string,
    private readonly cert: x509.X509Certificate,
    private readonly key: webcrypto.CryptoKey,
  ) {}

  static exists(dir: string): boolean {
    return existsSync(pkiPaths(dir).caCert) && existsSync(pkiPaths(dir).caKey);
  }

  /** Makes a new authority in `dir`; refuses to replace one (that would cut off every service). */
  static async init(dir: string, o: { trustDomain?: string; validityDays?: number } = {}): Promise<CertificateAuthority> {
    const p = pkiPaths(dir);
    if (CertificateAuthority.exists(dir)) throw new Error(`${dir} already holds a certificate authority; remove it first to make a new one`);
    const trustDomain = o.trustDomain ?? DEFAULT_TRUST_DOMAIN;
    const keys = await newKeys();
    const now = new Date();
    const cert = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: serial(),
      name: `CN=netpurse installation CA, O=${trustDomain}`,
      notBefore: new Date(now.getTime() - 60_000),
      notAfter: new Date(now.getTime() + (o.validityDays ?? DEFAULT_VALIDITY_DAYS.ca) * DAY_MS),
      signingAlgorithm: SIGNING_ALGORITHM,
      keys,
      extensions: [
        new x509.BasicConstraintsExtension(true, 0, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      ],
    });
    await writeFileAtomic(p.caKey, await exportKey(keys.privateKey), { private: true });
    await writeFileAtomic(p.caCert, cert.toString("pem"));
    await writeJsonAtomic(p.index, { trustDomain, issued: [] } satisfies Index);
    const ca = new CertificateAuthority(dir, trustDomain, cert, keys.privateKey);
    await ca.writeCrl([]);
    return ca;
  }

  static async open(dir: string): Promise<CertificateAuthority> {
    const p = pkiPaths(dir);
    if (!CertificateAuthority.exists(dir)) throw new Error(`no certificate authority in ${dir}; make one with 'netpurse-operator pki init'`);
    const index = await readJson<Index>(p.index);
    return new CertificateAuthority(
      dir,
      index.trustDomain,
      new x509.X509Certificate(await readFile(p.caCert, "utf8")),
      await importKey(await readFile(p.caKey, "utf8")),
    );
  }

  /**
   * Issues a key and certificate for a service identity: its SPIFFE ID as
   * the URI SAN, and localhost / 127.0.0.1 (plus `hosts`) so that clients
   * can check the server's name too. Usable as server and as client.
   */
  async issue(identity: Omit<Identity, "trustDomain">, o: { validityDays?: number; hosts?: string[] } = {}): Promise<IssuedEntry> {
    const id = requireIdentity(identity.kind, identity.id, this.trustDomain);
    const keys = await newKeys();
    const now = new Date();
    const names: x509.JsonGeneralName[] = [
      { type: "url", value: spiffeId(id) },
      { type: "dns", value: "localhost" },
      { type: "ip", value: "127.0.0.1" },
    ];
    for (const h of o.hosts ?? []) names.push(/^[\d.]+$|:/.test(h) ? { type: "ip", value: h } : { type: "dns", value: h });
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serial(),
      subject: `CN=${id.kind}/${id.id}, O=${this.trustDomain}`,
      issuer: this.cert.subject,
      notBefore: new Date(now.getTime() - 60_000),
      notAfter: new Date(now.getTime() + (o.validityDays ?? DEFAULT_VALIDITY_DAYS.service) * DAY_MS),
      signingAlgorithm: SIGNING_ALGORITHM,
      publicKey: keys.publicKey,
      signingKey: this.key,
      extensions: [
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyAgreement, true),
        new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
        new x509.SubjectAlternativeNameExtension(names, false),
        await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
        await x509.AuthorityKeyIdentifierExtension.create(this.cert),
      ],
    });
    const p = pkiPaths(this.dir);
    await writeFileAtomic(p.key(id), await exportKey(keys.privateKey), { private: true });
    await writeFileAtomic(p.cert(id), cert.toString("pem"));
    const entry: IssuedEntry = { serial: cert.serialNumber, spiffeId: spiffeId(id), kind: id.kind, id: id.id, notAfter: cert.notAfter.toISOString() };
    const index = await this.index();
    index.issued.push(entry);
    await writeJsonAtomic(p.index, index);
    return entry;
  }

  /** Revokes every certificate issued to an identity (or one serial), and publishes the new CRL. */
  async revoke(what: { kind: string; id: string } | { serial: string }, reason: RevocationReason): Promise<IssuedEntry[]> {
    const index = await this.index();
    const hit = index.issued.filter((e) => !e.revoked && ("serial" in what ? e.serial === what.serial : e.kind === what.kind && e.id === what.id));
    const at = new Date().toISOString();
    for (const e of hit) e.revoked = { at, reason };
    await writeJsonAtomic(pkiPaths(this.dir).index, index);
    await this.writeCrl(index.issued.filter((e) => e.revoked));
    return hit;
  }

  async list(): Promise<IssuedEntry[]> {
    return (await this.index()).issued;
  }

  private async index(): Promise<Index> {
    return readJson<Index>(pkiPaths(this.dir).index);
  }

  private async writeCrl(revoked: IssuedEntry[]): Promise<void> {
    const now = new Date();
    const crl = await x509.X509CrlGenerator.create({
      issuer: this.cert.subject,
      thisUpdate: now,
      // TLS refuses every certificate once a CRL is past its nextUpdate: the list stays current as long as the CA,
      // and is re-signed at each revocation.
      nextUpdate: this.cert.notAfter,
      signingAlgorithm: SIGNING_ALGORITHM,
      signingKey: this.key,
      extensions: [await x509.AuthorityKeyIdentifierExtension.create(this.cert)],
      entries: revoked.map((e) => {
        const reason = REVOCATION_REASONS[e.revoked?.reason as RevocationReason];
        return { serialNumber: e.serial, revocationDate: new Date(e.revoked?.at ?? now), ...(reason !== undefined ? { reason } : {}) };
      }),
    });
    // "X509 CRL" is the PEM label OpenSSL and Node's TLS read.
    await writeFileAtomic(pkiPaths(this.dir).crl, x509.PemConverter.encode(crl.rawData, "X509 CRL"));
  }
}

/** Reads what a service needs to speak TLS as `identity`: the CA, its own key and certificate, and the CRL. */
export async function readTlsMaterial(dir: string, identity: Pick<Identity, "kind" | "id">): Promise<TlsMaterial> {
  const p = pkiPaths(dir);
  const read = async (path: string, what: string) => {
    try {
      return await readFile(path);
    } catch {
      throw new Error(`${what} is missing (${path}); issue it with 'netpurse-operator pki issue --kind ${identity.kind} --id ${identity.id}'`);
    }
  };
  return {
    ca: await read(p.caCert, "the installation's CA certificate"),
    cert: await read(p.cert(identity), `the certificate of ${identity.kind}/${identity.id}`),
    key: await read(p.key(identity), `the key of ${identity.kind}/${identity.id}`),
    crl: await read(p.crl, "the certificate revocation list"),
  };
}
