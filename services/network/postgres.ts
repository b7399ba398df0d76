// The PostgreSQL server `npm start` runs when several payment servers must
// share one database and no --database was given: a cluster of the
// network's own (Debian's postgresql package provides initdb and pg_ctl),
// made on the first such run and kept for the next, like the rest of the
// data folder. The services connect as a role of their own that owns the
// database and nothing else; the cluster's superuser password stays in
// DATA/postgres/password. As root the cluster runs as the postgres user, in
// a folder under its home, so that no folder above the data folder need be
// opened to it.

import { createHash, randomBytes } from "node:crypto";
import { existsSync } from "node:fs";
import { chmod, mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { DEFAULT_PORTS } from "../../lib/config.js";
import { redactUrl } from "../../lib/store/postgres.js";
import { startCluster, withConnection, withDatabase } from "../../lib/store/postgres-cluster.js";

/** Room for every service's pool (10 each) and the payment servers' lock pools (64 each), with up to 8 replicas: pools open connections only as needed. */
const MAX_CONNECTIONS = 800;

/** The database the network's services share, a schema each, and the role they connect as. */
const DATABASE = "netpurse";
const SERVICES_ROLE = "netpurse_services";

/** Where the cluster lives: in the data folder, or, as root, in the postgres user's home (one folder per data folder). */
export function clusterDir(data: string): string {
  if (process.getuid?.() !== 0) return join(data, "postgres", "cluster");
  const home = existsSync("/var/lib/postgresql") ? "/var/lib/postgresql" : "/var/lib";
  return join(home, "netpurse", createHash("sha256").update(data).digest("hex").slice(0, 16));
}

export async function startLocalPostgres(data: string, say: (line: string) => void): Promise<{ url: string; stop(): Promise<void> }> {
  const kept = join(data, "postgres");
  await mkdir(kept, { recursive: true, mode: 0o700 });
  const dir = clusterDir(data);
  if (process.getuid?.() === 0) {
    // Traversable by the server's user (the umask of npm start, 077, would leave it root's alone); the cluster folder in it is that user's, 0700.
    await mkdir(join(dir, ".."), { recursive: true });
    await chmod(join(dir, ".."), 0o755);
  }
  if (existsSync(join(dir, "data", "PG_VERSION")) && !existsSync(join(kept, "password")))
    throw new Error(`${dir} holds a PostgreSQL cluster made for an earlier data folder at ${data}, whose passwords are gone: remove ${dir} to start afresh`);
  const cluster = await startCluster({
    dir,
    port: DEFAULT_PORTS.postgres,
    durable: true,
    maxConnections: MAX_CONNECTIONS,
    passwordFile: join(kept, "password"),
  });
  const servicesPasswordFile = join(kept, "services-password");
  if (!existsSync(servicesPasswordFile)) await writeFile(servicesPasswordFile, `${randomBytes(12).toString("hex")}\n`, { mode: 0o600 });
  const password = (await readFile(servicesPasswordFile, "utf8")).trim();
  await withConnection(cluster.adminUrl, async (c) => {
    const role = await c.query("SELECT 1 FROM pg_roles WHERE rolname = $1", [SERVICES_ROLE]);
    // The password is hex: nothing in it needs quoting.
    if (!role.rowCount) await c.query(`CREATE ROLE ${SERVICES_ROLE} LOGIN PASSWORD '${password}'`);
    const db = await c.query("SELECT 1 FROM pg_database WHERE datname = $1", [DATABASE]);
    if (!db.rowCount) await c.query(`CREATE DATABASE ${DATABASE} OWNER ${SERVICES_ROLE}`);
  });
  const url = withDatabase(`postgres://${SERVICES_ROLE}:${password}@127.0.0.1:${cluster.port}/postgres`, DATABASE);
  say(`  PostgreSQL: ${redactUrl(url)} (cluster in ${dir}; passwords in ${kept}, mode 0600)`);
  return { url, stop: () => cluster.stop("fast") };
}
