"""The domain: operations, state machine, validation, percent; no grpc, no protobuf."""
