"""Reports of runs and sweeps, read from their run dirs alone (no W&B, no torch).

`run.py` reads a run dir (overrides, config, metrics.jsonl, checkpoints, status), `markdown.py`
writes the run report and the table across runs, `plot.py` draws the curves (matplotlib, an
optional extra), `write.py` puts them into files, `cli.py` is `mft-report`, and `callback.py`
is the Hydra callback that ends `mft-train -m ...` with the sweep's table.
"""
