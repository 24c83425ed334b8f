"""Benchmark harness for the `engine` converter (see bench/RESULTS.md)."""
