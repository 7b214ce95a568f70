"""Micro-benchmarks: one part of the relay timed alone, in seconds, with the unit tests' fakes
instead of sockets (see bench/README.md)."""
