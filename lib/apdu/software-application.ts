// What the software card and the software PSAM share: state in a private
// file made durable before an answer that changes it (a snapshot and a log
// of changes beside it: state-log.ts), and one command at a time, as on a
// chip.

import type { ResponseApdu, CommandApdu } from "./apdu.js";
import { StateLog, writeState } from "./state-log.js";
import { runCommand, type CardApplication } from "./transport.js";

export abstract class SoftwareApplication<S extends { format: number }> implements CardApplication {
  protected state: S;
  /** The log's state this application last took or saved: another application on the same file may have saved since. */
  private taken: S;
  private closed = false;

  protected constructor(
    readonly path: string,
    private readonly log: StateLog<S>,
  ) {
    this.state = this.taken = log.state;
  }

  /**
   * Opens an application's state file for running, refusing formats this
   * code does not know, and whatever `accept` refuses, before it writes
   * anything.
   */
  protected static async load<S extends { format: number }>(path: string, what: string, accept?: (state: S) => void): Promise<StateLog<S>> {
    return StateLog.open<S>(path, (state) => {
      if (state.format !== 1) throw new Error(`${path}: unknown ${what} file format ${String(state.format)}`);
      accept?.(state);
    });
  }

  /** Writes a new state file (personalisation, provisioning). Private: it holds keys. */
  protected static async store(path: string, state: object): Promise<void> {
    await writeState(path, state);
  }

  /** Makes `next` the state, on disk first. */
  protected async save(next: S): Promise<void> {
    await this.log.save(next);
    this.state = this.taken = next;
  }

  /** Closes the state file; commands after it fail. */
  async close(): Promise<void> {
    await this.log.run(async () => {
      if (this.closed) return;
      this.closed = true;
      await this.log.close();
    });
  }

  abstract reset(): Buffer;

  protected abstract dispatch(c: CommandApdu): Promise<ResponseApdu> | ResponseApdu;

  process(command: Buffer): Promise<Buffer> {
    return this.log.run(() => {
      if (this.closed) throw new Error(`${this.path}: closed`);
      if (this.log.state !== this.taken) this.state = this.taken = this.log.state;
      return runCommand(command, (c) => this.dispatch(c));
    });
  }
}
