// Message type for the benchmark's own gRPC services (the echo baseline, the
// remote reader), which have no .proto: the bytes go over the wire as they
// are, with no message encoding to pay for. Definitions using it have the
// shape ts-proto generates, so the project's server bootstrap and client
// factory take them like any netpurse service.

export const RawBytes = {
  encode: (message: Uint8Array) => ({ finish: () => message }),
  decode: (input: Uint8Array): Uint8Array => input,
};
