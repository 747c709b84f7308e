"""Helpers that tests and benchmarks share (synthetic data, fixtures); never imported by the product."""
