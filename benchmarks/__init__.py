"""Benchmarks behind ``metakit bench``: what each meta-gradient strategy costs, side by side.

Each (workload, strategy, inner steps) configuration runs in a fresh process (:mod:`benchmarks.worker`)
so that peak memory and warm-up are its own; :mod:`benchmarks.runner` spawns them and collects JSON
records, :mod:`benchmarks.report` and :mod:`benchmarks.plots` turn the records into a table and plots.
"""
