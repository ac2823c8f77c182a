"""Benchmarks: each measures its model and its baseline in the same run."""
