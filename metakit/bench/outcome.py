"""Outcome: post-adaptation query loss after a fixed meta-training budget (sine regression)."""

from __future__ import annotations

import time

import torch

import metakit as mk
from metakit.bench.workloads import BuiltWorkload

__all__ = ["evaluate", "meta_train_and_evaluate"]

OUTER_LR = 1e-2  # Adam; larger than MAML's 1e-3 so that a budget of tens of meta-steps shows progress
EVAL_TASKS = 100
EVAL_SEED = 10_000  # held-out tasks; training meta-batches use seeds 1, 2, ...


def evaluate(learner: mk.MetaLearner, built: BuiltWorkload, tasks: list[mk.Task]) -> float:
    """Mean query loss after adapting to each task's support batch with the learner's inner loop."""
    losses = []
    for task in tasks:
        adapted = learner.adapt(task)
        with torch.no_grad():
            losses.append(float(built.loss_fn(mk.bind(built.model, adapted), task.query)))
    return sum(losses) / len(losses)


def meta_train_and_evaluate(learner: mk.MetaLearner, built: BuiltWorkload, budget: int) -> dict:
    """Meta-train for ``budget`` meta-steps (Adam on the outer parameters), then evaluate on held-out tasks."""
    if built.sample_tasks is None:
        raise ValueError("this workload has no task sampler, so it has no outcome measurement")
    held_out = built.sample_tasks(EVAL_TASKS, EVAL_SEED)
    before = evaluate(learner, built, held_out)
    optimizer = torch.optim.Adam(learner.outer_parameters(), lr=OUTER_LR)
    started = time.perf_counter()
    for step in range(budget):
        optimizer.zero_grad(set_to_none=True)
        learner.meta_step(built.sample_tasks(len(built.tasks), 1 + step))
        optimizer.step()
    seconds = time.perf_counter() - started
    return {
        "meta_steps": budget,
        "outer_optimizer": f"Adam(lr={OUTER_LR})",
        "eval_tasks": EVAL_TASKS,
        "query_loss_before": before,
        "query_loss_after": evaluate(learner, built, held_out),
        "train_seconds": seconds,
    }
