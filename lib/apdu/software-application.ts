// What the software card and the software PSAM share: state in a private
// JSON file written atomically before an answer that changes it, and one
// command at a time, as on a chip.

import { readJson, writeJsonAtomic } from "../files.js";
import { Mutex } from "../mutex.js";
import type { ResponseApdu, CommandApdu } from "./apdu.js";
import { runCommand, type CardApplication } from "./transport.js";

export abstract class SoftwareApplication<S extends { format: number }> implements CardApplication {
  private readonly mutex = new Mutex();

  protected constructor(
    readonly path: string,
    protected state: S,
  ) {}

  /** Reads an application's state file, refusing formats this code does not know. */
  protected static async load<S extends { format: number }>(path: string, what: string): Promise<S> {
    const state = await readJson<S>(path);
    if (state.format !== 1) throw new Error(`${path}: unknown ${what} file format ${String(state.format)}`);
    return state;
  }

  /** Writes a new state file (personalisation, provisioning). Private: it holds keys. */
  protected static async store(path: string, state: object): Promise<void> {
    await writeJsonAtomic(path, state, { private: true });
  }

  /** Makes `next` the state, on disk first. */
  protected async save(next: S): Promise<void> {
    await writeJsonAtomic(this.path, next, { private: true });
    this.state = next;
  }

  abstract reset(): Buffer;

  protected abstract dispatch(c: CommandApdu): Promise<ResponseApdu> | ResponseApdu;

  process(command: Buffer): Promise<Buffer> {
    return this.mutex.run(() => runCommand(command, (c) => this.dispatch(c)));
  }
}
