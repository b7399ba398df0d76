// The descriptor set that server reflection serves: the one `buf build`
// writes to gen/descriptor.binpb, plus a descriptor of grpc.health.v1 built
// here, so grpcurl and buf curl can describe and call health checks too.

import { readFileSync } from "node:fs";
import { create, toBinary } from "@bufbuild/protobuf";
import { FieldDescriptorProto_Label, FieldDescriptorProto_Type, FileDescriptorProtoSchema, FileDescriptorSetSchema } from "@bufbuild/protobuf/wkt";

function healthFile() {
  const str = FieldDescriptorProto_Type.STRING;
  const opt = FieldDescriptorProto_Label.OPTIONAL;
  return create(FileDescriptorProtoSchema, {
    name: "grpc/health/v1/health.proto",
    package: "grpc.health.v1",
    syntax: "proto3",
    messageType: [
      { name: "HealthCheckRequest", field: [{ name: "service", jsonName: "service", number: 1, label: opt, type: str }] },
      {
        name: "HealthCheckResponse",
        field: [
          {
            name: "status",
            jsonName: "status",
            number: 1,
            label: opt,
            type: FieldDescriptorProto_Type.ENUM,
            typeName: ".grpc.health.v1.HealthCheckResponse.ServingStatus",
          },
        ],
        enumType: [
          {
            name: "ServingStatus",
            value: [
              { name: "UNKNOWN", number: 0 },
              { name: "SERVING", number: 1 },
              { name: "NOT_SERVING", number: 2 },
              { name: "SERVICE_UNKNOWN", number: 3 },
            ],
          },
        ],
      },
    ],
    service: [
      {
        name: "Health",
        method: [
          { name: "Check", inputType: ".grpc.health.v1.HealthCheckRequest", outputType: ".grpc.health.v1.HealthCheckResponse" },
          { name: "Watch", inputType: ".grpc.health.v1.HealthCheckRequest", outputType: ".grpc.health.v1.HealthCheckResponse", serverStreaming: true },
        ],
      },
    ],
  });
}

let cached: Uint8Array | undefined;

/** netpurse's descriptor set with grpc.health.v1 appended (repeated fields concatenate). */
export function reflectionDescriptorSet(): Uint8Array {
  if (!cached) {
    const own = readFileSync(new URL("../../gen/descriptor.binpb", import.meta.url));
    const health = toBinary(FileDescriptorSetSchema, create(FileDescriptorSetSchema, { file: [healthFile()] }));
    cached = Buffer.concat([own, health]);
  }
  return cached;
}
