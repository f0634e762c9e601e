"""TensorBoard logs are readable back; sine MAML actually learns."""

import matplotlib.pyplot
import pytest
import torch
import torchopt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metakit as mk
from metakit import recipes
from metakit.learner import MetaStepResult
from metakit.logging import TensorBoardLogger, _curve_figure
from metakit.tasks import SineTasks, mse_loss, sine_mlp


def test_event_file_holds_inner_loss_curve_query_loss_grad_norms_and_lrs(tmp_path):
    torch.manual_seed(0)
    model = sine_mlp(hidden=8)
    logger = TensorBoardLogger(tmp_path, per_task=True, curve_every=2, hparams={"inner_lr": 0.01, "steps": 3})
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.01), steps=3, learn_lr=True),
        outer_params=mk.everything(),
        strategy=mk.SecondOrder(),
        logger=logger,
    )
    tasks = SineTasks(k_shot=5, k_query=5).sample(2)
    results = [learner.meta_step(tasks) for _ in range(3)]
    logger.close()

    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"inner_loss/step_{s}" for s in range(4)} <= tags
    assert {f"inner_loss_task_{t}/step_{s}" for t in range(2) for s in range(4)} <= tags
    assert {"meta/query_loss", "grad_norm/shared", "grad_norm/inner_lr", "grad_norm/total"} <= tags
    assert "inner_lr_scale/0.weight" in tags
    step1 = events.Scalars("inner_loss/step_1")
    assert [e.step for e in step1] == [0, 1, 2]
    assert step1[2].value == torch.tensor(results[2].inner_losses[:, 1].mean().item()).item()
    query = [e.value for e in events.Scalars("meta/query_loss")]
    assert query == [torch.tensor(float(r.loss)).item() for r in results]
    assert "inner_loss/curve" in events.Tags()["images"]
    # The custom-scalars layout: the support loss before and after the inner loop in one chart, and no
    # panel that would stay empty (no diagnostics here).
    (layout,) = events.Tensors("custom_scalars__config__")
    text = layout.tensor_proto.string_val[0]
    assert b"inner_loss/step_3" in text and b"inner_loss/step_0" in text  # a band from after up to before
    assert b"diagnostics" not in text


def test_sine_maml_learns_well_below_the_untrained_baseline():
    torch.manual_seed(0)
    model = sine_mlp()
    learner = recipes.maml(model, mse_loss, inner_lr=0.01, steps=1)
    optimizer = torch.optim.Adam(learner.outer_parameters(), lr=3e-3)
    train, test = SineTasks(seed=0), SineTasks(seed=1).sample(50)

    def post_adaptation_loss():
        return float(torch.stack([mse_loss(mk.bind(model, learner.adapt(t)), t.query) for t in test]).mean())

    baseline = post_adaptation_loss()
    for _ in range(300):
        learner.meta_step(train.sample(10))
        optimizer.step()
        optimizer.zero_grad()
    trained = post_adaptation_loss()
    assert trained < 0.6 * baseline, (baseline, trained)


def _scalars(log_dir) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events


def test_diagnostics_are_logged_as_mean_and_max_over_tasks(tmp_path):
    result = MetaStepResult(
        loss=torch.tensor(0.5),
        inner_losses=torch.tensor([[1.0, 0.5], [2.0, 1.0]]),
        query_losses=torch.tensor([0.4, 0.6]),
    )
    result.diagnostics = {
        "cg_residual": torch.tensor([1e-3, 3e-3]),
        "optimality_residual": torch.tensor([0.25, 0.75]),
    }
    with TensorBoardLogger(tmp_path) as logger:
        logger.log_meta_step(7, result, None)
        plain = MetaStepResult(result.loss, result.inner_losses, result.query_losses)
        logger.log_meta_step(8, plain, None)  # a result without diagnostics logs none
    events = _scalars(tmp_path)
    expected = {
        "diagnostics/cg_residual/mean": 2e-3,
        "diagnostics/cg_residual/max": 3e-3,
        "diagnostics/optimality_residual/mean": 0.5,
        "diagnostics/optimality_residual/max": 0.75,
    }
    for tag, value in expected.items():
        (event,) = events.Scalars(tag)
        assert event.step == 7 and abs(event.value - value) < 1e-9, (tag, event.value)


@pytest.mark.parametrize("steps", [1, 3, 25])
def test_inner_curve_figure_labels_inner_steps_as_integers(steps):
    losses = torch.rand(3, steps + 1)
    fig = _curve_figure(losses, step=0)
    fig.canvas.draw()
    (ax,) = fig.axes
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    labels = [label.get_text().replace("−", "-") for label in ax.get_xticklabels() if label.get_text()]
    assert all(label.lstrip("-").isdigit() for label in labels), labels
    if steps == 1:
        assert labels == ["0", "1"]
    if steps <= 10:
        assert ticks == list(range(steps + 1))  # every step gets its own tick
    matplotlib.pyplot.close(fig)


def test_every_meta_learner_shows_the_query_loss_before_and_after_and_the_gain(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = sine_mlp(hidden=16)
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.05), steps=3),
        outer_params=mk.everything(),
        strategy=mk.SecondOrder(),
    )
    tasks = SineTasks(seed=0).sample(4)
    plain = learner.meta_step(tasks)
    assert plain.query_losses_before is None and plain.adaptation_gain is None
    model.zero_grad()
    result = learner.meta_step(tasks, query_loss_before=True)
    assert result.query_losses_before.shape == (4,)
    with torch.no_grad():  # the query loss at the start values, computed by hand
        by_hand = torch.stack([mse_loss(mk.bind(model, {}), task.query) for task in tasks])
    torch.testing.assert_close(result.query_losses_before, by_hand)
    gain = float((by_hand - result.query_losses).mean())
    assert abs(result.adaptation_gain - gain) < 1e-6
    torch.testing.assert_close(result.query_losses, plain.query_losses)  # measuring changes nothing

    with TensorBoardLogger(tmp_path / "run") as logger:
        learner.meta_step(tasks, logger)
    events = EventAccumulator(str(tmp_path / "run")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"adaptation/query_loss_before", "adaptation/gain", "meta/query_loss"} <= tags
    assert "grad_norm/shared" in tags and "grad_norm/total" not in tags  # one group: no duplicate line
    (before,), (gain,), (after,) = (
        events.Scalars(t) for t in ("adaptation/query_loss_before", "adaptation/gain", "meta/query_loss")
    )
    assert abs(before.value - after.value - gain.value) < 1e-5
