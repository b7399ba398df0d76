// A list of servers given as one option: `--concentrator a:7430,b:7430`.

/** The addresses of a comma-separated list, each once, in order; throws when there is none. */
export function addressList(value: string, what = "address"): string[] {
  const addresses = [...new Set(value.split(",").map((a) => a.trim()))].filter((a) => a !== "");
  if (addresses.length === 0) throw new Error(`no ${what} in ${JSON.stringify(value)}`);
  return addresses;
}
