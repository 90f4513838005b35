"""Reports read finished artifacts and write markdown, tables and plots; they never compute a stage.

Every report gets a `dmsae.plan.Plan` and a `dmsae.store.Store` from its caller (the flows build the plans),
so this package imports neither `flows` nor `stages`: `run` (one run's summary), `sweep` (a grid of runs),
`ablation` (the core-gate ablation, with `noise_floor`), `cards` (the latent cards' static site), and
`tables` (the tables they share).
"""
