// The installation's certificate authority: what it issues, what it keeps
// private, and a revocation list that stays valid as long as the CA.

import "reflect-metadata";
import { X509Crl } from "@peculiar/x509";
import { expect } from "chai";
import { X509Certificate } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { CertificateAuthority, pkiPaths } from "../../lib/pki/authority.js";
import { identityFromSubjectAltName } from "../../lib/pki/identity.js";
import { followRevocationList, isRevoked } from "../../lib/pki/revocation.js";
import { tempDir } from "../support/fixtures.js";

describe("installation PKI", () => {
  let dir: string, cleanup: () => Promise<void>;
  let ca: CertificateAuthority;
  before(async () => {
    ({ dir, cleanup } = await tempDir());
    ca = await CertificateAuthority.init(dir);
  });
  after(async () => cleanup());

  it("issues a certificate with exactly one SPIFFE ID, signed by the CA, with its key private", async () => {
    const issued = await ca.issue({ kind: "terminal", id: "terminal-9" });
    const p = pkiPaths(dir);
    const cert = new X509Certificate(await readFile(p.cert({ kind: "terminal", id: "terminal-9" })));
    const root = new X509Certificate(await readFile(p.caCert));
    expect(cert.verify(root.publicKey)).to.equal(true);
    expect(cert.checkIssued(root)).to.equal(true);
    expect(identityFromSubjectAltName(cert.subjectAltName, "netpurse.local")).to.deep.equal({
      trustDomain: "netpurse.local",
      kind: "terminal",
      id: "terminal-9",
    });
    expect(cert.serialNumber.toLowerCase()).to.equal(issued.serial.toLowerCase());
    for (const key of [p.caKey, p.key({ kind: "terminal", id: "terminal-9" })]) expect((await stat(key)).mode & 0o777, key).to.equal(0o600);
  });

  it("refuses an identity that is not one: an unknown kind, or an id a SPIFFE path cannot hold", async () => {
    for (const bad of [
      { kind: "wizard", id: "x" },
      { kind: "terminal", id: "two words" },
      { kind: "terminal", id: "../up" },
    ]) {
      let refused = false;
      await ca.issue(bad as never).catch(() => (refused = true));
      expect(refused, JSON.stringify(bad)).to.equal(true);
    }
  });

  it("publishes revocations in a CRL signed by the CA that stays valid as long as the CA (TLS refuses everyone once a CRL is stale)", async () => {
    const e = await ca.issue({ kind: "operator", id: "leaver" });
    await ca.revoke({ kind: "operator", id: "leaver" }, "key-compromise");
    const crl = new X509Crl(await readFile(pkiPaths(dir).crl, "utf8"));
    const root = new X509Certificate(await readFile(pkiPaths(dir).caCert));
    expect(crl.entries.map((x) => x.serialNumber.toLowerCase())).to.include(e.serial.toLowerCase());
    expect(crl.nextUpdate?.getTime()).to.be.at.least(new Date(root.validTo).getTime() - 86_400_000);
    const stop = followRevocationList(pkiPaths(dir).crl);
    try {
      expect(isRevoked(e.serial)).to.equal(true);
      expect(isRevoked((await ca.issue({ kind: "operator", id: "stayer" })).serial)).to.equal(false);
    } finally {
      stop();
    }
  });
});
