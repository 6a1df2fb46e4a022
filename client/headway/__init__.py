"""Generated protobuf and gRPC code for the Headway contract (protos/)."""
