// One-line structured logs on stderr: time, service, level, message, fields.
// Callers pass identifiers and amounts, never key material.

export type Level = "debug" | "info" | "warn" | "error";
const ORDER: Record<Level, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export interface Logger {
  debug(msg: string, fields?: Record<string, unknown>): void;
  info(msg: string, fields?: Record<string, unknown>): void;
  warn(msg: string, fields?: Record<string, unknown>): void;
  error(msg: string, fields?: Record<string, unknown>): void;
  child(name: string): Logger;
}

function threshold(): number {
  const env = (process.env.NETPURSE_LOG_LEVEL ?? "info") as Level;
  return ORDER[env] ?? ORDER.info;
}

function fmt(v: unknown): string {
  if (typeof v === "string") return /[\s"=]/.test(v) ? JSON.stringify(v) : v;
  if (typeof v === "bigint") return v.toString();
  if (Buffer.isBuffer(v)) return v.toString("hex");
  return JSON.stringify(v);
}

export function createLogger(name: string): Logger {
  const write = (level: Level, msg: string, fields?: Record<string, unknown>) => {
    if (ORDER[level] < threshold()) return;
    const extra = fields
      ? Object.entries(fields)
          .filter(([, v]) => v !== undefined)
          .map(([k, v]) => ` ${k}=${fmt(v)}`)
          .join("")
      : "";
    process.stderr.write(`${new Date().toISOString()} ${name} ${level} ${msg}${extra}\n`);
  };
  return {
    debug: (m, f) => write("debug", m, f),
    info: (m, f) => write("info", m, f),
    warn: (m, f) => write("warn", m, f),
    error: (m, f) => write("error", m, f),
    child: (n) => createLogger(`${name}/${n}`),
  };
}
