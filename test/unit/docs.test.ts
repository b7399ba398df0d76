import { expect } from "chai";
import { readFileSync } from "node:fs";
import { render } from "../../scripts/apdu-doc.js";

describe("docs/apdu.md", () => {
  it("shows exactly the byte layouts the code uses (npm run docs:apdu)", () => {
    const doc = readFileSync(new URL("../../docs/apdu.md", import.meta.url), "utf8");
    expect(render(doc)).to.equal(doc);
  });
});
