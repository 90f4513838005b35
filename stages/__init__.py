"""Pipeline stages. Each module holds a stage's maths in plain functions and a `run` entry point.

`run(out_dir, params, inputs, runtime)` writes the artifact files into `out_dir` and returns the
metrics for the manifest. Stages never touch the store layout; `flows.pipeline` does that.
"""
