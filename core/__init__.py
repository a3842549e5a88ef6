"""What every layer shares and that imports no project module: domain errors with stable
codes, request ids, typed environment readers, the Redis client, metric objects."""
