"""Plain-Python domain values and errors, free of gRPC and Redis."""
