"""The pure core: the hub and its streams, history, filters, envelopes, limits and stats.

No Trio, no sockets, no psycopg, no wsproto or h11 here: everything in this package is computed
from its arguments, so it is tested without I/O and benchmarked in seconds."""
