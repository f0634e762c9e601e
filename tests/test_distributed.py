"""Distributed executor: 2 CPU processes (gloo) give the single-process meta-gradient, in float64.

Starting processes costs seconds on a loaded 2-core machine, so one 2-process session
(``torch.multiprocessing.spawn``) runs every scenario and saves what it measured; the tests assert
on that. Each rank also computes the single-process (``Sequential``) reference on its own copy.
"""

from __future__ import annotations

import copy
import runpy
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torchopt
from spawned_ranks import spawn_ranks

import metakit as mk
from metakit.executors import Distributed, DistributedError, RankMismatchError, Sequential, rank_tasks
from metakit.tasks import SineTasks, mse_loss, sine_mlp

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TOLERANCE = dict(rtol=1e-10, atol=1e-12)
TINY_BERT = dict(
    num_hidden_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    intermediate_size=32,
    vocab_size=60,
    max_position_embeddings=32,
    num_labels=3,
)


# -- what each rank runs ---------------------------------------------------------------------------
def sine_tasks(n: int) -> list[mk.Task]:
    return SineTasks(seed=3, dtype=torch.float64).sample(n)


def sine_learner(strategy: mk.Strategy, learn_lr: bool = False, inner_only: str = "keep"):
    torch.manual_seed(0)
    model = sine_mlp(hidden=8).double()
    inner = mk.everything() if not strategy.capabilities.outer_only else mk.select("2.*", "4.*")
    return mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(inner, torchopt.sgd(lr=0.05), steps=2, learn_lr=learn_lr),
        outer_params=mk.everything() if not strategy.capabilities.outer_only else mk.select("0.*", "2.*"),
        strategy=strategy,
        inner_only=inner_only,
    )


def bert_loss(forward, batch):
    return forward(**batch).loss


def bert_tasks(n: int) -> list[mk.Task]:
    gen = torch.Generator().manual_seed(5)

    def batch():
        ids = torch.randint(5, TINY_BERT["vocab_size"], (2, 6), generator=gen)
        labels = torch.randint(0, TINY_BERT["num_labels"], (2, 6), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    return [mk.Task(support=batch(), query=batch()) for _ in range(n)]


def priming_learner(strategy: mk.Strategy):
    from transformers import BertConfig, BertForTokenClassification

    from metakit import recipes
    from metakit.peft import add_top_adapter, head_spec

    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(**TINY_BERT)).double().eval()
    adapter = add_top_adapter(model, bottleneck=4, init_std=0.1)
    return recipes.priming(
        model, bert_loss, pe=adapter, head=head_spec(model), inner_lr=0.3, steps=2, strategy=strategy
    )


CASES = {
    # name: (learner factory, tasks factory, number of tasks)
    "second-order-metasgd": (lambda: sine_learner(mk.SecondOrder(), learn_lr=True), sine_tasks, 4),
    "second-order-uneven": (lambda: sine_learner(mk.SecondOrder(), inner_only="first_task"), sine_tasks, 3),
    "first-order-uneven": (lambda: sine_learner(mk.FirstOrder()), sine_tasks, 3),
    "reptile-uneven": (lambda: sine_learner(mk.Reptile()), sine_tasks, 3),
    "implicit": (lambda: sine_learner(mk.Implicit(lam=4.0, cg_steps=5, max_inner_steps=300)), sine_tasks, 3),
    "more-ranks-than-tasks": (lambda: sine_learner(mk.SecondOrder(), inner_only="first_task"), sine_tasks, 1),
    "priming-uneven": (lambda: priming_learner(mk.FirstOrder()), bert_tasks, 3),
    "priming-second-order": (lambda: priming_learner(mk.SecondOrder()), bert_tasks, 2),
}


class CountingSequential(Sequential):
    """Sequential that records how many tasks this rank ran."""

    def __init__(self):
        self.ran: list[int] = []

    def run(self, strategy, problems):
        self.ran.append(len(problems))
        return super().run(strategy, problems)


def measure(learner: mk.MetaLearner, tasks: list[mk.Task]) -> dict:
    """One meta-step: the meta-gradient, the measurements, and the parameters after it."""
    result = learner.meta_step(tasks)
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}
    grads.update({f"lr:{n}": p.grad.clone() for n, p in learner.lr_scales.items() if p.grad is not None})
    return {
        "grads": grads,
        "query_losses": result.query_losses,
        "inner_losses": result.inner_losses,
        "diagnostics": result.diagnostics,
        "params": {n: p.detach().clone() for n, p in learner.model.named_parameters()},
    }


def error_of(run) -> tuple[str, str]:
    try:
        run()
    except Exception as error:
        return type(error).__name__, str(error)
    return "none", ""


def worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    saved: dict = {}
    try:
        for name, (make_learner, make_tasks, n_tasks) in CASES.items():
            reference = make_learner()  # single process, all tasks
            saved[f"{name}/sequential"] = measure(reference, make_tasks(n_tasks))
            learner = make_learner()
            local = CountingSequential()
            learner.executor = Distributed(local=local, timeout=60)
            saved[f"{name}/distributed"] = measure(learner, make_tasks(n_tasks))
            saved[f"{name}/ran"] = local.ran

        # Bad input: rank 1 starts from other parameters.
        learner = sine_learner(mk.FirstOrder())
        learner.executor = Distributed(timeout=60)
        if rank == 1:
            with torch.no_grad():
                learner.model[2].bias.add_(1.0)
        saved["mismatch"] = error_of(lambda: learner.meta_step(sine_tasks(2)))

        # A rank whose task raises: the other rank stops with an error naming it.
        def failing_loss(forward, batch):
            if rank == 1:
                raise ArithmeticError("task data broken on purpose")
            return mse_loss(forward, batch)

        learner = sine_learner(mk.FirstOrder())
        learner.executor = Distributed(timeout=60)
        tasks = [mk.Task(t.support, t.query, loss_fn=failing_loss) for t in sine_tasks(2)]
        saved["failing-rank"] = error_of(lambda: learner.meta_step(tasks))

        # The sine example under 2 processes: 4 meta-steps straight, and 2 + resume to 4.
        example = runpy.run_path(str(ROOT / "examples" / "sine_maml.py"), run_name="sine_maml")["main"]
        common = ["--tasks-per-step", "5", "--eval-tasks", "2", "--checkpoint-every", "1", "--out"]
        example([*common, f"{out}/runs", "--meta-steps", "4", "--checkpoint", f"{out}/straight.pt"])
        example([*common, f"{out}/runs", "--meta-steps", "2", "--checkpoint", f"{out}/resumed.pt"])
        dist.barrier()  # rank 0 has written the checkpoint every rank resumes from
        example(
            [*common, f"{out}/runs", "--meta-steps", "4", "--checkpoint", f"{out}/resumed.pt", "--resume"]
        )

        # A rank that stops taking part: the other one gives up after the timeout instead of hanging.
        learner = sine_learner(mk.FirstOrder())
        learner.executor = Distributed(timeout=1.5)
        if rank == 0:
            start = time.perf_counter()
            saved["timeout"] = (
                *error_of(lambda: learner.meta_step(sine_tasks(2))),
                time.perf_counter() - start,
            )
        else:
            time.sleep(4)
    except Exception:
        saved["crash"] = traceback.format_exc()
    torch.save(saved, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    def checkpoints(out: str) -> dict:
        return {
            f"checkpoint/{name}": torch.load(f"{out}/{name}.pt", weights_only=True)
            for name in ("straight", "resumed")
        }

    return spawn_ranks(worker, WORLD, collect=checkpoints)


# -- the tests ----------------------------------------------------------------------------------------
def test_rank_tasks_is_strided_and_covers_every_task_once():
    assert rank_tasks(5, 0, 2) == [0, 2, 4] and rank_tasks(5, 1, 2) == [1, 3]
    assert rank_tasks(1, 1, 2) == []
    assert sorted(i for r in range(3) for i in rank_tasks(7, r, 3)) == list(range(7))


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_give_the_single_process_meta_gradient(ranks, case):
    for rank, measured in enumerate(ranks):
        sequential, distributed = measured[f"{case}/sequential"], measured[f"{case}/distributed"]
        assert sequential["grads"].keys() == distributed["grads"].keys() and sequential["grads"]
        for name, grad in sequential["grads"].items():
            assert grad.dtype == torch.float64
            torch.testing.assert_close(
                distributed["grads"][name], grad, **TOLERANCE, msg=f"{case} rank {rank} {name}"
            )
        for key in ("query_losses", "inner_losses"):  # inner_losses[:, -1] is NaN: not traced
            torch.testing.assert_close(distributed[key], sequential[key], **TOLERANCE, equal_nan=True)
        assert distributed["diagnostics"].keys() == sequential["diagnostics"].keys()
        for name, value in sequential["diagnostics"].items():
            torch.testing.assert_close(distributed["diagnostics"][name], value, **TOLERANCE)
        # inner_only="first_task" (priming's head): the first task's adapted head on every rank.
        for name, value in sequential["params"].items():
            torch.testing.assert_close(distributed["params"][name], value, **TOLERANCE)


def test_each_rank_runs_only_its_share_of_the_tasks(ranks):
    for name, (_, _, n_tasks) in CASES.items():
        ran = [measured[f"{name}/ran"] for measured in ranks]
        expected = [
            [len(rank_tasks(n_tasks, r, WORLD))] if rank_tasks(n_tasks, r, WORLD) else []
            for r in range(WORLD)
        ]
        assert ran == expected, name


def test_cases_cover_what_they_claim(ranks):
    n_tasks = {name: CASES[name][2] for name in CASES}
    assert n_tasks["more-ranks-than-tasks"] < WORLD and n_tasks["priming-uneven"] % WORLD
    metasgd = ranks[1]["second-order-metasgd/distributed"]["grads"]
    assert any(name.startswith("lr:") for name in metasgd)
    # The priming head really is carried over from task 0 (it moved), which rank 1 did not run.
    before = priming_learner(mk.FirstOrder()).model.classifier.weight
    after = ranks[1]["priming-uneven/distributed"]["params"]["classifier.weight"]
    assert not torch.allclose(before, after)
    assert "cg_residual" in ranks[1]["implicit/distributed"]["diagnostics"]


def test_ranks_with_different_parameters_raise_an_error_naming_them(ranks):
    for measured in ranks:
        kind, message = measured["mismatch"]
        assert kind == RankMismatchError.__name__
        assert "rank(s) [1] differ from rank 0" in message and "2.bias" in message


def test_a_failing_rank_stops_the_others_with_its_error(ranks):
    kind, message = ranks[0]["failing-rank"]
    assert kind == DistributedError.__name__
    assert "rank(s) [1]" in message and "task data broken on purpose" in message
    assert ranks[1]["failing-rank"] == ("ArithmeticError", "task data broken on purpose")


def test_a_rank_that_stops_taking_part_times_out(ranks):
    kind, message, seconds = ranks[0]["timeout"]
    assert kind == DistributedError.__name__ and "waited more than 0:00:01.5" in message
    assert seconds < 30  # the group's own timeout is 30 minutes: the executor's applied


def test_the_sine_example_resumed_on_two_processes_ends_where_the_uninterrupted_run_does(ranks):
    straight, resumed = ranks[0]["checkpoint/straight"], ranks[0]["checkpoint/resumed"]
    assert straight["learner"]["step"] == resumed["learner"]["step"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert straight["optimizer"]["state"][0]["step"] == resumed["optimizer"]["state"][0]["step"] == 4


def test_without_a_process_group_the_error_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    learner = sine_learner(mk.FirstOrder())
    learner.executor = Distributed()
    with pytest.raises(DistributedError, match="torchrun --nproc_per_node"):
        learner.meta_step(sine_tasks(2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(timeout=0), "positive"),
        (dict(share_adapted="some"), "inner_only"),
        (dict(local=Distributed()), "single-process"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Distributed(**kwargs)


def test_share_adapted_all_broadcasts_every_inner_parameter():
    # Single-process group: checks the bookkeeping without a second process.
    with tempfile.TemporaryDirectory() as out:
        dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=0, world_size=1)
        try:
            learner = sine_learner(mk.SecondOrder())
            reference = copy.deepcopy(learner)
            executor = Distributed(share_adapted="all", timeout=timedelta(seconds=30))
            problems = [
                learner._problem(t, i, learner._partition(dict(learner.model.named_parameters())), None)
                for i, t in enumerate(sine_tasks(3))
            ]
            batch = executor.run(learner.strategy, problems)
            expected = reference.adapt(sine_tasks(3)[0])
            assert batch.first_adapted.keys() == expected.keys()
            for name, value in expected.items():
                torch.testing.assert_close(batch.first_adapted[name], value, **TOLERANCE)
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_the_sine_example_under_torchrun_writes_a_checkpoint_and_resumes(tmp_path):
    import os
    import subprocess
    import sys

    def torchrun(*args: str) -> str:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        command += [str(ROOT / "examples" / "sine_maml.py"), "--tasks-per-step", "4", "--eval-tasks", "2"]
        command += ["--out", str(tmp_path / "runs"), "--checkpoint", str(tmp_path / "ckpt.pt"), *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    first = torchrun("--meta-steps", "3")
    assert "at meta-step 0 -> " in first and "at 3 (" in first
    out = torchrun("--meta-steps", "5", "--resume")
    assert "at meta-step 3 -> " in out and "at 5 (" in out and "2 process(es)" in out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["learner"]["step"] == 5


def test_under_torchrun_environment_the_executor_creates_the_group(monkeypatch):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in dict(WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    reference, learner = sine_learner(mk.SecondOrder()), sine_learner(mk.SecondOrder())
    learner.executor = Distributed(timeout=30)
    try:
        reference.meta_step(sine_tasks(3))
        learner.meta_step(sine_tasks(3))
        assert dist.is_initialized() and dist.get_backend() == "gloo"
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    for want, got in zip(reference.outer_parameters(), learner.outer_parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, **TOLERANCE)
