"""WS /v1/stream, one job a module; `consumer.StreamConsumer` is the ASGI application."""
