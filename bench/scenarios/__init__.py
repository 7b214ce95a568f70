"""Benchmark scenarios: each script answers one question about speed or size (see
bench/README.md)."""
