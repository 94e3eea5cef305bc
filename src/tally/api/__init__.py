"""The gRPC layer: validation, conversion, thin servicers and the server builder."""
