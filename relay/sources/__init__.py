"""Where notifications come from: today PostgreSQL's LISTEN/NOTIFY (:mod:`relay.sources.notify`),
the pool that sends NOTIFYs (:mod:`relay.sources.notifier`) and the path of a client's writes back
to the database (:mod:`relay.sources.publisher`). Sources hand the hub batches; they know nothing of
clients or transports."""
