"""TAMS: a task-adaptive model-structure controller (Hou, Salazar & Polovets, 2022), DARTS-style.

For every controlled sublayer ``ℓ`` (by default each transformer layer's attention-output and
feed-forward-output projections) the controller keeps architecture weights ``αℓ`` over a list of
candidate structures ``o ∈ O`` and runs their continuous relaxation (Liu et al., 2019, DARTS):

    ȳℓ(x) = Σ_{o∈O} softmax(αℓ)_o · o(x)                                          (paper, Eq. 5)

The ``α`` are outer-only parameters: they are not updated in the inner loop, and their
meta-gradient flows through the adapted parameters, ``∇α L_query(θ'(α), α)`` with ``θ' = θ - η
∇θ L_support(θ, α)`` (paper, Eq. 6; exact under `metakit.SecondOrder`, the direct term only
under `metakit.FirstOrder`). After meta-training, `TamsController.discretize` keeps the
argmax candidate ``o*ℓ = argmax_o αℓ,o`` of every sublayer and drops the others.

Source note: written from the paper's abstract and published summaries (the full text was not
reachable offline). Those confirm the forms used here (an element-wise ``W⁰ ⊙ R¹`` plus ``R²``, a
diagonal core that depends on the input; a DARTS-style controller with continuous weights); the
equation numbers are those of arXiv 2207.03509v1 as best reconstructed and should be checked.

Candidates (``CANDIDATES``), each the sublayer's output given its input ``x`` and pretrained output
``y⁰ = W⁰x + b``:

- ``"frozen"``: ``y⁰``, the pretrained sublayer, not adapted;
- ``"tarp"``: ``y⁰ + (W(x) - W⁰) x``, TARP (`metakit.peft.tarp`);
- ``"adapter"``: ``y⁰ + up(act(down(y⁰)))``, a Houlsby bottleneck adapter;
- ``"skip"``: ``0``, the sublayer removed (its residual branch carries the input alone).

Choices the paper leaves open, made here: the candidate set above (default ``frozen, tarp,
adapter``, which keeps the model near-identity at insertion; ``skip`` is opt-in because a uniform
mixture with it scales the sublayer's output); one ``α`` vector per controlled sublayer,
initialised to zero (uniform weights); ties in `discretize` go to the first
candidate in the list.

Example:
    >>> from metakit.peft import add_tams, head_spec
    >>> tams = add_tams(model, candidates=("frozen", "tarp", "adapter"), rank=4)  # doctest: +SKIP
    >>> learner = metakit.recipes.tams(model, loss_fn, controller=tams, head=head_spec(model))  # doctest: +SKIP
    >>> ...  # meta-train, then fix the structure for fine-tuning:
    >>> tams.discretize()  # doctest: +SKIP
    {'bert.encoder.layer.0.attention.output.dense': 'tarp', ...}
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft._targets import check_rank, match_linears
from metakit.peft.adapters import HoulsbyAdapter, _new_adapter
from metakit.peft.kinds import MIX, PEKind
from metakit.peft.layout import find_layout
from metakit.peft.modules import PELinear, check_bottleneck
from metakit.peft.tarp import TARP, TarpFactors, TarpSpecs, tarp_specs
from metakit.spec import Spec, nothing

__all__ = ["CANDIDATES", "DEFAULT_TAMS_CANDIDATES", "TAMS", "TamsController", "add_tams"]

Output = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]

#: Candidate structures of a sublayer: ``output(layer, x, y⁰)``.
CANDIDATES: dict[str, Output] = {
    "frozen": lambda layer, x, y: y,
    "tarp": TARP.apply,
    "adapter": HoulsbyAdapter.apply,
    "skip": lambda layer, x, y: torch.zeros_like(y),
}

DEFAULT_TAMS_CANDIDATES = ("frozen", "tarp", "adapter")


class TAMS(PEKind):
    """The relaxed mixture of candidate structures on a `PELinear` (``tams_alpha``, Eq. 5)."""

    name = "tams"
    param_names = ("tams_alpha",)
    stage = MIX

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if layer.tams_fixed is not None:
            return CANDIDATES[layer.tams_fixed](layer, x, y)
        weights = torch.softmax(layer.tams_alpha, dim=0)
        outputs = [CANDIDATES[name](layer, x, y) for name in layer.tams_candidates]
        return sum(w * out for w, out in zip(weights, outputs, strict=True))

    @classmethod
    def describe(cls, layer: nn.Module) -> str:
        if layer.tams_fixed is not None:
            return f"tams={layer.tams_fixed!r}"
        return f"tams_candidates={layer.tams_candidates}"


@dataclass
class TamsController:
    """The architecture controller `add_tams` returns: its specs, weights and `discretize`.

    Attributes:
        layers: dotted names of the controlled sublayers.
        candidates: the candidate structures, in the order of each ``tams_alpha``.
        arch: the spec of the architecture weights (outer-only).
        tarp: the `TarpSpecs` of the ``"tarp"`` candidates (``None`` without that candidate).
        adapters: the spec of the ``"adapter"`` candidates' parameters (``None`` without it).
    """

    model: nn.Module = field(repr=False)
    layers: tuple[str, ...]
    candidates: tuple[str, ...]
    arch: Spec
    tarp: TarpSpecs | None
    adapters: Spec | None

    @property
    def inner(self) -> Spec:
        """Task-adaptive parameters of the candidates: TARP's ``.inner`` and the adapters."""
        parts = [s for s in (self.tarp.inner if self.tarp else None, self.adapters) if s is not None]
        return parts[0] | parts[1] if len(parts) == 2 else (parts[0] if parts else nothing())

    @property
    def outer(self) -> Spec:
        """Outer-only parameters: the architecture weights and TARP's shared factors and generator."""
        return self.arch | self.tarp.outer if self.tarp else self.arch

    def _layer(self, name: str) -> PELinear:
        return self.model.get_submodule(name)

    def weights(self) -> dict[str, dict[str, float]]:
        """``softmax(αℓ)`` of every sublayer still relaxed, as ``{layer: {candidate: weight}}``."""
        result = {}
        for name in self.layers:
            layer = self._layer(name)
            if layer.tams_fixed is None:
                probs = torch.softmax(layer.tams_alpha.detach(), dim=0).tolist()
                result[name] = dict(zip(layer.tams_candidates, probs, strict=True))
        return result

    def choice(self) -> dict[str, str]:
        """The structure of every sublayer: the fixed one, or ``argmax αℓ`` (ties: first candidate)."""
        result = {}
        for name in self.layers:
            layer = self._layer(name)
            if layer.tams_fixed is not None:
                result[name] = layer.tams_fixed
            else:
                result[name] = layer.tams_candidates[int(torch.argmax(layer.tams_alpha.detach()))]
        return result

    def discretize(self) -> dict[str, str]:
        """Fix every sublayer to its argmax candidate and drop the other candidates and the ``α``.

        The model then computes ``o*ℓ(x)`` exactly: its output equals the relaxed model's whenever the
        weights are one-hot. Fine-tune it with ``controller.inner`` (what remains of it) and the head.

        Returns:
            ``{sublayer: chosen candidate}``.

        Warns:
            UserWarning: When every ``α`` still has its value from insertion (zero: no meta-training
                has moved it), so the choice is the initial one.
        """
        names = list(self.layers)
        if all(self._layer(n).tams_fixed is not None for n in names):
            raise ValueError("TamsController.discretize(): this controller's structure is already fixed.")
        relaxed = [self._layer(n) for n in names if self._layer(n).tams_fixed is None]
        # every α starts at zero (uniform weights); all still zero means nothing has trained them
        if all(not layer.tams_alpha.detach().any() for layer in relaxed):
            warnings.warn(
                "TamsController.discretize() before any meta-training: the architecture weights still have "
                "their initial values, so the structure chosen is the initial one (with uniform weights, "
                f"the first candidate, {self.candidates[0]!r}, everywhere). Meta-train with "
                "metakit.recipes.tams(...) first to let the weights choose.",
                UserWarning,
                stacklevel=2,
            )
        chosen = self.choice()
        for name in names:
            layer = self._layer(name)
            if layer.tams_fixed is not None:
                continue
            keep = chosen[name]
            for candidate, attribute in (("tarp", "tarp"), ("adapter", "adapter")):
                if candidate != keep and getattr(layer, attribute) is not None:
                    _drop(layer, attribute)
            _drop(layer, "tams_alpha")
            layer.tams_fixed = keep
        return chosen


