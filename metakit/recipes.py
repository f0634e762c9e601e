"""Recipes: named configurations of the same parts. Each returns a `MetaLearner`, nothing more.

Example:
    >>> from metakit import recipes
    >>> learner = recipes.priming(model, loss_fn, pe=adapter, head=head)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import torchopt
from torch import nn
from torchopt.base import GradientTransformation

from metakit.executors import Executor
from metakit.inner import InnerLoop
from metakit.learner import MetaLearner
from metakit.reuse import Cut
from metakit.spec import Spec, everything
from metakit.strategies import FirstOrder, Implicit, Reptile, SecondOrder, Strategy
from metakit.task import LossFn

__all__ = [
    "COMMON_KEYWORDS",
    "anil",
    "fomaml",
    "imaml",
    "maml",
    "maml_loop_priming",
    "meta_adapters",
    "priming",
    "reptile",
    "tams",
]


def _learner(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    inner: Spec,
    outer: Spec,
    default_strategy: Strategy,
    inner_only: str = "keep",
    default_cut: Cut | str | None = None,
    inner_lr: float,
    steps: int,
    optimizer: GradientTransformation | None = None,
    strategy: Strategy | None = None,
    learn_lr: bool = False,
    buffers: str = "update",
    logger: Any = None,
    executor: Executor | None = None,
    precision: str = "fp32",
    cut: Cut | str | None = "default",
) -> MetaLearner:
    """Every recipe's learner: the recipe fixes the partition; the shared keywords do the rest."""
    return MetaLearner(
        model,
        loss_fn,
        inner=InnerLoop(
            inner,
            optimizer if optimizer is not None else torchopt.sgd(lr=inner_lr),
            steps,
            learn_lr=learn_lr,
            buffers=buffers,
        ),
        outer_params=outer,
        strategy=strategy if strategy is not None else default_strategy,
        inner_only=inner_only,  # type: ignore[arg-type]
        logger=logger,
        executor=executor,
        cut=default_cut if isinstance(cut, str) and cut == "default" else cut,
        precision=precision,  # type: ignore[arg-type]
    )


