"""Benchmarks: a client-API load generator and GPU measurements (results in RESULTS.md)."""
