// The skeleton's merchant: CreateOrder asks the validation service for the
// transaction's keys and records the order; CompleteOrder has the debit
// result validated and records the order paid before the goods go out.
// Messages of the real sizes, no protocol logic.

import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { clientFactory, DEFAULT_DEADLINE_MS, openChannel } from "../../lib/grpc/client.js";
import { notFound } from "../../lib/grpc/errors.js";
import { service, startGrpcServer } from "../../lib/grpc/server.js";
import { createLogger } from "../../lib/log.js";
import { opt, runService } from "../../lib/service-main.js";
import {
  DurableLog,
  modeOption,
  padded,
  SKELETON_HELP,
  SKELETON_IDENTITIES,
  SKELETON_OPTIONS,
  SkeletonMerchantDefinition,
  SkeletonSecurity,
  SkeletonValidationDefinition,
  Tally,
  transactionOf,
} from "./parts.js";
import { appendBytes, callOf, skeletonShop, tallyKey } from "./wire.js";

await runService({
  program: "netpurse-bench-skeleton-merchant",
  summary: "Protocol skeleton: the merchant's calls and durable appends of a purchase, of the real sizes, with no protocol logic.",
  options: { listen: { type: "string" }, validation: { type: "string" }, dir: { type: "string" }, ...SKELETON_OPTIONS },
  help: [
    "  --listen HOST:PORT       address to serve on (default 127.0.0.1:0, a free port)",
    "  --validation HOST:PORT   the skeleton's validation service",
    "  --dir DIR                where its append-only log goes",
    SKELETON_HELP,
  ].join("\n"),
  start: async (v) => {
    const mode = modeOption(v);
    const security = await SkeletonSecurity.of(v, SKELETON_IDENTITIES.merchant(skeletonShop(mode)));
    const log = await DurableLog.open(join(opt(v, "dir", "."), "merchant.log"));
    const channel = openChannel(opt(v, "validation", ""), security.channel("validation"));
    const validation = clientFactory().create(SkeletonValidationDefinition, channel);
    const tally = new Tally();
    const [created = 0, paid = 0] = appendBytes(mode, "merchant");
    const order = callOf(mode, "CreateOrder");
    const keys = callOf(mode, "IssueTransactionKeys");
    const complete = callOf(mode, "CompleteOrder");
    const validate = callOf(mode, "ValidateConfirmation");
    /** Orders offered and not paid yet, by transaction id. */
    const offered = new Set<string>();
    const server = await startGrpcServer({
      address: opt(v, "listen", "127.0.0.1:0"),
      services: [
        service(
          SkeletonMerchantDefinition,
          {
            createOrder: async () => {
              tally.add(tallyKey.call("CreateOrder"));
              const id = randomBytes(16);
              await validation.issueTransactionKeys(padded(id, keys.requestBytes), { deadline: DEFAULT_DEADLINE_MS });
              await log.append(created);
              offered.add(id.toString("hex"));
              return padded(id, order.responseBytes);
            },
            completeOrder: async (request) => {
              tally.add(tallyKey.call("CompleteOrder"));
              const id = transactionOf(request);
              if (!offered.has(id)) throw notFound(`no order ${id} at the skeleton merchant`);
              await validation.validateConfirmation(padded(request.subarray(0, 16), validate.requestBytes), { deadline: DEFAULT_DEADLINE_MS });
              await log.append(paid);
              offered.delete(id);
              return padded(new Uint8Array(), complete.responseBytes);
            },
          },
          { all: "public" },
        ),
        tally.service(),
      ],
      transport: security.server("request"),
      log: createLogger("skeleton-merchant"),
    });
    return {
      address: server.address,
      async close() {
        await server.shutdown();
        channel.close();
        await log.close();
      },
    };
  },
});
