// The caches an outside caller can fill keep only their latest entries.

import { expect } from "chai";
import { BoundedMap } from "../../lib/bounded-map.js";

describe("BoundedMap", () => {
  it("keeps its latest entries: the oldest makes room, a replaced entry takes none", () => {
    const m = new BoundedMap<string, number>(3);
    for (const [k, v] of [
      ["a", 1],
      ["b", 2],
      ["c", 3],
    ] as const)
      m.set(k, v);
    m.set("b", 20); // replaced: nothing leaves
    expect([m.get("a"), m.get("b"), m.get("c"), m.size]).to.deep.equal([1, 20, 3, 3]);
    m.set("d", 4); // full: "a", the oldest, leaves
    expect([m.get("a"), m.get("b"), m.get("d"), m.size]).to.deep.equal([undefined, 20, 4, 3]);
  });

  it("stays at its bound however many keys a caller makes up", () => {
    const m = new BoundedMap<number, number>(100);
    for (let i = 0; i < 10_000; i++) m.set(i, i);
    expect(m.size).to.equal(100);
    expect(m.get(9_999)).to.equal(9_999);
    expect(m.get(9_899)).to.equal(undefined);
  });
});
