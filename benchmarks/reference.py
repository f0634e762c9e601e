"""Hand-written MAML loops with ``torch.func.functional_call`` and ``torch.autograd.grad``.

The yardstick for metakit's overhead and a check of its gradients: the plainest code that does the
same work as ``MetaLearner.meta_step`` with an SGD inner loop under ``SecondOrder`` or ``FirstOrder``,
without specs, strategies, traces or checks. It deliberately shares no code with metakit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from metakit.task import LossFn, Task

__all__ = ["REFERENCE_STRATEGIES", "reference_meta_step"]

#: Strategies the hand-written loop reproduces (name -> differentiate through inner gradients).
REFERENCE_STRATEGIES = {"second-order": True, "first-order": False}


def reference_meta_step(
    model: nn.Module,
    loss_fn: LossFn,
    tasks: Sequence[Task],
    inner_names: Sequence[str],
    outer_names: Sequence[str],
    lr: float,
    steps: int,
    second_order: bool,
    head_from_first_task: bool = False,
) -> torch.Tensor:
    """One meta-step: accumulate the mean-over-tasks meta-gradient into ``.grad`` of the outer params.

    Args:
        model: the module; run with ``functional_call``, never modified except ``.grad`` (and the
            head, if ``head_from_first_task``).
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        tasks: the meta-batch.
        inner_names: parameters updated by SGD on the support batch.
        outer_names: parameters that receive the meta-gradient.
        lr: inner SGD learning rate.
        steps: inner SGD steps.
        second_order: keep the graph of the inner gradients (MAML) or treat them as constants (FOMAML).
        head_from_first_task: afterwards set params in ``inner - outer`` to the first task's adapted
            values (priming's Algorithm 1).

    Returns:
        The mean query loss (detached).
    """
    params = dict(model.named_parameters())
    outer = [params[n] for n in outer_names]
    outer_set = set(outer_names)
    first_adapted: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=outer[0].device)
    # Fused attention kernels have no double backward; the math kernel computes the same function.
    attention = sdpa_kernel([SDPBackend.MATH]) if second_order else contextlib.nullcontext()
    with attention:
        for index, task in enumerate(tasks):
            fast = {n: params[n] for n in inner_names}
            for _ in range(steps):
                loss = loss_fn(_bound(model, params, fast), task.support)
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
                fast = {n: w - lr * g for (n, w), g in zip(fast.items(), grads, strict=True)}
            query_loss = loss_fn(_bound(model, params, fast), task.query)
            torch.autograd.backward(query_loss / len(tasks), inputs=outer)
            total += query_loss.detach()
            if index == 0:
                first_adapted = {n: w.detach() for n, w in fast.items() if n not in outer_set}
    if head_from_first_task:
        with torch.no_grad():
            for name, value in first_adapted.items():
                params[name].copy_(value)
    return total / len(tasks)


def _bound(model: nn.Module, params: dict, fast: dict) -> Callable:
    merged = {**params, **fast}
    return lambda *args, **kwargs: functional_call(model, merged, args, kwargs)
