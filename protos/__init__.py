"""gRPC + protobuf contracts and their generated Python stubs."""
