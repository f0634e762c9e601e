"""The modules that parameter-efficient insertion puts into a model.

Every insertion keeps the original parameters under their original names: a wrapped
``nn.Linear`` or ``nn.LayerNorm`` is replaced by a subclass that holds the *same* ``Parameter``
objects plus the new ones as children or attributes. Nothing lives outside modules and no hook
captures a tensor, so ``torch.func.functional_call`` (and `metakit.bind`) can swap any of
them, old or new. Which attributes hold PE parameters is declared by the kinds
(`metakit.peft.kinds`), not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metakit.peft.kinds import PEKind, pe_kind, pe_names

__all__ = ["AdaptedLayerNorm", "BottleneckAdapter", "PELinear", "TopAdapter", "check_bottleneck"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}


def check_bottleneck(bottleneck: int) -> None:
    """Raise a ``ValueError`` unless ``bottleneck`` is a positive int."""
    if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck <= 0:
        raise ValueError(
            f"bottleneck must be a positive int (the adapter's hidden width, e.g. 64), got {bottleneck!r}."
        )


class BottleneckAdapter(nn.Module):
    """Houlsby bottleneck: ``x + up(act(down(x)))``, near-identity at initialisation.

    Args:
        features: width of the hidden states it adapts.
        bottleneck: width of the down-projection (``> 0``).
        activation: one of ``"gelu"``, ``"relu"``, ``"silu"``, ``"tanh"``.
        init_std: standard deviation of the normal init of both projection weights (biases are zero);
            the output differs from the input by ``O(init_std**2)``.
    """

    def __init__(self, features: int, bottleneck: int, activation: str = "gelu", init_std: float = 1e-3):
        super().__init__()
        check_bottleneck(bottleneck)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}.")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std!r}.")
        self.down = nn.Linear(features, bottleneck)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, features)
        with torch.no_grad():
            for linear in (self.down, self.up):
                nn.init.normal_(linear.weight, std=init_std)
                nn.init.zeros_(linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


class PELinear(nn.Linear):
    """An ``nn.Linear`` that carries PE kinds (LoRA, a Houlsby adapter, TARP, a TAMS mixture, ...).

    ``y = k_n(…k_1(W x + b))``: each kind in `pe_stack` maps ``(layer, x, y)`` to a new output,
    ordered by stage (reparameterizations of ``W x``, then a TAMS mixture, then output transforms), so
    LoRA and TARP act inside a Houlsby adapter. The kinds' parameters are attributes of this layer
    named by their ``param_names`` (``lora_A``, ``adapter``, ``tarp``, ...); an absent one reads as
    ``None``. Built with `wrap`, which reuses the original ``weight`` and ``bias`` tensors, so
    their names in the model do not change (``...dense.weight`` stays ``...dense.weight``).
    """

    pe_stack: tuple[str, ...]

    @classmethod
    def wrap(cls, linear: nn.Linear) -> PELinear:
        """Return ``linear`` as a `PELinear` sharing its parameters (itself if it is one)."""
        if isinstance(linear, PELinear):
            return linear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        for name in pe_names():  # a kind's attribute reads None until the kind is attached
            object.__setattr__(new, name, None)
        new.pe_stack = ()
        new.train(linear.training)
        return new

    def has(self, kind: str) -> bool:
        """Whether the kind called ``kind`` is applied by this layer."""
        return kind in self.pe_stack

    def push(self, kind: str) -> None:
        """Apply the registered kind ``kind`` too (its parameters must already be attached)."""
        if kind in self.pe_stack:
            raise ValueError(f"this layer already has {kind!r}.")
        stacked = (*self.pe_stack, kind)
        self.pe_stack = tuple(sorted(stacked, key=lambda k: pe_kind(k).stage))  # stable within a stage

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Add LoRA factors ``A`` (Kaiming-uniform) and ``B`` (zeros): the output is unchanged."""
        from metakit.peft.lora import LoRA

        LoRA.attach(self, rank, alpha, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        for kind in self.pe_stack:
            y = pe_kind(kind).apply(self, x, y)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + "".join(f", {pe_kind(k).describe(self)}" for k in self.pe_stack)


class TopAdapter(PEKind):
    """The priming paper's adapter on top of the encoder, hosted by `AdaptedLayerNorm`."""

    name = "top_adapter"
    param_names = ("top_adapter",)


class AdaptedLayerNorm(nn.LayerNorm):
    """An ``nn.LayerNorm`` followed by ``top_adapter``, sharing the original norm's parameters."""

    top_adapter: nn.Module

    @classmethod
    def wrap(cls, norm: nn.LayerNorm, adapter: nn.Module) -> AdaptedLayerNorm:
        """Return ``norm`` followed by ``adapter``; the norm's ``weight``/``bias`` keep their names."""
        if isinstance(norm, AdaptedLayerNorm):
            raise ValueError("this LayerNorm already has a top adapter; add_top_adapter() adds only one.")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = norm.normalized_shape
        new.eps = norm.eps
        new.elementwise_affine = norm.elementwise_affine
        new.register_parameter("weight", norm.weight)
        new.register_parameter("bias", norm.bias)
        new.top_adapter = adapter
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top_adapter(super().forward(x))
