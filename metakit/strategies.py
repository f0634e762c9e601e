"""Strategies: how the meta-gradient flows from a task's query loss back to the outer parameters.

A strategy is the only thing that changes between gradient approximations. Every strategy
implements one method, :meth:`Strategy.task_gradient`, and reaches the inner loop only through
:meth:`InnerLoop.init`, :meth:`InnerLoop.step` and :meth:`InnerLoop.adapt`. The unrolled family
(:class:`SecondOrder`, :class:`FirstOrder`, :class:`Truncated`) shares :class:`Unrolled`: they
differ in how many of the last inner steps are differentiated and, for ``SecondOrder``, in how the
differentiated steps are run (:mod:`metakit.lean`). :class:`Reptile` and :class:`Implicit` replace
the backward pass.

For a parameter in both the inner and the outer set, the meta-gradient is the gradient of the query
loss with respect to its value where the differentiated steps start (the steps before count as
identity). An outer-only parameter (the backbone in priming) gets the gradient of the query loss
through every differentiated step plus its direct term.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping

import torch

from metakit.functional import double_backward_safe
from metakit.inner import Adaptation
from metakit.lean import (
    ForwardModeError,
    forward_mode_error,
    unroll_checkpointed,
    unroll_forward_over_reverse,
)
from metakit.problem import Partition, Strategy, TaskGradient, TaskProblem, detached, gradients_by_name

__all__ = [
    "FirstOrder",
    "ForwardModeError",
    "Implicit",
    "Partition",
    "Reptile",
    "SecondOrder",
    "Strategy",
    "TaskGradient",
    "TaskProblem",
    "Truncated",
    "Unrolled",
]

Params = dict[str, torch.Tensor]


class Unrolled(Strategy):
    """The unrolled family: back-propagate the query loss through the last ``differentiable_steps`` steps."""

    @abc.abstractmethod
    def differentiable_steps(self, steps: int) -> int:
        """How many of the last ``steps`` inner steps the meta-gradient goes through."""

    def unroll(self, problem: TaskProblem) -> Adaptation:
        """Run the inner loop, keeping what the meta-gradient needs of the differentiated steps."""
        return problem.adapt(self.differentiable_steps(problem.inner.steps))

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        # Entered once here rather than at every differentiated inner step.
        with double_backward_safe(self.differentiable_steps(problem.inner.steps) > 0):
            adapted = self.unroll(problem)
            query_loss = problem.query_loss(adapted.params)
        targets = {name: adapted.anchor[name] for name in problem.shared}
        targets.update(problem.outer_only)
        lr_scales = dict(problem.lr_scales or {})
        grads = self.backward(
            query_loss, {**targets, **{f"lr:{k}": v for k, v in lr_scales.items()}}, problem.loss_scale
        )
        return TaskGradient(
            query_loss=query_loss.detach(),
            inner_losses=adapted.losses,
            grads={name: grads[name] for name in targets},
            lr_grads={name: grads[f"lr:{name}"] for name in lr_scales},
            adapted=detached(adapted.params),
        )

    def backward(
        self, loss: torch.Tensor, wrt: Mapping[str, torch.Tensor], loss_scale: float | None = None
    ) -> Params:
        """Gradients of the query loss by name (zeros where it does not depend on a tensor)."""
        return gradients_by_name(loss, wrt, loss_scale)


class SecondOrder(Unrolled):
    """Exact meta-gradient: differentiate through every inner step (MAML).

    Three ways to compute the same gradient, which differ in memory and time:

    Args:
        hvp: ``"reverse"`` (default): keep every step's ``create_graph`` graph and back-propagate
            through it (reverse over reverse; memory grows with every step's activations).
            ``"forward"``: each step is one op that keeps only its inputs and gradient; its backward
            forms the Hessian-vector products by forward over reverse (``torch.func.jvp`` of
            ``torch.func.grad``; MixFlow-MG). Memory grows with S × the inner parameters, not with S ×
            the activations: it pays when the inner set is small next to the activations. Every
            operation in the support loss needs a forward-mode derivative.
        checkpoint: recompute the inner steps in segments of this many steps during the backward
            pass, each segment's graph freed once its adjoints are through: memory grows like S/k + k steps.

    Example:
        >>> strategy = mk.SecondOrder(hvp="forward")  # the exact gradient, no activations kept per step
    """

    HVP_MODES = ("reverse", "forward")

    def __init__(self, hvp: str = "reverse", checkpoint: int | None = None):
        if hvp not in self.HVP_MODES:
            raise ValueError(
                f"SecondOrder(hvp=...) must be one of {self.HVP_MODES} ('reverse': reverse over reverse, "
                f"'forward': forward-over-reverse Hessian-vector products), got {hvp!r}."
            )
        if checkpoint is not None and (
            isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or checkpoint < 1
        ):
            raise ValueError(
                "SecondOrder(checkpoint=...) must be None or an int >= 1 (inner steps per recomputed "
                f"segment), got {checkpoint!r}."
            )
        if checkpoint is not None and hvp == "forward":
            raise ValueError(
                "SecondOrder(hvp='forward') already keeps only each step's inputs; it does not combine "
                "with checkpoint=k. Choose one."
            )
        self.hvp = hvp
        self.checkpoint = checkpoint

    def differentiable_steps(self, steps: int) -> int:
        return steps

    def unroll(self, problem: TaskProblem) -> Adaptation:
        if self.hvp == "reverse" and self.checkpoint is None:
            return super().unroll(problem)
        kwargs = {
            "objective": problem.objective,
            "lr_scales": problem.lr_scales,
            "task_index": problem.index,
            "trace_final": problem.trace_final,
        }
        batch, context = problem.inner_inputs(differentiable=True)
        if self.hvp == "forward":
            return unroll_forward_over_reverse(problem.inner, problem.start, batch, context, **kwargs)
        return unroll_checkpointed(
            problem.inner, problem.start, batch, context, segment=self.checkpoint, **kwargs
        )

    def backward(
        self, loss: torch.Tensor, wrt: Mapping[str, torch.Tensor], loss_scale: float | None = None
    ) -> Params:
        if self.hvp != "forward":
            return super().backward(loss, wrt, loss_scale)
        try:
            return gradients_by_name(loss, wrt)
        except ForwardModeError:
            raise
        except (RuntimeError, NotImplementedError) as error:
            translated = forward_mode_error(error)
            if translated is None:
                raise
            raise translated from error

    def __repr__(self) -> str:
        args = []
        if self.hvp != "reverse":
            args.append(f"hvp={self.hvp!r}")
        if self.checkpoint is not None:
            args.append(f"checkpoint={self.checkpoint}")
        return f"SecondOrder({', '.join(args)})"


class FirstOrder(Unrolled):
    """Inner gradients are constants (first-order MAML; the priming paper's choice).

    A parameter in inner ∩ outer gets the query gradient at its adapted value; an outer-only
    parameter gets the direct term of the query loss only.
    """

    supports_learned_lr = False

    def differentiable_steps(self, steps: int) -> int:
        return 0


class Truncated(Unrolled):
    """Exact through the last ``k`` inner steps only; the earlier steps count as identity."""

    def __init__(self, k: int):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Truncated(k) needs an int k >= 1 (steps to differentiate), got {k!r}.")
        self.k = k
        self._warned_for: set[int] = set()

    def differentiable_steps(self, steps: int) -> int:
        if self.k > steps and steps not in self._warned_for:
            self._warned_for.add(steps)
            warnings.warn(
                f"Truncated({self.k}) differentiates {self.k} inner steps but the inner loop has only "
                f"{steps}: it computes the exact SecondOrder() gradient. Lower k or use SecondOrder().",
                stacklevel=4,
            )
        return min(self.k, steps)

    def __repr__(self) -> str:
        return f"Truncated({self.k})"


class Reptile(Strategy):
    """Reptile (Nichol et al.): the meta-gradient is ``θ − φ``, the step back from the adapted value.

    With an outer SGD step of rate ε this gives Reptile's ``θ ← θ + ε (φ − θ)``. It needs every
    outer parameter to be adapted in the inner loop (outer ⊆ inner).
    """

    supports_outer_only = False
    supports_learned_lr = False

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        adapted = problem.adapt(differentiable_steps=0)
        with torch.no_grad():
            query_loss = problem.query_loss(adapted.params)
            grads = {
                name: value.detach() - adapted.params[name].detach() for name, value in problem.shared.items()
            }
        return TaskGradient(query_loss, adapted.losses, grads, {}, detached(adapted.params))


# Implicit lives in its own module (it measures its residuals); re-exported here with the others.
from metakit.implicit import Implicit  # noqa: E402
