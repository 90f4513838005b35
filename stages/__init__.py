"""Pipeline stages. Each module holds a stage's NAME and VERSION, READS_ACTIVATIONS (whether it reads the
harvested rows, so that a harvest in parts is handed to it with its parts), its own maths in plain functions, and:

- `run(out_dir, params, inputs, runtime)`: writes the artifact files into `out_dir` (named in `dmsae.readers`)
  and returns the metrics for the manifest;
- `describe(metrics)`: the one-line detail `dmsae status` prints for a finished stage ("" when none).

Stages never touch the store layout (`flows.pipeline` does that) and never import one another: what two
stages share (training, evaluation maths, artifact readers) lives in the library, `dmsae/`.
"""
