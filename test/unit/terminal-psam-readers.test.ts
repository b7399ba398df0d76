// netpurse-terminal --psam-readers: a pattern that is not a regular expression
// is refused with a message naming the option, before any reader, store or
// connection is opened.

import { expect } from "chai";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { Security } from "../../lib/pki/security.js";
import { startTerminalHost } from "../../services/terminal/server.js";
import { tempDir } from "../support/fixtures.js";

describe("terminal host: --psam-readers", () => {
  it("refuses a pattern that is not a regular expression, saying which option, and opens nothing", async () => {
    const { dir, cleanup } = await tempDir("netpurse-psam-readers-");
    try {
      const e = await startTerminalHost({
        security: Security.insecure(),
        terminalId: "terminal-1",
        concentrator: "127.0.0.1:1",
        dir,
        psamReaders: "netpurse PSAM (",
      }).catch((err: unknown) => err);
      expect(e).to.be.instanceOf(Error);
      expect((e as Error).message).to.match(/^--psam-readers: not a regular expression: /);
      expect(existsSync(join(dir, "terminal.db")), "no store made").to.equal(false);
    } finally {
      await cleanup();
    }
  });
});
