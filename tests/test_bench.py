"""The benchmark's own machinery: memory counter, failure classification, names, runner records.

No timing assertions: times depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import metakit as mk
from metakit.bench.config import Config
from metakit.bench.memory import PeakRSS, SavedTensorCounter
from metakit.bench.strategies import STRATEGIES, canonical_strategy, entry, names, unsupported_reason
from metakit.bench.worker import classify_failure


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
    assert canonical_strategy('SecondOrder(hvp="forward")') == "second-order-forward"
    assert canonical_strategy("SecondOrder(checkpoint=4)") == "second-order-checkpoint-4"
    with pytest.raises(ValueError, match="valid strategies: " + ", ".join(names())):
        canonical_strategy("third-order")


def test_every_list_of_strategies_comes_from_the_table():
    from metakit.bench.grid import FULL, QUICK, default_strategies

    table = tuple(e.name for e in STRATEGIES)
    core = tuple(e.name for e in STRATEGIES if e.core)
    default = tuple(e.name for e in STRATEGIES if e.default)
    assert len(set(table)) == len(table) and len({e.label for e in STRATEGIES}) == len(table)
    exact_fp32 = {e.name for e in STRATEGIES if e.exact and e.executor is None and e.precision == "fp32"}
    assert set(core) == {n for n in exact_fp32 if entry(n).default} | {"first-order"}
    assert default_strategies("sine") == default_strategies("bert") == default
    assert default_strategies("priming") == core
    assert default_strategies("bert-h128") == tuple(e.name for e in STRATEGIES if e.sweep)
    proximal = tuple(e.name for e in STRATEGIES if e.proximal and e.default)
    assert default_strategies("sine-tanh") == ("second-order", *proximal)
    for grid in (QUICK, FULL):
        assert {s for g in grid for s in g.strategies} <= set(table)
    # issue 9's grid: S = 1, 5, 10, 20 on sine and bert for every exact mode and FirstOrder
    for workload in ("sine", "bert"):
        measured = {(s, n) for g in FULL if g.workload == workload for s in g.strategies for n in g.steps}
        assert {(s, n) for s in core for n in (1, 5, 10, 20)} <= measured
    # issue 20's: the activation-heavy workloads at S = 1, 5, 10, 20, and S = 2 and 16 on every workload
    for workload in ("bert-long", "priming-long"):
        measured = {(s, n) for g in FULL if g.workload == workload for s in g.strategies for n in g.steps}
        assert {(s, n) for s in core for n in (1, 5, 10, 20)} <= measured
    for workload in ("sine", "bert", "priming", "bert-long", "priming-long"):
        measured = {(s, n) for g in FULL if g.workload == workload for s in g.strategies for n in g.steps}
        assert {
            (s, n) for s in ("second-order", "second-order-forward-checkpoint-4") for n in (2, 16)
        } <= measured
    quick = {(g.workload, n) for g in QUICK for n in g.steps}
    assert {("bert", 5), ("priming", 5), ("bert-long", 5)} <= quick  # what the lean modes are for shows


def test_strategies_are_built_lazily_and_missing_options_are_unsupported():
    import inspect

    import metakit as mk
    from metakit.bench.strategies import build_strategy

    assert isinstance(build_strategy("truncated-1"), mk.Truncated)
    for name in ("second-order-forward", "second-order-checkpoint-4"):
        assert entry(name).exact and entry(name).hand_written == "second-order"
        keyword = "hvp" if "forward" in name else "checkpoint"
        if keyword in inspect.signature(mk.SecondOrder).parameters:
            assert unsupported_reason(name) is None
        else:  # metakit has not got the mode yet: the benchmark still imports and says why
            assert entry(name).code in unsupported_reason(name)
    assert entry("an-old-records-name").label == "an-old-records-name"


def test_plot_styles_are_distinct_for_any_number_of_strategies():
    from metakit.bench.plots import strategy_styles

    styles = strategy_styles([*names(), *(f"extra-{i}" for i in range(30))])
    assert len(styles) == len(STRATEGIES) + 30
    assert len({(s.color, s.marker, s.linestyle) for s in styles.values()}) == len(styles)


def test_proximal_reference_matches_the_closed_form_of_ridge_regression():
    """φ* = (A + λI)⁻¹(b + λθ) for L = ‖Xφ − y‖²/n, so dL_q(φ*)/dθ = λ(A + λI)⁻¹ ∇L_q(φ*), A = 2XᵀX/n."""
    from torch import nn

    from metakit.bench.reference import proximal_reference_gradient
    from metakit.task import Task

    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).double()
    lam = 0.7

    def loss_fn(forward, batch):
        x, y = batch
        return ((forward(x).squeeze(-1) - y) ** 2).mean()

    tasks = [
        Task((torch.randn(10, 6, dtype=torch.float64), torch.randn(10, dtype=torch.float64)),
             (torch.randn(8, 6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)))
        for _ in range(3)
    ]  # fmt: skip
    theta = model.weight.detach().reshape(-1)
    expected = torch.zeros(6, dtype=torch.float64)
    for task in tasks:
        (xs, ys), (xq, yq) = task.support, task.query
        a, b = 2 * xs.T @ xs / len(ys), 2 * xs.T @ ys / len(ys)
        phi = torch.linalg.solve(a + lam * torch.eye(6, dtype=torch.float64), b + lam * theta)
        query_grad = 2 * xq.T @ (xq @ phi - yq) / len(yq)
        expected += (
            lam * torch.linalg.solve(a + lam * torch.eye(6, dtype=torch.float64), query_grad) / len(tasks)
        )
    result = proximal_reference_gradient(model, loss_fn, tasks, ["weight"], ["weight"], lam=lam, tol=1e-12)
    assert result.converged and result.optimality_residual <= 1e-12
    torch.testing.assert_close(result.grads["weight"].reshape(-1), expected, rtol=1e-9, atol=1e-12)


def test_proximal_reference_outer_only_gradient_matches_finite_differences():
    """An outer-only scale s on y = s·Xφ reaches the query loss directly and through φ*(θ, s)."""
    from torch import nn

    from metakit.bench.reference import proximal_reference_gradient
    from metakit.task import Task

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
            self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return self.scale * (x @ self.weight)

    torch.manual_seed(1)
    model, lam = Scaled(), 2.0
    xs, ys, xq, yq = (torch.randn(*shape, dtype=torch.float64) for shape in ((9, 4), (9,), (7, 4), (7,)))
    task = Task((xs, ys), (xq, yq))

    def loss_fn(forward, batch):
        x, y = batch
        return ((forward(x) - y) ** 2).mean()

    def outer_objective(scale: float) -> float:  # L_q(φ*(θ, s), s) in closed form
        a = 2 * scale**2 * xs.T @ xs / 9
        b = 2 * scale * xs.T @ ys / 9
        phi = torch.linalg.solve(a + lam * torch.eye(4, dtype=torch.float64), b + lam * model.weight.detach())
        return float(((scale * xq @ phi - yq) ** 2).mean())

    result = proximal_reference_gradient(
        model, loss_fn, [task], ["weight"], ["weight", "scale"], lam=lam, tol=1e-12
    )
    h = 1e-6
    finite_difference = (outer_objective(1.3 + h) - outer_objective(1.3 - h)) / (2 * h)
    assert result.converged
    assert math.isclose(float(result.grads["scale"]), finite_difference, rel_tol=1e-6)


def test_implicit_diagnostics_are_averaged_when_present():
    from types import SimpleNamespace

    from metakit.bench.measure import mean_diagnostics

    result = SimpleNamespace(
        diagnostics={
            "optimality_residual": torch.tensor([0.1, 0.3], dtype=torch.float64),
            "cg_residual": torch.tensor([1e-3, 3e-3], dtype=torch.float64),
        }
    )
    means = mean_diagnostics(result)
    assert math.isclose(means["optimality_residual"], 0.2) and math.isclose(means["cg_residual"], 2e-3)
    assert mean_diagnostics(SimpleNamespace(loss=torch.tensor(1.0))) == {}


def _records_for_plots() -> list[dict]:
    """Synthetic records: every table strategy plus one unknown, on one-S and many-S workloads."""
    records = []
    for position, name in enumerate([*names(), "some-future-strategy"]):
        for workload, steps in (("sine", (1, 5, 10, 20)), ("bert", (1,))):
            for s in steps:
                records.append(
                    {
                        "status": "ok",
                        "config": {"workload": workload, "strategy": name, "steps": s, "device": "cpu"},
                        "time_ms": 10.0 * s + position,
                        "saved_mib": 1.0 + 0.1 * s,
                        "peak_rss_increase_mib": 10.0 + 0.05 * s,
                        "cosine": 1.0 if entry(name).exact else 0.999 - 0.0001 * s,
                    }
                )
    return records


def test_plots_read_well(tmp_path):
    """The pitfalls a new user met: single-point panels, one-label log axes, a 0.998–1.000 cosine axis."""
    import matplotlib.pyplot as plt

    from metakit.bench.plots import _cosine_axis, _steps_axis, _value_axis, write_plots

    written = {p.name for p in write_plots(_records_for_plots(), tmp_path, "cpu")}
    assert written == {"time_vs_steps.png", "memory_vs_steps.png", "fidelity_vs_cost.png"}

    figure, axis = plt.subplots()
    _steps_axis(axis, [1])  # one S: the axis is labelled 1, not 0.96 ... 1.04
    assert list(axis.get_xticks()) == [1] and axis.get_xlim()[0] < 0.8
    _value_axis(axis, [10.1, 10.2, 11.6], "MiB")  # a narrow range: linear from zero, not a one-label log axis
    assert axis.get_yscale() == "linear" and axis.get_ylim()[0] == 0
    _value_axis(axis, [0.3, 80.0], "MiB")
    assert axis.get_yscale() == "log"
    _cosine_axis(axis, [0.998, 1.0])
    low, high = axis.get_ylim()
    assert low <= 0.9 and high >= 1.0
    plt.close(figure)


def test_table_legend_explains_the_outcome_and_shows_residuals_only_when_measured():
    from metakit.bench.report import legend, markdown_table

    record = _records_for_plots()[0]
    record["outcome"] = {
        "meta_steps": 40, "outer_optimizer": "Adam(lr=0.01)", "eval_tasks": 100,
        "query_loss_before": 3.9, "query_loss_after": 1.7,
    }  # fmt: skip
    text = legend([record])
    assert (
        "40 meta-steps" in text
        and "100 held-out tasks" in text
        and "before meta-training: 3.90 at S=1" in text
    )
    assert "residual" not in markdown_table([record])
    implicit = dict(record, config=dict(record["config"], strategy="implicit"), optimality_residual=0.25)
    implicit["fidelity_reference"] = "proximal"
    table = markdown_table([record, implicit])
    assert "inner optimality residual" in table and "2.5e-01" in table and " †" in table
    assert "processes" not in table  # issue 11's column appears once a record has it
    two = dict(record, tasks_per_s=100.0, tasks_per_s_2_processes=180.0)
    assert "| 100.0 / 180.0 |" in markdown_table([two]) and "2 processes" in legend([two])


def test_implicit_above_its_tolerance_is_not_ok_and_says_why():
    from metakit.bench.measure import _unsolved
    from metakit.bench.report import markdown_report

    strategy = mk.Implicit(residual_tol=0.05)
    assert _unsolved(strategy, {"optimality_residual": 0.01, "cg_residual": 1e-4}) == {"residual_tol": 0.05}
    assert _unsolved(mk.SecondOrder(), {"optimality_residual": 1.0}) == {}
    verdict = _unsolved(strategy, {"optimality_residual": 0.3, "cg_residual": 1e-4})
    assert (
        verdict["status"] == "unsolved"
        and "optimality residual 0.3 above residual_tol=0.05" in (verdict["unsolved_note"])
    )

    base = _records_for_plots()[0]
    implicit = dict(
        base,
        config=dict(base["config"], strategy="implicit"),
        optimality_residual=0.3,
        cosine=None,
        cosine_to_second_order=0.91,
        saved_mib=None,
        saved_note="not measurable: the step runs under a torch.func transform",
        **verdict,
    )
    environment = {
        "versions": {"torch": "2.13"}, "machine": {"cpu": "x", "logical_cpus": 2, "memory_gib": 24,
        "platform": "linux"}, "device": "cpu", "torch_threads_per_worker": 1, "python": "3.11",
        "date_utc": "today",
    }  # fmt: skip
    report = markdown_report([base, implicit], environment)
    row = next(line for line in report.splitlines() if "| Implicit |" in line)
    assert "**unsolved**" in row and "0.9100 ‡" in row and "n/m §" in row and "3.0e-01" in row
    assert "Unsolved (Implicit's residuals above its tolerance):" in report
    assert "§ Saved bytes not measurable:" in report and "torch.func transform" in report
    assert "did not complete" not in report  # it was measured; it did not fail


def test_unknown_option_shows_the_bench_usage(capsys):
    from metakit.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--benchmark"])
    message = capsys.readouterr().err
    assert "usage: metakit bench" in message and "unrecognized arguments: --benchmark" in message


def test_from_records_on_a_file_that_is_not_records_is_one_clear_error(tmp_path):
    from metakit.bench.cli import run

    not_records = tmp_path / "README.md"
    not_records.write_text("# a readme\n")
    args = _bench_parser().parse_args(["--from-records", str(not_records), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"README\.md is not a records file of `metakit bench`"):
        run(args)
    assert not (tmp_path / "out").exists()


def _bench_parser() -> argparse.ArgumentParser:
    from metakit.bench.cli import add_arguments

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
    from metakit.bench.cli import run

    args = _bench_parser().parse_args(["--device", "cuda"])
    with pytest.raises(SystemExit, match="no CUDA GPU is available"):
        run(args)


def test_runner_records_are_well_formed(tmp_path):
    from metakit.bench.plots import write_plots
    from metakit.bench.report import markdown_table
    from metakit.bench.runner import run_configs

    other_exact = [e.name for e in STRATEGIES if e.exact and e.name != "second-order"]
    configs = [
        Config("sine", "second-order", 1, repeats=1, outcome_steps=1),
        Config("sine", "first-order", 1, repeats=1),
        # no memory to build BERT in: recorded as out of memory, and the run goes on
        Config("bert", "reptile", 1, repeats=1, memory_limit_gib=1e-6),
        *(Config("sine", name, 2, repeats=1) for name in [*other_exact, "second-order"]),
    ]
    exact, first_order, starved, *modes, exact_s2 = run_configs(configs, progress=False)
    json.dumps([exact, first_order, starved, *modes])  # records are plain JSON

    assert exact_s2["status"] == "ok", exact_s2.get("traceback")
    for name, record in zip(other_exact, modes, strict=True):
        if unsupported_reason(name) is not None:  # the mode is not in this metakit yet
            assert record["status"] == "unsupported" and entry(name).code in record["error"]
            continue
        # every exact mode is SecondOrder()'s gradient, and the hand-written second-order loop's
        assert record["status"] == "ok", record.get("traceback")
        assert math.isclose(record["cosine"], 1.0, abs_tol=1e-5) and record["rel_error"] < 1e-3
        assert math.isclose(record["reference_cosine"], 1.0, abs_tol=1e-5)

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


def test_implicit_agrees_with_the_proximal_reference_where_its_inner_problem_is_solved():
    """On the smooth sine, metakit's Implicit with a solved inner problem gives the reference's gradient."""
    import torchopt

    import metakit as mk
    from metakit.bench.measure import cosine_and_relative_error
    from metakit.bench.reference import proximal_reference_gradient
    from metakit.bench.workloads import WORKLOADS
    from metakit.task import Task

    built = WORKLOADS["sine-tanh"].build(torch.device("cpu"))
    model = built.model.double()
    tasks = [
        Task(tuple(t.double() for t in task.support), tuple(t.double() for t in task.query))
        for task in built.tasks[:2]
    ]
    names = built.inner.names(model)
    reference = proximal_reference_gradient(model, built.loss_fn, tasks, names, names, lam=10.0, tol=1e-8)
    assert reference.converged and reference.optimality_residual <= 1e-8

    def implicit_gradient(steps: int) -> dict[str, torch.Tensor]:
        learner = mk.MetaLearner(
            model,
            built.loss_fn,
            inner=mk.InnerLoop(params=built.inner, optimizer=torchopt.sgd(lr=0.05), steps=steps),
            outer_params=built.outer,
            strategy=mk.Implicit(lam=10.0, cg_steps=60, rtol=1e-12),
        )
        model.zero_grad(set_to_none=True)
        learner.meta_step(tasks)
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    solved_cosine, solved_error = cosine_and_relative_error(implicit_gradient(400), reference.grads)
    unsolved_cosine, _ = cosine_and_relative_error(implicit_gradient(2), reference.grads)
    assert solved_cosine > 1 - 1e-8 and solved_error < 1e-4
    assert unsolved_cosine < solved_cosine  # the reference tells an unsolved inner problem apart


def test_proximal_fidelity_is_cached_per_run_and_needs_a_converged_reference(tmp_path, monkeypatch):
    import functools
    from types import SimpleNamespace

    from metakit.bench import measure
    from metakit.bench.measure import _proximal_fidelity
    from metakit.bench.workloads import WORKLOADS

    built = WORKLOADS["sine-tanh"].build(torch.device("cpu"))
    built.tasks = built.tasks[:2]
    names = built.inner.names(built.model)
    grads = {n: torch.ones_like(p) for n, p in built.model.named_parameters()}
    config = Config("sine-tanh", "implicit", 1, grad_path=str(tmp_path / "sine-tanh__implicit__S1.grad.pt"))

    solved = _proximal_fidelity(config, built, SimpleNamespace(lam=10.0), grads, names, names)
    assert solved["proximal_reference"]["converged"] and -1 <= solved["cosine"] <= 1
    assert (tmp_path / "sine-tanh__proximal-10.pt").exists()
    again = _proximal_fidelity(config, built, SimpleNamespace(lam=10.0), grads, names, names)
    assert again["cosine"] == solved["cosine"]  # read back, not recomputed

    # λ = 1 needs thousands of steps here; 20 leave the reference unconverged
    short = functools.partial(measure.proximal_reference_gradient, max_steps=20)
    monkeypatch.setattr(measure, "proximal_reference_gradient", short)
    with_unsolvable = _proximal_fidelity(config, built, SimpleNamespace(lam=1.0), grads, names, names)
    assert "cosine" not in with_unsolvable and "did not converge" in with_unsolvable["fidelity_note"]


def test_a_record_is_found_again_by_its_configuration():
    """The runner drops a record's scratch gradient path; the run still maps configurations to records
    (at its end, and when a run resumes from records.partial.jsonl)."""
    from dataclasses import replace

    from metakit.bench.cli import _key, _key_of

    config = Config("sine", "second-order", 2, repeats=1)
    record = {"status": "ok", "config": json.loads(replace(config, grad_path="/tmp/x.grad.pt").to_json())}
    record["config"].pop("grad_path")
    assert _key_of(record) == _key(config)
    assert _key_of(record) != _key(replace(config, steps=3))


def test_saved_bytes_that_do_not_fit_are_not_measurable_and_say_why(monkeypatch):
    """Counting holds every saved storage until the step ends; running out of memory doing so leaves
    the column empty with the reason, and the rest of the record is measured."""
    from metakit.bench import measure as measure_module
    from metakit.bench.config import Config

    enter, calls = measure_module.SavedTensorCounter.__enter__, []

    def out_of_memory_once(self):  # metakit's step runs out; the hand-written loop's count is fine
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 2097152 bytes."
            )
        return enter(self)

    monkeypatch.setattr(measure_module.SavedTensorCounter, "__enter__", out_of_memory_once)
    record = measure_module.measure(
        Config(workload="sine", strategy="second-order-forward", steps=1, repeats=1)
    )
    assert record["status"] == "ok" and record["saved_mib"] is None
    assert "ran out of memory" in record["saved_note"] and "can't allocate memory" in record["saved_note"]
    assert record["time_ms"] > 0 and record["peak_rss_increase_mib"] is not None
