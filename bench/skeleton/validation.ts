// The skeleton's merchant validation service: answers the merchant's two
// calls of a purchase with messages of the real sizes, keeps nothing (in
// these modes the real one makes nothing durable either: its outbox of card
// proofs is for MERCHANT_COMPARES).

import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { opt, runService } from "../../lib/service-main.js";
import { modeOption, padded, SKELETON_HELP, SKELETON_IDENTITIES, SKELETON_OPTIONS, SkeletonSecurity, SkeletonValidationDefinition, Tally } from "./parts.js";
import { callOf, tallyKey } from "./wire.js";

await runService({
  program: "netpurse-bench-skeleton-validation",
  summary: "Protocol skeleton: the merchant validation service's calls of a purchase, of the real sizes, with no protocol logic.",
  options: { listen: { type: "string" }, ...SKELETON_OPTIONS },
  help: ["  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)", SKELETON_HELP].join("\n"),
  start: async (v) => {
    const mode = modeOption(v);
    const security = await SkeletonSecurity.of(v, SKELETON_IDENTITIES.validation);
    const tally = new Tally();
    const keys = callOf(mode, "IssueTransactionKeys").responseBytes;
    const validated = callOf(mode, "ValidateConfirmation").responseBytes;
    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [
        service(
          SkeletonValidationDefinition,
          {
            issueTransactionKeys: async () => {
              tally.add(tallyKey.call("IssueTransactionKeys"));
              return padded(new Uint8Array(), keys);
            },
            validateConfirmation: async () => {
              tally.add(tallyKey.call("ValidateConfirmation"));
              return padded(new Uint8Array(), validated);
            },
          },
          { all: ["merchant"] },
        ),
        tally.service(),
      ],
      transport: security.server("require"), // merchants only, inside the operator's network
      log: createLogger("skeleton-validation"),
    });
    return { address: server.address, close: () => server.shutdown() };
  },
});
