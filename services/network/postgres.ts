// The PostgreSQL server `npm start` runs when several payment servers must
// share one database and no --database was given: a cluster of the
// network's own in DATA/postgres (Debian's postgresql package provides
// initdb and pg_ctl), made on the first such run and kept, like the rest of
// the data folder, for the next.

import { join } from "node:path";
import { DEFAULT_PORTS } from "../../lib/config.js";
import { redactUrl } from "../../lib/store/postgres.js";
import { letServerReach, startCluster, withConnection, withDatabase } from "../../lib/store/postgres-cluster.js";

/** The database the network's services share, a schema each. */
const DATABASE = "netpurse";

export async function startLocalPostgres(data: string, say: (line: string) => void): Promise<{ url: string; stop(): Promise<void> }> {
  const dir = join(data, "postgres");
  for (const d of await letServerReach(dir)) say(`  PostgreSQL: gave ${d} the traverse bit for others, so that the postgres user can reach ${dir}`);
  const cluster = await startCluster({ dir, port: DEFAULT_PORTS.postgres, durable: true });
  const exists = await withConnection(cluster.adminUrl, async (c) => (await c.query("SELECT 1 FROM pg_database WHERE datname = $1", [DATABASE])).rowCount);
  if (!exists) await withConnection(cluster.adminUrl, (c) => c.query(`CREATE DATABASE ${DATABASE}`));
  const url = withDatabase(cluster.adminUrl, DATABASE);
  say(`  PostgreSQL: ${redactUrl(url)} (cluster in ${dir}, password in ${join(dir, "password")})`);
  return { url, stop: () => cluster.stop("fast") };
}
