"""Benchmarks: ``python -m rawpunch.bench.rendezvous`` (``scripts/bench-rendezvous``); results go to BENCHMARKS.md."""
