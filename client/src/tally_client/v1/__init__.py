"""Generated protobuf and gRPC stubs of the tally.v1 API (client/gen_stubs.py; `make proto`)."""
