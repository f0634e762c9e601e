"""The modules that parameter-efficient insertion puts into a model.

Every insertion keeps the original parameters under their original names: a wrapped
``nn.Linear`` or ``nn.LayerNorm`` is replaced by a subclass that holds the *same* ``Parameter``
objects plus the new ones as children or attributes. Nothing lives outside modules and no hook
captures a tensor, so ``torch.func.functional_call`` (and :func:`metakit.bind`) can swap any of
them, old or new.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdaptedLayerNorm", "BottleneckAdapter", "PELinear", "check_bottleneck"]

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
    """An ``nn.Linear`` that may carry LoRA on its input and a bottleneck adapter on its output.

    ``y = adapter(W x + b + scale · B A dropout(x))``; either part may be absent. Built with
    :meth:`wrap`, which reuses the original ``weight`` and ``bias`` tensors, so their names in the
    model do not change (``...dense.weight`` stays ``...dense.weight``).
    """

    lora_A: nn.Parameter | None
    lora_B: nn.Parameter | None
    adapter: nn.Module | None

    @classmethod
    def wrap(cls, linear: nn.Linear) -> PELinear:
        """Return ``linear`` as a :class:`PELinear` sharing its parameters (itself if it is one)."""
        if isinstance(linear, PELinear):
            return linear
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)
        new.register_parameter("lora_A", None)
        new.register_parameter("lora_B", None)
        new.lora_scale = 0.0
        new.lora_dropout = nn.Identity()
        new.adapter = None
        new.train(linear.training)
        return new

    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Add LoRA factors ``A`` (Kaiming-uniform) and ``B`` (zeros): the output is unchanged."""
        if self.lora_A is not None:
            raise ValueError("this layer already has LoRA; add_lora() can only add it once per layer.")
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's and the LoRA paper's choice
        self.lora_scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.lora_scale
        if self.adapter is not None:
            y = self.adapter(y)
        return y

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_A.shape[0]}" if self.lora_A is not None else ""
        return super().extra_repr() + lora


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
