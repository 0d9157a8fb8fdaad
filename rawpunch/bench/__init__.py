"""Benchmarks: ``scripts/bench-rendezvous`` runs ``rawpunch.bench.rendezvous``, appends to BENCHMARKS.md."""
