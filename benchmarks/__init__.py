"""Benchmarks: `python -m benchmarks.run_all` (`make bench`) writes benchmarks/results/<name>.json."""
