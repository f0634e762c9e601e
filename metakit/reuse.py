"""Feature reuse: compute once what the inner loop does not change.

When every inner parameter sits above a part of the model that the inner loop leaves alone (a top
adapter and a head over an encoder that only the outer loop changes: priming, ANIL), that part's
output for a batch is the same at every inner step. A `Cut` declares where the model splits:
metakit runs the model up to the cut once per support batch and once per query batch, keeps the
features *with their graph*, and runs only the top in each inner step. That is exact under every
strategy: the backbone's meta-gradient flows into the one shared graph from all the steps.

Declare a cut for any module with the module whose input is the feature and a function that
finishes the forward from there; the Hugging Face layouts metakit knows declare it themselves
(`metakit.peft.feature_cut`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from metakit.functional import bind
from metakit.inner import Objective
from metakit.task import LossFn

__all__ = ["FEATURES", "Cut", "CutError"]

#: The key under which the cached features travel in the inner loop's context dict.
FEATURES = "<features>"

#: ``run(path)``: the submodule at ``path``, bound to the current parameters.
Run = Callable[[str], Callable[..., Any]]


class CutError(ValueError):
    """A declared cut does not hold for this model or this inner loop."""


class _ReachedCut(BaseException):
    """Stops the forward pass at the cut (a BaseException, so ``except Exception`` lets it through)."""


class Cut:
    """Where a model splits into a bottom the inner loop does not change and a top it adapts.

    Args:
        at: dotted path of the first module of the top; its first input is the feature tensor.
        rest: ``rest(run, features, *args, **kwargs)`` returns what ``model(*args, **kwargs)``
            returns (what the loss function reads: ``.logits``, ``.loss``, a tensor ...), computed from
            ``features``. ``run(path)`` is the submodule at ``path`` run on the current parameters.

    The bottom is everything the model's forward runs before it calls ``at``; it is stopped there.
    Every inner parameter must belong to the top (a `CutError` names one that does not).

    Example:
        A classifier ``model = nn.Sequential(encoder, head)`` whose inner loop adapts the head only:

        >>> cut = mk.Cut(at="1", rest=lambda run, features, x: run("1")(features))  # doctest: +SKIP
        >>> learner = mk.MetaLearner(model, loss_fn, inner=..., outer_params=..., strategy=..., cut=cut)  # doctest: +SKIP
    """

    def __init__(self, at: str, rest: Callable[..., Any]):
        if not isinstance(at, str) or not at:
            raise TypeError(f"Cut(at=...) must be a module path such as 'classifier', got {at!r}.")
        if not callable(rest):
            raise TypeError(
                f"Cut(rest=...) must be callable as rest(run, features, *args, **kwargs), got {rest!r}."
            )
        self.at, self.rest = at, rest
        self._checked: set[tuple[int, frozenset[str]]] = set()

    def __repr__(self) -> str:
        return f"Cut(at={self.at!r})"

    def module(self, model: nn.Module) -> nn.Module:
        """The module at the cut; a `CutError` if ``model`` has none there."""
        try:
            return model.get_submodule(self.at)
        except AttributeError:
            names = [name for name, _ in model.named_modules() if name][-6:]
            raise CutError(
                f"Cut(at={self.at!r}): {type(model).__name__} has no submodule {self.at!r}; some of its "
                f"modules: {names}."
            ) from None

    def features(
        self,
        model: nn.Module,
        params: Mapping[str, torch.Tensor],
        loss_fn: LossFn,
        batch: Any,
        *,
        inner_names: frozenset[str] = frozenset(),
        buffers: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run the model on ``batch`` up to the cut and return the feature tensor (with its graph).

        The first call for a model and an inner set checks that no inner parameter is used below
        the cut (its module runs before the cut).
        """
        key = (id(model), inner_names)
        check = key not in self._checked
        captured: list[torch.Tensor] = []
        ran: list[nn.Module] = []

        def at_cut(module, args, kwargs):
            captured.append(args[0] if args else next(iter(kwargs.values())))
            raise _ReachedCut

        cut_module = self.module(model)
        handle = cut_module.register_forward_pre_hook(at_cut, with_kwargs=True)
        tracker = (
            torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: ran.append(module))
            if check
            else None
        )
        try:
            loss_fn(bind(model, params, check_names=False, buffers=buffers), batch)
        except _ReachedCut:
            pass
        finally:
            handle.remove()
            if tracker is not None:
                tracker.remove()
        if not captured:
            raise CutError(
                f"Cut(at={self.at!r}): the model's forward never called {self.at!r}, so the features "
                "cannot be taken there. Choose a module that every forward passes through."
            )
        if check:
            self._check_inner_above(model, [m for m in ran if m is not cut_module], inner_names)
            self._checked.add(key)
        return captured[0]

    def _check_inner_above(self, model: nn.Module, ran: list[nn.Module], inner_names: frozenset[str]) -> None:
        below = {id(module) for module in ran}
        for name, module in model.named_modules():
            if id(module) not in below:
                continue
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{name}.{param_name}" if name else param_name
                if full in inner_names:
                    raise CutError(
                        f"Cut(at={self.at!r}): the inner parameter {full!r} is used below the cut (its module "
                        f"{name or type(model).__name__!r} runs before {self.at!r}), so its features would "
                        "change at every inner step. Move the cut below it, or leave it out of the inner loop."
                    )

    def objective(self, model: nn.Module, loss_fn: LossFn) -> Objective:
        """``objective(params, batch)``: the loss from ``params[FEATURES]``, running only the top."""
        forward = self.forward(model, loss_fn)
        return lambda params, batch: forward(params, batch, None)

    def forward(self, model: nn.Module, loss_fn: LossFn) -> Callable[..., torch.Tensor]:
        """``forward(params, batch, buffers)``: `objective` on given buffers (``None``: the module's)."""

        def forward(
            params: Mapping[str, torch.Tensor], batch: Any, buffers: Mapping[str, torch.Tensor] | None
        ) -> torch.Tensor:
            features = params[FEATURES]
            values = {name: value for name, value in params.items() if name != FEATURES}

            def run(path: str) -> Callable[..., Any]:
                return _bind_submodule(model, values, path, buffers)

            return loss_fn(lambda *args, **kwargs: self.rest(run, features, *args, **kwargs), batch)

        return forward


def _bind_submodule(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    path: str,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> Callable[..., Any]:
    if not path:
        return bind(model, params, check_names=False, buffers=buffers)
    prefix = path + "."

    def under(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name[len(prefix) :]: v for name, v in values.items() if name.startswith(prefix)}

    module = model.get_submodule(path)
    return bind(module, under(params), check_names=False, buffers=None if buffers is None else under(buffers))
