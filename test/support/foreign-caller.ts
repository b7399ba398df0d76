// Another process of the machine, which tests start as another user (uid
// nobody) or as the cardholder: it calls the client daemon at the address
// given, as any local program could, and prints what it got as one JSON
// line on stdout.
//
//   node --import tsx test/support/foreign-caller.ts ADDRESS PayOffer HEX   (a PayOfferRequest, protobuf, in hex)
//   node --import tsx test/support/foreign-caller.ts ADDRESS GetCard

import { ClientError, Status } from "nice-grpc";
import { CardholderServiceDefinition, PayOfferRequest } from "../../gen/netpurse/cardholder/v1/cardholder.js";
import { clientFactory, openChannel } from "../../lib/grpc/client.js";

const [address = "", method = "", hex = ""] = process.argv.slice(2);
const channel = openChannel(address, { insecure: true });
const daemon = clientFactory().create(CardholderServiceDefinition, channel);
try {
  const r =
    method === "PayOffer"
      ? (await daemon.payOffer(PayOfferRequest.decode(Buffer.from(hex, "hex")), { deadline: 10_000 })).purse
      : (await daemon.getCard({}, { deadline: 10_000 })).purse;
  console.log(JSON.stringify({ ok: true, balance: String(r?.balance?.amountMinor) }));
} catch (e) {
  if (!(e instanceof ClientError)) throw e;
  console.log(JSON.stringify({ ok: false, code: Status[e.code], details: e.details }));
} finally {
  channel.close();
}
