import {
  decodeCommand,
  decodeResponse,
  encodeCommand,
  encodeResponse,
  MalformedApdu,
  status,
  SW,
  ApduError,
  type CommandApdu,
  type ResponseApdu,
} from "./apdu.js";

/**
 * A smart-card application as it runs on the chip: it answers to reset and
 * processes command APDUs. The software card and the software PSAM implement
 * it; a real card behind a PC/SC reader is reached only through a CardTransport.
 */
export interface CardApplication {
  /** Power-up or warm reset: forgets any session, returns the ATR. */
  reset(): Buffer;
  /** Processes one command APDU (raw bytes) and returns the raw response APDU. */
  process(command: Buffer): Promise<Buffer>;
}

/** The one way netpurse talks to a card or PSAM: raw APDUs in, raw APDUs out. */
export interface CardTransport {
  /** Whether a card is in the reader. */
  isPresent(): Promise<boolean>;
  /** Resets the card and returns its answer to reset. */
  reset(): Promise<Buffer>;
  /** Sends one command APDU and returns the response APDU, status word included. */
  transmit(command: Buffer): Promise<Buffer>;
  /** Releases the reader. */
  close(): Promise<void>;
}

/** Maps what an application throws to a status word, so no exception crosses the card edge. */
export async function runCommand(command: Buffer, handle: (c: ReturnType<typeof decodeCommand>) => Promise<ResponseApdu> | ResponseApdu): Promise<Buffer> {
  try {
    return encodeResponse(await handle(decodeCommand(command)));
  } catch (e) {
    if (e instanceof ApduError) return encodeResponse(status(e.sw));
    if (e instanceof MalformedApdu) return encodeResponse(status(SW.WRONG_LENGTH));
    throw e;
  }
}

/** Transport to an application in the same process (software card or software PSAM). */
export class InProcessTransport implements CardTransport {
  private closed = false;
  constructor(private readonly app: CardApplication) {}

  async isPresent(): Promise<boolean> {
    return !this.closed;
  }

  async reset(): Promise<Buffer> {
    this.assertOpen();
    return this.app.reset();
  }

  async transmit(command: Buffer): Promise<Buffer> {
    this.assertOpen();
    return this.app.process(Buffer.from(command));
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private assertOpen(): void {
    if (this.closed) throw new Error("card transport is closed");
  }
}

/** Sends a command and decodes the response. */
export async function exchange(transport: CardTransport, command: CommandApdu): Promise<ResponseApdu> {
  return decodeResponse(await transport.transmit(encodeCommand(command)));
}
