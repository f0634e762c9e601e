"""The benchmark's own machinery: memory counter, failure classification, names, runner records.

No timing assertions: times depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from benchmarks.config import Config
from benchmarks.memory import PeakRSS, SavedTensorCounter
from benchmarks.strategies import STRATEGIES, canonical_strategy
from benchmarks.worker import classify_failure


def test_saved_tensor_counter_counts_a_known_tensor_exactly():
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    with SavedTensorCounter() as saved:
        y = x.exp()  # exp saves its output: 1000 float64 = 8000 bytes
    assert saved.nbytes == y.numel() * y.element_size() == 8000
    assert saved.storages == 1


def test_saved_tensor_counter_counts_each_storage_once():
    x = torch.randn(256, requires_grad=True)
    with SavedTensorCounter() as saved:
        (x * x).sum()  # mul saves x twice
        (x[:128] * 3.0 + x[128:].sin()).sum()  # views of x: the same storage again (sin saves a view of x)
    assert saved.nbytes == 256 * 4
    assert saved.tensors_saved >= 3


def test_peak_rss_sees_a_touched_allocation():
    with PeakRSS() as rss:
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB, written so the pages are resident
        del block
    assert rss.increase >= 15 * 2**20


def test_failures_are_classified():
    assert classify_failure(MemoryError()) == "oom"
    assert (
        classify_failure(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ...")) == "oom"
    )
    assert classify_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) == "oom"
    assert classify_failure(ValueError("outer ⊆ inner")) == "error"
    assert classify_failure(RuntimeError("could not create a primitive")) == "error"
    assert classify_failure(RuntimeError("could not create a primitive"), memory_capped=True) == "oom"


def test_strategy_names_accept_spellings_and_list_valid_ones():
    assert canonical_strategy("SecondOrder") == "second-order"
    assert canonical_strategy("truncated(1)") == "truncated-1"
    with pytest.raises(ValueError, match="valid strategies: " + ", ".join(STRATEGIES)):
        canonical_strategy("third-order")


def _bench_parser() -> argparse.ArgumentParser:
    from benchmarks.cli import add_arguments

    parser = argparse.ArgumentParser(prog="metakit bench")
    add_arguments(parser)
    return parser


def test_unknown_workload_is_a_usage_error_listing_valid_ones(capsys):
    with pytest.raises(SystemExit):
        _bench_parser().parse_args(["--workloads", "sine,imagenet"])
    message = capsys.readouterr().err
    assert "unknown workload 'imagenet'" in message
    assert "sine, bert, priming" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error():
    from benchmarks.cli import run

    args = _bench_parser().parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        run(args)


def test_runner_records_are_well_formed(tmp_path):
    from benchmarks.plots import write_plots
    from benchmarks.report import markdown_table
    from benchmarks.runner import run_configs

    configs = [
        Config("sine", "second-order", 1, repeats=1, outcome_steps=1),
        Config("sine", "first-order", 1, repeats=1),
        # no memory to build BERT in: recorded as out of memory, and the run goes on
        Config("bert", "reptile", 1, repeats=1, memory_limit_gib=1e-6),
    ]
    exact, first_order, starved = run_configs(configs, progress=False)
    json.dumps([exact, first_order, starved])  # records are plain JSON

    for record in (exact, first_order):
        assert record["status"] == "ok", record.get("traceback")
        assert record["config"]["workload"] == "sine"
        assert record["threads"] == 1
        assert record["time_ms"] > 0 and len(record["times_ms"]) == 1
        assert record["saved_mib"] > 0 and record["peak_rss_increase_mib"] >= 0
        assert math.isclose(record["reference_cosine"], 1.0, abs_tol=1e-5)  # matches the hand-written loop
        assert record["overhead_ratio"] > 0
    assert math.isclose(exact["cosine"], 1.0, abs_tol=1e-9) and exact["rel_error"] < 1e-9
    assert -1.0 <= first_order["cosine"] < 1.0
    assert exact["outcome"]["meta_steps"] == 1 and exact["outcome"]["query_loss_after"] > 0
    assert starved["status"] == "oom", starved

    table = markdown_table([exact, first_order, starved])
    assert table.count("\n") == 4 and "**oom**" in table
    assert {p.name for p in write_plots([exact, first_order, starved], tmp_path, "cpu")} >= {
        "time_vs_steps.png"
    }
