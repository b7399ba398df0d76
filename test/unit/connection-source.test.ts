// The source a connection is counted against for maxConnectionsPerAddress.

import { expect } from "chai";
import { sourceOf } from "../../lib/grpc/server.js";

describe("unit: the source of a connection", () => {
  it("is the IPv4 address, also when Node reports it IPv4-mapped", () => {
    expect(sourceOf("203.0.113.7")).to.equal("203.0.113.7");
    expect(sourceOf("::ffff:203.0.113.7")).to.equal("203.0.113.7");
    expect(sourceOf("203.0.113.8")).to.not.equal(sourceOf("203.0.113.7"));
  });

  it("is the /64 of an IPv6 address, however it is written: one host cannot escape the cap by taking more addresses of its /64", () => {
    const a = sourceOf("2001:db8:1:2::1");
    expect(a).to.equal("2001:db8:1:2::/64");
    expect(sourceOf("2001:0db8:0001:0002:ffff:eeee:dddd:cccc")).to.equal(a);
    expect(sourceOf("2001:DB8:1:2:0:0:0:9")).to.equal(a);
    expect(sourceOf("2001:db8:1:3::1")).to.not.equal(a);
    expect(sourceOf("::1")).to.equal("0:0:0:0::/64");
  });

  it("is one shared source when the address is unknown", () => {
    expect(sourceOf(undefined)).to.equal("unknown");
  });
});
