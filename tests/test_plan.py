"""mk.plan: fake-trace predictions against the same count on real tensors, recommendations, bad input, CLI."""

from __future__ import annotations

import pytest
import torch
import torchopt
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import metakit as mk
from metakit.cli import main
from metakit.planning import CostTracker, Device, UnknownDeviceError, get_device
from metakit.planning.planner import Estimate, Mode, Plan
from metakit.planning.trace import OpCost


def _mse(forward, batch):
    x, y = batch
    return ((forward(x) - y) ** 2).mean()


def _problem(model: nn.Module | None = None, steps: int = 3, strategy=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    learner = mk.MetaLearner(
        model,
        _mse,
        inner=mk.InnerLoop(params=mk.everything(), optimizer=torchopt.sgd(lr=0.1), steps=steps),
        outer_params=mk.everything(),
        strategy=strategy or mk.SecondOrder(),
    )
    tasks = [mk.Task((torch.randn(32, 8), torch.randn(32, 1)), (torch.randn(32, 8), torch.randn(32, 1)))]
    return model, learner, tasks


@pytest.mark.parametrize(
    "strategy",
    [mk.SecondOrder(), mk.SecondOrder(hvp="forward"), mk.SecondOrder(checkpoint=2), mk.FirstOrder()],
    ids=repr,
)
def test_fake_trace_counts_what_the_real_step_allocates(strategy):
    model, learner, tasks = _problem(strategy=strategy)
    planned = mk.plan(model, learner, tasks, device="t4").row(repr(strategy))

    with CostTracker() as real, FlopCounterMode(display=False) as flops:
        learner.meta_step(tasks)
    assert real.peak > 0
    # Same code, same graph, same frees: the same bytes, but for the few KB of CPU random state that a
    # recomputing mode saves per segment (a real tensor even while tracing).
    assert planned.step_bytes == pytest.approx(real.peak, abs=8 * 1024)
    assert planned.flops == flops.get_total_flops() == real.flops


def test_plan_leaves_weights_gradients_and_random_state_alone():
    model, learner, tasks = _problem()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    result = mk.plan(model, learner, tasks, device="a100-80gb")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert learner.strategy.__class__ is mk.SecondOrder and learner.model is model
    assert result.resident_bytes == sum(p.nbytes for p in model.parameters()) + sum(
        t.nbytes for task in tasks for t in (*task.support, *task.query)
    )
    assert result.optimizer_bytes == 2 * sum(p.nbytes for p in model.parameters())


def test_memory_grows_with_steps_for_reverse_over_reverse_only_up_to_the_checkpoint():
    short = mk.plan(*_problem(steps=2), device="t4")
    long = mk.plan(*_problem(steps=8), device="t4")
    growth = {r.mode.split("(")[0] + str("hvp" in r.mode): None for r in short.rows}
    assert growth  # the modes are listed
    assert long.row("SecondOrder()").step_bytes > short.row("SecondOrder()").step_bytes
    assert long.row("SecondOrder(checkpoint=3)").step_bytes < long.row("SecondOrder()").step_bytes
    assert long.row("FirstOrder()").step_bytes < long.row("SecondOrder()").step_bytes


def _estimate(label: str, exact: bool, nbytes: int | None, flops: int = 10**12) -> Estimate:
    if nbytes is None:
        return Estimate(Mode(label, lambda: None, exact), note="not planned: ValueError: no")
    return Estimate(Mode(label, lambda: None, exact), nbytes, flops, {OpCost(flops, 0, False): 1})


def test_recommends_the_fastest_exact_mode_that_fits():
    gib = 2**30
    device = Device(memory_gib=11, tflops=1.0, efficiency=1.0, overhead_us=0, reserved_gib=1, fragmentation=0)
    estimates = [
        _estimate("fast-but-big", True, 20 * gib, flops=10**12),
        _estimate("slow-small", True, 2 * gib, flops=4 * 10**12),
        _estimate("medium", True, 8 * gib, flops=2 * 10**12),
        _estimate("first-order", False, 1 * gib, flops=10**11),
        _estimate("broken", True, None),
    ]
    plan = Plan(device, 5, resident_bytes=gib, optimizer_bytes=gib, estimates=estimates)
    assert plan.recommended.mode == "medium"
    assert plan.row("medium").seconds == pytest.approx(2.0)
    assert [r.fits for r in plan.rows] == [False, True, True, True, None]
    assert "fastest exact mode" in plan.advice and "medium" in plan.advice
    assert "recommended" in plan.row("medium").note and "not planned" in plan.row("broken").note
    assert "| medium |" in str(plan)

    small = plan.on(Device(memory_gib=4, tflops=1.0, reserved_gib=1, fragmentation=0))
    assert small.recommended.mode == "first-order"  # no exact mode fits: the approximation, said so
    assert "no exact mode fits" in small.advice
    tiny = plan.on(Device(memory_gib=2, tflops=1.0, reserved_gib=1))
    assert tiny.recommended is None and "nothing fits" in tiny.advice

    from metakit.bench.plan_cli import fits_table, recommended_table

    assert plan.recommended is plan.row("medium")  # the row itself, as the fits table marks it
    devices = [device, small.device, tiny.device]
    fits = fits_table([plan], devices)
    assert "| 5 | medium | 10.0 GiB | **yes**, 2 s | no | no |" in fits
    assert "| 5 | first-order | 3.0 GiB | yes, 0.1 s | **yes**, 0.167 s | no |" in fits
    assert recommended_table([plan], devices).splitlines()[-1].startswith("| 5 | medium, 2 s | first-order, ")
    assert recommended_table([plan], devices).endswith("| nothing fits |")


def test_unknown_device_lists_the_known_ones_and_how_to_give_your_own():
    with pytest.raises(UnknownDeviceError) as error:
        get_device("a100-90gb")
    message = str(error.value)
    assert "a100-80gb" in message and "h200" in message and "memory_gib" in message and "--tflops" in message
    assert "\n" not in message
    model, learner, tasks = _problem()
    with pytest.raises(UnknownDeviceError):
        mk.plan(model, learner, tasks, device="tpu")
    assert get_device("A100_80GB") is get_device("a100-80gb")
    with pytest.raises(ValueError, match="memory_gib"):
        Device(memory_gib=0, tflops=10)


class _ReadsAValue(nn.Module):
    def __init__(self, of: str):
        super().__init__()
        self.linear, self.of = nn.Linear(8, 1), of

    def forward(self, x):
        read = self.linear(x) if self.of == "weights" else x
        scale = read.abs().max().item()  # data-dependent
        return self.linear(x) / scale


def test_a_value_of_the_batch_alone_is_computed_for_real():
    model, learner, tasks = _problem(_ReadsAValue(of="batch"))
    plan = mk.plan(model, learner, tasks, device="t4")
    assert all(row.planned for row in plan.rows)


def test_a_value_that_depends_on_the_weights_is_named_with_its_line_and_no_mode_is_planned():
    model, learner, tasks = _problem(_ReadsAValue(of="weights"))
    plan = mk.plan(model, learner, tasks, device="t4")
    assert plan.recommended is None
    for row in plan.rows:
        assert not row.planned
        assert "aten._local_scalar_dense" in row.note and "test_plan.py" in row.note and "forward" in row.note
        assert "\n" not in row.note


class _NoForwardRule(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)


class _CustomActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(8, 16), nn.Linear(16, 1)

    def forward(self, x):
        return self.second(_NoForwardRule.apply(self.first(x)))


def test_an_op_one_mode_cannot_trace_leaves_the_others_planned():
    model, learner, tasks = _problem(_CustomActivation())
    plan = mk.plan(model, learner, tasks, device="t4")
    forward = [r for r in plan.rows if "forward" in r.mode]
    others = [r for r in plan.rows if "forward" not in r.mode]
    assert forward and all(not r.planned and "not planned" in r.note for r in forward)
    assert all(r.planned and r.fits for r in others)
    assert plan.recommended is not None and plan.recommended.exact


def test_an_op_without_a_fake_kernel_is_named():
    @torch.library.custom_op("metakit_test_plan::opaque", mutates_args=())
    def opaque(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(8, 1)

        def forward(self, x):
            return self.linear(opaque(x))

    model, learner, tasks = _problem(Opaque())
    plan = mk.plan(model, learner, tasks, device="t4")
    assert all(not r.planned and "metakit_test_plan.opaque" in r.note for r in plan.rows)


def test_cli_plans_a_bench_workload(capsys):
    assert main(["plan", "--workload", "sine", "--steps", "1", "--device", "t4", "a100-80gb"]) == 0
    out = capsys.readouterr().out
    assert "| SecondOrder() |" in out and "Recommended: " in out and "which modes fit where" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--device", "a100-90gb"], "unknown device 'a100-90gb'; known: t4"),
        (["--memory-gib", "24"], "needs both --memory-gib and --tflops"),
        (["--workload", "gpt5"], "unknown workload 'gpt5'; known: mbert-priming"),
        (["--steps", "0"], "--steps must be positive"),
    ],
)
def test_cli_errors_are_one_line(capsys, argv, expected):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_validation_table_keeps_calibration_out_of_the_counts_and_lists_every_miss(tmp_path):
    import json

    from metakit.bench.plan_validation import _records, _table

    def record(workload, steps, mode, predicted, measured, status="ok"):
        return {
            "workload": workload,
            "steps": steps,
            "mode": mode,
            "predicted_mib": predicted,
            "measured_mib": measured,
            "load_average": [1.0, 1.0, 1.0],
            "status": status,
        }

    rows = [
        record("sine", 1, "SecondOrder()", 0.2, 10.2),  # first-use cost 10 MiB
        record("bert", 1, "SecondOrder()", 100.0, 210.0),  # ratio 2
        record("bert", 5, "SecondOrder()", 100.0, 200.0, status="not planned: a reason"),
        record("bert", 5, "SecondOrder()", 100.0, 200.0),  # measured later: this one is kept
        record("bert", 10, "SecondOrder()", 100.0, 400.0),  # modelled 210: a miss
        record("sine", 10, "FirstOrder()", 0.2, 0.9),  # modelled 0.4: -56 %, but within the 1 MiB resolution
        record("sine", 5, "FirstOrder()", 0.2, 0.0),  # nothing measurable: no relative error, within 1 MiB
        record("bert-long", 1, "SecondOrder()", None, None, status="not measured: predicted 900 s"),
    ]
    path = tmp_path / "v.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = _records(path)
    assert len(records) == 7 and [r["status"] for r in records if r["steps"] == 5] == ["ok", "ok"]
    table = _table(records)
    assert table.count("| calibration |") == 2 and "| ok |" in table and "| **miss** |" in table
    assert "2 calibration, 4 validating; 1 skipped" in table
    assert "| sine | 5 | FirstOrder() | 0.2 MiB | 0.4 MiB | 0.0 MiB |  |  |" in table
    assert "| sine | 10 | FirstOrder() | 0.2 MiB | 0.4 MiB | 0.9 MiB | -56% |" in table
    assert (
        "1 miss (outside ±25% and more than 1 MiB off); worst error of the rows measured above 1 MiB -48% "
        "(bert, S=10, SecondOrder())"
    ) in table
    assert "- bert, S=10, SecondOrder(): -47.5%" in table
    assert "- bert-long, S=1, SecondOrder(): not measured: predicted 900 s" in table


def test_modes_may_be_given_as_strategies():
    """What a user would pass first: the strategies themselves, not planner Modes."""
    from metakit.planning.planner import _as_mode

    mode = _as_mode(mk.SecondOrder(checkpoint=2))
    assert mode.label == "SecondOrder(checkpoint=2)" and mode.exact and repr(mode.build()) == mode.label
    assert not _as_mode(mk.FirstOrder()).exact
    with pytest.raises(TypeError, match=r"plan\(modes=\.\.\.\) takes metakit strategies"):
        _as_mode("SecondOrder()")