def _drop(layer: nn.Module, attribute: str) -> None:
    delattr(layer, attribute)
    object.__setattr__(layer, attribute, None)  # absent kinds read None on a PELinear


def _check_candidates(candidates: Sequence[str]) -> tuple[str, ...]:
    if isinstance(candidates, str) or not isinstance(candidates, Sequence):
        raise TypeError(
            f"candidates must be a list of candidate names such as {list(DEFAULT_TAMS_CANDIDATES)}, got "
            f"{candidates!r}."
        )
    if not candidates:
        raise ValueError(
            f"candidates is empty: TAMS chooses among at least one structure; known: {sorted(CANDIDATES)}."
        )
    unknown = [c for c in candidates if c not in CANDIDATES]
    if unknown:
        raise ValueError(f"unknown TAMS candidate(s) {unknown}; known: {sorted(CANDIDATES)}.")
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"TAMS candidates repeat a name: {list(candidates)}.")
    return tuple(candidates)


def _default_targets(model: nn.Module) -> dict[str, nn.Linear]:
    layout = find_layout(model)
    paths = [p for i in range(len(layout.layers)) for p in (layout.attention_output(i), layout.ffn_output(i))]
    return {path: model.get_submodule(path) for path in paths}


def add_tams(
    model: nn.Module,
    candidates: Sequence[str] = DEFAULT_TAMS_CANDIDATES,
    targets: str | Sequence[str] | None = None,
    rank: int = 4,
    bottleneck: int = 16,
    activation: str = "gelu",
    init_std: float = 1e-3,
) -> TamsController:
    """Put a TAMS mixture of candidate structures (module docstring) on each controlled sublayer.

    Args:
        model: modified in place; original parameter names do not change.
        candidates: names from ``CANDIDATES`` (``"frozen"``, ``"tarp"``, ``"adapter"``, ``"skip"``).
        targets: globs over linear-layer names; default: each layer's attention-output and
            feed-forward-output projections (found by `find_layout`).
        rank: rank of the ``"tarp"`` candidates.
        bottleneck, activation, init_std: the ``"adapter"`` candidates' settings.

    Returns:
        The `TamsController`: ``.arch`` (outer-only ``α``), ``.inner``, ``.outer``,
        ``.discretize()``.
    """
    names = _check_candidates(candidates)
    chosen = _default_targets(model) if targets is None else match_linears(model, targets, "TAMS")
    for path, linear in chosen.items():
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear at {path}, found {type(linear).__name__}.")
        if isinstance(linear, PELinear) and linear.pe_stack:
            raise ValueError(
                f"{path} already has {list(linear.pe_stack)}; TAMS controls plain sublayers and brings its own "
                "candidates (tarp, adapter)."
            )
    if "tarp" in names:
        check_rank(rank, chosen, "TAMS's TARP candidate")
    if "adapter" in names:
        check_bottleneck(bottleneck)
    for path, linear in chosen.items():
        layer = PELinear.wrap(linear)
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        if "tarp" in names:
            layer.tarp = TarpFactors(layer.in_features, layer.out_features, rank, **factory)
        if "adapter" in names:
            layer.adapter = _new_adapter(layer, layer.out_features, bottleneck, activation, init_std)
        layer.tams_alpha = nn.Parameter(torch.zeros(len(names), **factory))
        layer.tams_candidates = names
        layer.tams_fixed = None
        layer.push(TAMS.name)
        model.set_submodule(path, layer)
    paths = list(chosen)
    arch = exact_spec(model, [f"{p}.tams_alpha" for p in paths], "*.tams_alpha")
    adapters = None
    if "adapter" in names:
        added = [
            f"{p}.adapter.{n}" for p in paths for n, _ in model.get_submodule(p).adapter.named_parameters()
        ]
        adapters = exact_spec(model, added, "*.adapter.*")
    return TamsController(
        model=model,
        layers=tuple(paths),
        candidates=names,
        arch=arch,
        tarp=tarp_specs(model, paths) if "tarp" in names else None,
        adapters=adapters,
    )
