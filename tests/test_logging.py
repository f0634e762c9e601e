"""TensorBoard logs are readable back; sine MAML actually learns."""

import torch
import torchopt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import metakit as mk
from metakit import recipes
from metakit.logging import TensorBoardLogger
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
    # The custom-scalars layout that draws the inner-loss steps as one multi-line chart.
    (layout,) = events.Tensors("custom_scalars__config__")
    assert rb"inner_loss/step_\d+" in layout.tensor_proto.string_val[0]


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
