"""Benchmarks that print measured numbers (`llmpq bench ...`)."""
