"""Benchmarks behind ``metakit bench``: what each meta-gradient strategy costs, side by side.

Each (workload, strategy, inner steps) configuration runs in a fresh process (`metakit.bench.worker`)
so that peak memory and warm-up are its own; `metakit.bench.runner` spawns them and collects JSON
records, `metakit.bench.report` and `metakit.bench.plots` turn the records into a table and plots.
"""

from metakit.extras import require

for _module in ("transformers", "matplotlib", "psutil"):
    require(_module, "bench", "metakit.bench (metakit bench)")
