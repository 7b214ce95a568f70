"""pgws-relay: a high fan-out WebSocket relay for PostgreSQL LISTEN/NOTIFY, on Trio."""

__version__ = "0.1.0"
