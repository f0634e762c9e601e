"""MetaLearner: a model, a loss, an inner loop, the outer parameters and a strategy, composed."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from metakit.capabilities import check_composition
from metakit.executors import Executor, Sequential
from metakit.inner import InnerLoop
from metakit.problem import Partition, TaskProblem
from metakit.reuse import Cut
from metakit.spec import Spec, require_nonempty
from metakit.strategies import Strategy
from metakit.task import LossFn, Task

__all__ = ["MetaLearner", "MetaStepResult"]

InnerOnly = Literal["keep", "first_task"]


@dataclass
class MetaStepResult:
    """What one meta-step measured.

    Attributes:
        loss: mean query loss over the tasks (detached scalar).
        inner_losses: support loss before each inner step and after the last, ``[n_tasks, steps + 1]``.
            The last column costs one more forward per task, so it is computed only when asked
            (``meta_step(..., final_support_loss=True)``) or when a logger is attached; otherwise NaN.
        query_losses: each task's query loss after adaptation, ``[n_tasks]``.
        query_losses_before: each task's query loss before the inner loop, ``[n_tasks]``, when measured
            (``meta_step(..., query_loss_before=True)``, or a logger is attached), else ``None``.
        grad_norms: L2 norm of the meta-gradient per group: ``"shared"`` (inner ∩ outer),
            ``"outer_only"``, ``"inner_lr"`` (MetaSGD scales), and ``"total"``.
        diagnostics: per-task measurements a strategy reports, by name, each ``[n_tasks]``
            (`Implicit`: ``"optimality_residual"``, ``"cg_residual"``, ``"inner_steps"``).
    """

    loss: torch.Tensor
    inner_losses: torch.Tensor
    query_losses: torch.Tensor
    grad_norms: dict[str, float] = field(default_factory=dict)
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)
    query_losses_before: torch.Tensor | None = None

    @property
    def adaptation_gain(self) -> float | None:
        """Mean over tasks of the query loss before adaptation minus after: what the inner loop bought."""
        if self.query_losses_before is None:
            return None
        return float((self.query_losses_before - self.query_losses).mean())


class MetaLearner:
    """Meta-learning as a composition: ``meta_step(tasks)`` fills ``.grad`` like ``backward()``.

    Args:
        model: the module; never mutated inside the inner loop.
        loss_fn: ``loss_fn(forward, batch) -> scalar``; ``None`` if every task carries its own.
        inner: the `InnerLoop` (which parameters adapt, with what optimizer, how many steps).
        outer_params: the `Spec` of meta-learned parameters (those whose ``.grad`` is filled).
        strategy: how the meta-gradient flows (`SecondOrder`, `FirstOrder`, ...).
        inner_only: after a meta-step, what the parameters in ``inner - outer`` hold: ``"keep"`` their
            value, or ``"first_task"`` the first task's adapted value (Algorithm 1's task head).
        logger: optional logger with ``log_meta_step(step, result, learner)`` (e.g.
            `metakit.logging.TensorBoardLogger`).
        executor: where the tasks of a meta-batch run: `Sequential`
            (default), `Vmap`, or ``Distributed``.
        cut: feature reuse: a `Cut` below which the inner loop changes
            nothing, so that part runs once per batch; ``"auto"`` finds it for the Hugging Face
            layouts metakit knows (`metakit.peft.feature_cut`); ``None`` (default) runs the
            whole model at every inner step. The meta-gradient is the same either way.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"`` (CUDA): the forward passes run under
            autocast; the loss, the inner updates and the meta-gradient stay float32; float16 scales
            its gradients (`metakit.precision`; bf16 second order is within cosine 0.999 of
            float32 in the tests).

    Only parameters with ``requires_grad=True`` are candidates for either set, so parameters frozen
    the usual PyTorch way stay frozen. Parameters in neither set are untouched and get no ``.grad``.

    Example:
        >>> learner = mk.MetaLearner(model, mk.tasks.mse_loss,
        ...     inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.01), steps=1),
        ...     outer_params=mk.everything(), strategy=mk.SecondOrder())  # doctest: +SKIP
        >>> result = learner.meta_step(tasks); opt.step(); opt.zero_grad()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None,
        *,
        inner: InnerLoop,
        outer_params: Spec,
        strategy: Strategy,
        inner_only: InnerOnly = "keep",
        logger: Any = None,
        executor: Executor | None = None,
        cut: Cut | Literal["auto"] | None = None,
        precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"MetaLearner expects an nn.Module, got {type(model).__name__}.")
        if not isinstance(inner, InnerLoop):
            raise TypeError(
                f"MetaLearner(inner=...) expects a metakit.InnerLoop, got {type(inner).__name__}."
            )
        if not isinstance(outer_params, Spec):
            raise TypeError(
                f"MetaLearner(outer_params=...) expects a metakit Spec, got {type(outer_params).__name__}."
            )
        if not isinstance(strategy, Strategy):
            raise TypeError(
                f"MetaLearner(strategy=...) expects a metakit Strategy such as mk.SecondOrder(), got {strategy!r}."
            )
        executor = executor if executor is not None else Sequential()
        if not isinstance(executor, Executor):
            raise TypeError(
                f"MetaLearner(executor=...) expects a metakit executor such as mk.executors.Sequential(), "
                f"got {type(executor).__name__}."
            )
        self.executor = executor
        if inner_only not in ("keep", "first_task"):
            raise ValueError(f"inner_only must be 'keep' or 'first_task', got {inner_only!r}.")
        self.model, self.loss_fn, self.inner, self.strategy = model, loss_fn, inner, strategy
        self.outer_spec, self.inner_only, self.logger = outer_params, inner_only, logger

        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        inner_names = [n for n in require_nonempty(inner.params, model, "inner") if n in trainable]
        outer_names = [n for n in require_nonempty(outer_params, model, "outer") if n in trainable]
        for role, names, spec in (("inner", inner_names, inner.params), ("outer", outer_names, outer_params)):
            if not names:
                raise ValueError(
                    f"The {role} spec {spec!r} matches only parameters with requires_grad=False; "
                    "unfreeze them or choose other parameters."
                )
        inner_set, outer_set = set(inner_names), set(outer_names)
        self.shared_names = [n for n in inner_names if n in outer_set]
        self.inner_only_names = [n for n in inner_names if n not in outer_set]
        self.outer_only_names = [n for n in outer_names if n not in inner_set]
        self.lr_scales = nn.ParameterDict()
        self.cut = _resolve_cut(cut, model, inner.params)
        self.precision = _check_precision(precision, model)
        check_composition(
            strategy,
            executor,
            model=model,
            buffers=inner.buffers,
            learn_lr=inner.learn_lr,
            outer_only=self.outer_only_names,
            cut=self.cut is not None,
            precision=self.precision,
        )
        if inner.learn_lr:
            params = dict(model.named_parameters())
            for name in inner_names:
                self.lr_scales[_scale_key(name)] = nn.Parameter(torch.ones_like(params[name]))
        self._lr_names = {_scale_key(name): name for name in inner_names} if inner.learn_lr else {}
        self.step = 0

    def __repr__(self) -> str:
        return (
            f"MetaLearner({type(self.model).__name__}, inner={self.inner!r}, outer_params={self.outer_spec!r}, "
            f"strategy={self.strategy!r}, inner_only={self.inner_only!r})"
        )

    # -- public API -------------------------------------------------------------------------------
    def outer_parameters(self) -> list[nn.Parameter]:
        """The tensors to hand to the outer optimizer (outer parameters, then MetaSGD scales)."""
        params = dict(self.model.named_parameters())
        outer = [params[n] for n in self.shared_names + self.outer_only_names]
        return outer + list(self.lr_scales.values())

    def inner_lrs(self) -> dict[str, torch.Tensor]:
        """MetaSGD: the learned per-element scale of each inner parameter's update (empty otherwise)."""
        return {self._lr_names[key]: scale.detach() for key, scale in self.lr_scales.items()}

    def state_dict(self) -> dict[str, Any]:
        """The learner's own state (meta-step count, MetaSGD scales) for checkpoints.

        The model and the outer optimizer keep their own ``state_dict()``; save all three to resume.
        """
        return {"step": self.step, "lr_scales": self.lr_scales.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` saved."""
        self.step = int(state["step"])
        self.lr_scales.load_state_dict(state["lr_scales"])

    def meta_step(
        self,
        tasks: Sequence[Task],
        logger: Any = None,
        *,
        final_support_loss: bool | None = None,
        query_loss_before: bool | None = None,
    ) -> MetaStepResult:
        """Adapt to each task, then accumulate the mean meta-gradient into the outer ``.grad``.

        Args:
            tasks: the meta-batch, a non-empty sequence of `Task`.
            logger: overrides the learner's logger for this step.
            final_support_loss: also record each task's support loss after the last inner step
                (``inner_losses[:, -1]``; one more forward per task). Default: when a logger is attached.
            query_loss_before: also measure each task's query loss before the inner loop
                (``result.query_losses_before``, ``result.adaptation_gain``; one more forward per task,
                without a graph). Default: when a logger is attached.
        """
        tasks = self._check_tasks(tasks)
        logger = logger if logger is not None else self.logger
        trace_final = final_support_loss if final_support_loss is not None else logger is not None
        before = query_loss_before if query_loss_before is not None else logger is not None
        params = dict(self.model.named_parameters())
        partition = self._partition(params)
        lr_scales = {self._lr_names[k]: v for k, v in self.lr_scales.items()} or None
        problems = [
            self._problem(task, index, partition, lr_scales, trace_final=trace_final, measure_before=before)
            for index, task in enumerate(tasks)
        ]
        batch = self.executor.run(self.strategy, problems)
        grads = {name: g / batch.n_tasks for name, g in batch.grad_sums.items()}
        lr_grads = {name: g / batch.n_tasks for name, g in batch.lr_grad_sums.items()}

        _check_finite_grads({**grads, **lr_grads})
        self._write_grads(params, grads, lr_grads)
        if self.inner_only == "first_task" and self.inner_only_names:
            with torch.no_grad():
                for name in self.inner_only_names:
                    params[name].copy_(batch.first_adapted[name])
        diagnostics = dict(batch.diagnostics)
        result = MetaStepResult(
            loss=batch.query_losses.mean(),
            inner_losses=batch.inner_losses,
            query_losses=batch.query_losses,
            grad_norms=self._grad_norms(grads, lr_grads),
            diagnostics=diagnostics,
            query_losses_before=diagnostics.pop("query_loss_before", None),
        )
        if logger is not None:
            logger.log_meta_step(self.step, result, self)
        self.step += 1
        return result

    def adapt(self, task_or_batch: Task | Any) -> dict[str, torch.Tensor]:
        """Adapt to a task's support batch (or to a batch) and return the adapted inner params.

        The result is a detached ``{name: tensor}`` dict of the inner parameters; run the adapted
        model with ``metakit.bind(model, learner.adapt(task))(...)``.
        """
        task = task_or_batch if isinstance(task_or_batch, Task) else Task(task_or_batch, None)
        params = {name: value.detach() for name, value in self.model.named_parameters()}
        lr_scales = {self._lr_names[k]: v.detach() for k, v in self.lr_scales.items()} or None
        problem = self._problem(task, 0, self._partition(params), lr_scales, trace_final=False)
        with torch.enable_grad():  # inner gradients are needed even when evaluating under no_grad()
            adapted, _ = problem.adapt(differentiable_steps=0)
        return {name: value.detach() for name, value in adapted.items()}

    # -- internals --------------------------------------------------------------------------------
    def _partition(self, params: dict[str, torch.Tensor]) -> Partition:
        named = set(self.shared_names) | set(self.inner_only_names) | set(self.outer_only_names)
        return Partition(
            shared={n: params[n] for n in self.shared_names},
            inner_only={n: params[n] for n in self.inner_only_names},
            outer_only={n: params[n] for n in self.outer_only_names},
            frozen={n: p.detach() for n, p in params.items() if n not in named},
        )

    def _problem(
        self,
        task: Task,
        index: int,
        partition: Partition,
        lr_scales,
        *,
        trace_final: bool = True,
        measure_before: bool = False,
    ) -> TaskProblem:
        return TaskProblem(
            model=self.model,
            loss_fn=self._loss_for(task, index),
            inner=self.inner,
            task=task,
            partition=partition,
            index=index,
            lr_scales=lr_scales,
            cut=self.cut,
            trace_final=trace_final,
            precision=self.precision,
            measure_before=measure_before,
        )

    def _check_tasks(self, tasks: Sequence[Task]) -> list[Task]:
        if isinstance(tasks, Task):
            tasks = [tasks]
        tasks = list(tasks)
        if not tasks:
            raise ValueError("meta_step() needs at least one Task.")
        for index, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise TypeError(
                    f"meta_step() expects metakit.Task objects; item {index} is {type(task).__name__}. "
                    "Wrap batches as mk.Task(support=..., query=...)."
                )
        return tasks

    def _loss_for(self, task: Task, index: int) -> LossFn:
        loss_fn = task.loss_fn if task.loss_fn is not None else self.loss_fn
        if loss_fn is None:
            raise ValueError(
                f"Task {index} has no loss_fn and the learner was built with loss_fn=None; tasks of "
                "different kinds must each carry their own: mk.Task(support, query, loss_fn=...)."
            )
        return loss_fn

    def _write_grads(self, params, total, total_lr) -> None:
        for name, grad in total.items():
            _add_grad(params[name], grad)
        for name, grad in total_lr.items():
            _add_grad(self.lr_scales[_scale_key(name)], grad)

    def _grad_norms(self, total, total_lr) -> dict[str, float]:
        groups = {
            "shared": [total[n] for n in self.shared_names if n in total],
            "outer_only": [total[n] for n in self.outer_only_names if n in total],
            "inner_lr": list(total_lr.values()),
        }
        norms = {name: _norm(tensors) for name, tensors in groups.items() if tensors}
        norms["total"] = _norm([g for tensors in groups.values() for g in tensors])
        return norms


def _check_precision(precision: str, model: nn.Module) -> str:
    from metakit.precision import autocast_dtype

    autocast_dtype(
        precision, next(model.parameters()).device.type
    )  # names the choices, refuses fp16 off CUDA
    return precision


def _resolve_cut(cut: Any, model: nn.Module, inner: Spec) -> Cut | None:
    if cut is None:
        return None
    if isinstance(cut, str) and cut == "auto":
        from metakit.peft.cuts import feature_cut

        return feature_cut(model, inner)
    if not isinstance(cut, Cut):
        raise TypeError(f"MetaLearner(cut=...) expects a metakit.Cut, 'auto' or None, got {cut!r}.")
    cut.module(model)  # the module must exist
    return cut


def _check_finite_grads(grads: Mapping[str, torch.Tensor]) -> None:
    flags = (
        torch.stack([torch.isfinite(g).all() for g in grads.values()])
        if grads
        else torch.ones(0, dtype=torch.bool)
    )
    if bool(flags.all()):
        return
    bad = [name for name, ok in zip(grads, flags.tolist(), strict=True) if not ok]
    raise FloatingPointError(
        f"The meta-gradient is not finite for {len(bad)} parameter(s), e.g. {bad[:3]}; nothing was written to "
        ".grad. A differentiable inner Adam needs eps_root > 0 (torchopt.adam(lr, eps_root=1e-8)) so its "
        "square root stays differentiable at zero gradients; otherwise lower the inner learning rate."
    )


def _add_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = grad.to(param.dtype)
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.add_(grad)


def _norm(tensors: list[torch.Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])))


def _scale_key(name: str) -> str:
    # ParameterDict keys cannot contain dots.
    return name.replace(".", "-")
