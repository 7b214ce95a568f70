"""Shared parts of the benchmarks: the servers under test, load clients, network namespaces,
a private PostgreSQL cluster and the fleet's hosts. Scenarios import these; these import no
scenario."""
