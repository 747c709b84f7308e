"""Benchmarks: each module prints its figures, compares against a named baseline in the same run, and
writes its own section of docs/benchmarks.md through `benchmarks.common.write_section`."""
