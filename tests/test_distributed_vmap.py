"""``Distributed(local=Vmap())``: 2 gloo processes give the single-process ``Sequential`` meta-gradient.

One ``torch.multiprocessing.spawn`` session runs every case on both ranks and saves what it measured;
the tests assert on that (float64, 1e-10). Each rank also computes the ``Sequential`` reference itself.
"""

from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist
import torchopt
from spawned_ranks import spawn_ranks
from torch import nn

import metakit as mk
from metakit.executors import Distributed, Sequential, Vmap, rank_tasks
from metakit.tasks import SineTasks, mse_loss

WORLD = 2
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
STRATEGIES = {"second-order": mk.SecondOrder, "first-order": mk.FirstOrder}
N_TASKS = (3, 4)  # 3 tasks on 2 ranks: an uneven split (rank 0 vmaps 2 tasks, rank 1 one)


def learner(strategy: mk.Strategy, executor) -> mk.MetaLearner:
    """A small functional MLP: outer = the first two layers, inner = the last two, head carried over."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    return mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(mk.select("2.*", "4.*"), torchopt.sgd(lr=0.1), steps=2),
        outer_params=mk.select("0.*", "2.*"),
        strategy=strategy,
        executor=executor,
        inner_only="first_task",
    )


class CountingVmap(Vmap):
    """Vmap that records how many tasks this rank batched."""

    def __init__(self):
        super().__init__()
        self.ran: list[int] = []

    def run(self, strategy, problems):
        self.ran.append(len(problems))
        return super().run(strategy, problems)


def measure(meta_learner: mk.MetaLearner, n_tasks: int) -> dict:
    result = meta_learner.meta_step(SineTasks(seed=7, dtype=torch.float64).sample(n_tasks))
    return {
        "grads": {n: p.grad.clone() for n, p in meta_learner.model.named_parameters() if p.grad is not None},
        "query_losses": result.query_losses,
        "inner_losses": result.inner_losses,
        "params": {n: p.detach().clone() for n, p in meta_learner.model.named_parameters()},
    }


def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    saved: dict = {}
    try:
        for name, strategy in STRATEGIES.items():
            for n_tasks in N_TASKS:
                key = f"{name}/{n_tasks}"
                saved[f"{key}/sequential"] = measure(learner(strategy(), Sequential()), n_tasks)
                local = CountingVmap()
                saved[f"{key}/distributed"] = measure(
                    learner(strategy(), Distributed(local=local, timeout=60)), n_tasks
                )
                saved[f"{key}/ran"] = local.ran
    except Exception:
        saved["crash"] = traceback.format_exc()
    finally:
        dist.destroy_process_group()
    torch.save(saved, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return spawn_ranks(worker, WORLD)


@pytest.mark.parametrize("n_tasks", N_TASKS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_distributed_vmap_gives_the_sequential_meta_gradient(ranks, strategy, n_tasks):
    key = f"{strategy}/{n_tasks}"
    for rank, measured in enumerate(ranks):
        sequential, distributed = measured[f"{key}/sequential"], measured[f"{key}/distributed"]
        assert (
            sequential["grads"].keys()
            == distributed["grads"].keys()
            == {
                "0.weight",
                "0.bias",
                "2.weight",
                "2.bias",
            }
        )
        for name, grad in sequential["grads"].items():
            assert grad.dtype == torch.float64 and grad.abs().max() > 0
            torch.testing.assert_close(distributed["grads"][name], grad, **TOLERANCE, msg=f"{key} {name}")
        for what in ("query_losses", "inner_losses"):
            torch.testing.assert_close(distributed[what], sequential[what], **TOLERANCE, equal_nan=True)
        # The carried-over head (layer 4) is task 0's, which only rank 0 ran.
        for name, value in sequential["params"].items():
            torch.testing.assert_close(distributed["params"][name], value, **TOLERANCE, msg=f"{key} {name}")
        assert measured[f"{key}/ran"] == [len(rank_tasks(n_tasks, rank, WORLD))]
