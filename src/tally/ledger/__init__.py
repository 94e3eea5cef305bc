"""The durable ledger: events and state images flushed from the Redis streams."""
