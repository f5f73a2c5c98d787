"""The benchmarks of `regdrop-fast bench`, one module per op: each defines `run(ctx)` and
records baseline and ours with `ctx.record(...)` (see regdrop_fast.benchmarking). They ship
with the package, so an installed (non-editable) package benchmarks itself."""
