"""Benchmarks for paged_kv: a shared timing and results harness plus one script per figure."""
