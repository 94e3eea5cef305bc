"""Generated protobuf and gRPC stubs for the tally.v1 API (see scripts/gen_protos.sh)."""
