"""Benchmarks of the dmsae stages against their ceilings and against other libraries (see bench/run.py)."""
