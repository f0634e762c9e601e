"""Strategies: how the meta-gradient flows from a task's query loss back to the outer parameters.

A strategy is the only thing that changes between gradient approximations. Every strategy
implements one method, `Strategy.task_gradient`, and reaches the inner loop only through
`InnerLoop.init`, `InnerLoop.step` and `InnerLoop.adapt`. The unrolled family
(`SecondOrder`, `FirstOrder`, `Truncated`) shares `Unrolled`: they
differ in how many of the last inner steps are differentiated and, for ``SecondOrder``, in how the
differentiated steps are run (`metakit.lean`). `Reptile` and `Implicit` replace
the backward pass.

For a parameter in both the inner and the outer set, the meta-gradient is the gradient of the query
loss with respect to its value where the differentiated steps start (the steps before count as
identity). An outer-only parameter (the backbone in priming) gets the gradient of the query loss
through every differentiated step plus its direct term.
"""

from __future__ import annotations

import abc
import warnings

import torch

from metakit.capabilities import Capabilities
from metakit.functional import double_backward_safe
from metakit.lean import ForwardModeError, ForwardOverReverse, Recomputed, forward_mode_error
from metakit.problem import Partition, Strategy, TaskGradient, TaskProblem, detached
from metakit.step import Plain, Runner

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

    capabilities = Capabilities(double_backward=True)

    @abc.abstractmethod
    def differentiable_steps(self, steps: int) -> int:
        """How many of the last ``steps`` inner steps the meta-gradient goes through."""

    def runner(self) -> Runner:
        """How a differentiated step runs (plain, with ``create_graph``)."""
        return Plain(create_graph=True)

    def meta_loss(self, problem: TaskProblem) -> tuple[torch.Tensor, Params, torch.Tensor]:
        """``(query loss, adapted params, trace)``: the inner loop, then the query loss."""
        differentiable = self.differentiable_steps(problem.inner.steps)
        # Entered once here rather than at every differentiated inner step.
        with double_backward_safe(differentiable > 0):
            adapted, trace = problem.adapt(differentiable, runner=self.runner())
            return problem.query_loss(adapted), adapted, trace

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        return problem.meta_gradient(self.meta_loss)


class SecondOrder(Unrolled):
    """Exact meta-gradient: differentiate through every inner step (MAML).

    Three ways to compute the same gradient, which differ in memory and time:

    Args:
        hvp: ``"reverse"`` (default): keep every step's ``create_graph`` graph and back-propagate
            through it (reverse over reverse; memory grows with every step's activations).
            ``"forward"``: each step is one op that keeps only its inputs and gradient; its backward
            forms the Hessian-vector products by forward over reverse (one backward pass
            of the support loss on ``torch.autograd.forward_ad`` dual tensors; MixFlow-MG). Memory grows with S × the inner parameters, not with S ×
            the activations: it pays when the inner set is small next to the activations. Every
            operation in the support loss needs a forward-mode derivative.
        checkpoint: recompute the inner steps in segments of this many steps during the backward
            pass, each segment's graph freed once its adjoints are through: memory grows like S/k + k steps.
            With ``hvp="forward"``, a segment keeps only its inputs and is run again (first order)
            before its steps' forward-over-reverse backward: memory grows like S/k segment inputs +
            k steps' parameters and gradients, with no activations kept per step.

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
        self.hvp = hvp
        self.checkpoint = checkpoint

    @property
    def capabilities(self) -> Capabilities:  # type: ignore[override]
        if self.hvp == "forward":
            return Capabilities(forward_mode=True, recomputes_steps=True)
        return Capabilities(double_backward=True, recomputes_steps=self.checkpoint is not None)

    def differentiable_steps(self, steps: int) -> int:
        return steps

    def runner(self) -> Runner:
        if self.hvp == "forward":
            return ForwardOverReverse(self.checkpoint)
        if self.checkpoint is not None:
            return Recomputed(self.checkpoint)
        return super().runner()

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        if self.hvp != "forward":
            return super().task_gradient(problem)
        try:
            return super().task_gradient(problem)
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

    capabilities = Capabilities(learned_lr=False)

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

    capabilities = Capabilities(outer_only=False, learned_lr=False)

    def task_gradient(self, problem: TaskProblem) -> TaskGradient:
        adapted, trace = problem.adapt(differentiable_steps=0)
        with torch.no_grad():
            query_loss = problem.query_loss(adapted)
            grads = {name: value.detach() - adapted[name].detach() for name, value in problem.shared.items()}
        return TaskGradient(query_loss.detach(), trace, grads, {}, detached(adapted))


# Implicit lives in its own module (it measures its residuals); re-exported here with the others.
from metakit.implicit import Implicit  # noqa: E402
