"""Reliability runs: faults, hostile bytes, churn, floods and a long soak (see
bench/README.md)."""