def _fixed_strategy(recipe: str, strategy: Strategy, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "strategy" in kwargs:
        raise TypeError(
            f"recipes.{recipe}() is recipes.maml() with {strategy!r}, so it takes no strategy=; pass "
            f"strategy={kwargs['strategy']!r} to recipes.maml() instead."
        )
    return {**kwargs, "strategy": strategy}


#: The keywords every recipe takes (besides its partition): see `maml`.
COMMON_KEYWORDS = (
    "inner_lr",
    "steps",
    "optimizer",
    "strategy",
    "learn_lr",
    "buffers",
    "logger",
    "executor",
    "precision",
    "cut",
)


def maml(
    model: nn.Module,
    loss_fn: LossFn,
    *,
    params: Spec | None = None,
    inner_lr: float = 0.01,
    steps: int = 1,
    **kwargs: Any,
) -> MetaLearner:
    """MAML (Finn et al., 2017): every parameter (or ``params``) adapts and is meta-learned, exactly.

    Every recipe takes the same keywords besides its partition: ``inner_lr``, ``steps``,
    ``optimizer`` (a TorchOpt optimizer instead of SGD at ``inner_lr``), ``strategy``, ``learn_lr``
    (Meta-SGD: learned per-element inner rates), ``buffers`` (`InnerLoop`'s buffer policy),
    ``logger``, ``executor``, ``precision`` and ``cut``.
    """
    spec = params if params is not None else everything()
    return _learner(
        model,
        loss_fn,
        inner=spec,
        outer=spec,
        default_strategy=SecondOrder(),
        inner_lr=inner_lr,
        steps=steps,
        **kwargs,
    )


def fomaml(model: nn.Module, loss_fn: LossFn, **kwargs: Any) -> MetaLearner:
    """First-order MAML: `maml` with `FirstOrder` meta-gradients."""
    return maml(model, loss_fn, **_fixed_strategy("fomaml", FirstOrder(), kwargs))


def reptile(model: nn.Module, loss_fn: LossFn, **kwargs: Any) -> MetaLearner:
    """Reptile (Nichol et al., 2018): `maml`'s partition, meta-gradient ``θ − φ``."""
    return maml(model, loss_fn, **_fixed_strategy("reptile", Reptile(), kwargs))


def imaml(
    model: nn.Module, loss_fn: LossFn, *, lam: float = 1.0, cg_steps: int = 10, **kwargs: Any
) -> MetaLearner:
    """iMAML (Rajeswaran et al., 2019): `maml`'s partition with the implicit meta-gradient."""
    return maml(model, loss_fn, **_fixed_strategy("imaml", Implicit(lam=lam, cg_steps=cg_steps), kwargs))


def anil(
    model: nn.Module, loss_fn: LossFn, *, head: Spec, inner_lr: float = 0.01, steps: int = 1, **kwargs: Any
) -> MetaLearner:
    """ANIL (Raghu et al., 2020): only the head adapts; everything is meta-learned (the keywords of
    `maml`; ``cut="auto"`` by default)."""
    return _learner(
        model,
        loss_fn,
        inner=head,
        outer=everything(),
        default_strategy=SecondOrder(),
        default_cut="auto",
        inner_lr=inner_lr,
        steps=steps,
        **kwargs,
    )


def priming(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    pe: Spec,
    head: Spec,
    backbone: Spec | None = None,
    adapt_backbone: bool = False,
    inner_lr: float = 0.03,
    steps: int = 5,
    **kwargs: Any,
) -> MetaLearner:
    """Meta-learning for parameter-efficient fine-tuning (Gheini et al., Algorithm 1).

    Inner loop: the PE parameters θa and the head θh; outer: the backbone θp and θa; θh is carried
    over from the first task of each meta-batch. First-order by default, as in the paper. Takes the
    keywords of `maml`.

    Args:
        pe: the parameter-efficient parameters (e.g. from ``metakit.peft.add_top_adapter``).
        head: the task head.
        backbone: the pretrained parameters to prime; default everything else.
        adapt_backbone: the inner loop also updates the backbone (the paper's ablation 6, see
            `maml_loop_priming`).
        **kwargs: as `maml`; ``cut`` (`Cut`) defaults to ``"auto"``, which finds it
            for the Hugging Face layouts metakit knows, so the encoder runs once per batch; ``None``
            runs the whole model at every inner step. The meta-gradient is the same.
    """
    backbone = backbone if backbone is not None else everything() - pe - head
    inner = backbone | pe | head if adapt_backbone else pe | head
    if adapt_backbone:
        kwargs["cut"] = None
    return _learner(
        model,
        loss_fn,
        inner=inner,
        outer=backbone | pe,
        default_strategy=FirstOrder(),
        inner_only="first_task",
        default_cut="auto",
        inner_lr=inner_lr,
        steps=steps,
        **kwargs,
    )


def maml_loop_priming(model: nn.Module, loss_fn: LossFn | None, **kwargs: Any) -> MetaLearner:
    """The priming paper's ablation 6: `priming` whose inner loop also updates the backbone."""
    return priming(model, loss_fn, adapt_backbone=True, **kwargs)


def meta_adapters(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    adapters: Spec,
    head: Spec,
    inner_lr: float = 0.03,
    steps: int = 5,
    **kwargs: Any,
) -> MetaLearner:
    """Meta-Adapters (Bansal et al., 2022): inner = adapters + head, outer = adapters, backbone frozen.

    The head is not meta-learned: every task adapts it from the same starting value. Takes the
    keywords of `maml` (``cut="auto"`` by default).
    """
    return _learner(
        model,
        loss_fn,
        inner=adapters | head,
        outer=adapters,
        default_strategy=SecondOrder(),
        default_cut="auto",
        inner_lr=inner_lr,
        steps=steps,
        **kwargs,
    )


def tams(
    model: nn.Module,
    loss_fn: LossFn | None,
    *,
    controller: Any,
    head: Spec,
    backbone: Spec | None = None,
    meta_learn_init: bool = True,
    inner_lr: float = 0.03,
    steps: int = 5,
    **kwargs: Any,
) -> MetaLearner:
    """TARP + TAMS (Hou et al., 2022, "Meta-Learning the Difference"): structure and weights meta-learned.

    Inner loop: the candidates' task-adaptive parameters (TARP's task factors, the adapters) and the
    head. Outer: the architecture weights ``α`` and TARP's shared factors and generator (outer only),
    the task-adaptive parameters' initialisation (``meta_learn_init``, MAML-style), and ``backbone`` if
    given (to meta-learn the pretrained weights too; default frozen). The head adapts from the same
    start in every task. First-order by default (cheap); ``strategy=SecondOrder()`` is exact. Takes
    the keywords of `maml`.

    Args:
        controller: the `metakit.peft.TamsController` from ``metakit.peft.add_tams``.
        head: the task head (e.g. ``metakit.peft.head_spec(model)``).

    Example:
        >>> tams = metakit.peft.add_tams(model, rank=4)  # doctest: +SKIP
        >>> learner = recipes.tams(model, loss_fn, controller=tams, head=head_spec(model))  # doctest: +SKIP
    """
    inner = controller.inner | head
    outer = controller.outer
    if meta_learn_init:
        outer = outer | controller.inner
    if backbone is not None:
        outer = outer | backbone
    return _learner(
        model,
        loss_fn,
        inner=inner,
        outer=outer,
        default_strategy=FirstOrder(),
        inner_lr=inner_lr,
        steps=steps,
        **kwargs,
    )
