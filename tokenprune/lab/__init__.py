"""The lab: ablation grids, measurements, results, reports and the command line.

One job per module: `config` (the ablation YAML schema), `grid` (its cells), `loading` (the one
model loader and dtype table, shared with `run` and benchmarks/), `datasets` and `batches` (samples
and model inputs), `metrics` (accuracy, fidelity, FLOPs), `timing` and `speed` (paired,
order-alternating timings), `runner` (the orchestration of `tokenprune ablate`), `results`,
`report`, `visualize`, `run` (`tokenprune run`) and `cli`.
"""
