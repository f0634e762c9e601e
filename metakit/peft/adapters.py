"""Bottleneck adapters: Houlsby's two per layer, and the priming paper's one on top of the encoder."""

from __future__ import annotations

import torch
from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft.kinds import OUTPUT, PEKind
from metakit.peft.layout import find_layout
from metakit.peft.modules import AdaptedLayerNorm, BottleneckAdapter, PELinear, check_bottleneck
from metakit.spec import Spec

__all__ = ["HoulsbyAdapter", "add_houlsby_adapters", "add_top_adapter"]


class HoulsbyAdapter(PEKind):
    """A bottleneck ``adapter`` on a `PELinear`'s output: ``y + up(act(down(y)))``."""

    name = "houlsby"
    param_names = ("adapter",)
    stage = OUTPUT

    @staticmethod
    def attach(layer: PELinear, bottleneck: int, activation: str = "gelu", init_std: float = 1e-3) -> None:
        """Give ``layer`` a near-identity bottleneck adapter over its ``out_features``."""
        if layer.has(HoulsbyAdapter.name):
            raise ValueError(
                "this layer already has a Houlsby adapter; add_houlsby_adapters() adds them once."
            )
        layer.adapter = _new_adapter(layer, layer.out_features, bottleneck, activation, init_std)
        layer.push(HoulsbyAdapter.name)

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return layer.adapter(y)


def _new_adapter(
    like: nn.Module, features: int, bottleneck: int, activation: str, init_std: float
) -> nn.Module:
    weight = like.weight
    adapter = BottleneckAdapter(features, bottleneck, activation=activation, init_std=init_std)
    return adapter.to(device=weight.device, dtype=weight.dtype)


def _plain_linear(model: nn.Module, path: str) -> nn.Linear:
    module = model.get_submodule(path)
    if hasattr(module, "base_layer"):
        raise TypeError(
            f"{path} is already wrapped by the peft library ({type(module).__name__}); insert metakit "
            "adapters before calling peft.get_peft_model, or use peft's own adapter types."
        )
    if not isinstance(module, nn.Linear):
        raise TypeError(f"expected an nn.Linear at {path}, found {type(module).__name__}.")
    if isinstance(module, PELinear) and module.has(HoulsbyAdapter.name):
        raise ValueError(f"{path} already has a Houlsby adapter; add_houlsby_adapters() adds them once.")
    if isinstance(module, PELinear) and module.has("tams"):
        raise ValueError(f"{path} is a TAMS sublayer; TAMS chooses among its own candidates.")
    return module


def add_houlsby_adapters(
    model: nn.Module, bottleneck: int = 64, activation: str = "gelu", init_std: float = 1e-3
) -> Spec:
    """Insert Houlsby adapters after the attention output and the feed-forward output of every layer.

    Each adapter (``x + up(act(down(x)))``) sits on the output projection, before dropout, the residual
    connection and the LayerNorm, as in Houlsby et al. (2019). With the default ``init_std=1e-3`` the
    model's output at insertion moves by ~1e-7 on a tiny BERT (tests check < 1e-4), ~1e-4 on e5-small.
    Two adapters of four tensors each are added per layer; original parameter names do not change.

    Args:
        model: a BERT / RoBERTa / XLM-R model (bare or with a task head); modified in place.
        bottleneck: width of each adapter's down-projection (``> 0``).
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        init_std: standard deviation of the projection weights at initialisation.

    Returns:
        The spec selecting exactly the added parameters (``select('*.adapter.*')``).

    Example:
        >>> adapters = add_houlsby_adapters(model, bottleneck=64)  # doctest: +SKIP
        >>> inner = adapters | head_spec(model)  # doctest: +SKIP
    """
    check_bottleneck(bottleneck)
    layout = find_layout(model)
    paths = [
        path for i in range(len(layout.layers)) for path in (layout.attention_output(i), layout.ffn_output(i))
    ]
    linears = {path: _plain_linear(model, path) for path in paths}  # validate all before changing any
    for path, linear in linears.items():
        wrapped = PELinear.wrap(linear)
        HoulsbyAdapter.attach(wrapped, bottleneck, activation, init_std)
        model.set_submodule(path, wrapped)
    added = [
        f"{path}.adapter.{name}"
        for path in paths
        for name, _ in model.get_submodule(path).adapter.named_parameters()
    ]
    return exact_spec(model, added, "*.adapter.*")


def add_top_adapter(
    model: nn.Module, bottleneck: int = 64, activation: str = "gelu", init_std: float = 1e-3
) -> Spec:
    """Insert the priming paper's single adapter after the last encoder layer, before the task head.

    ``logits = h(g(f(x; θp); θa); θh)`` (Gheini et al.): the adapter ``g`` is applied to the output of the
    last layer's final LayerNorm, so it adapts the encoder output for a ``*ForTokenClassification``
    head and for feature extraction from a bare ``BertModel`` alike. It lives at
    ``<last layer>.output.LayerNorm.top_adapter``; the LayerNorm's own parameters keep their names.

    Args:
        model: a BERT / RoBERTa / XLM-R model (bare or with a task head); modified in place.
        bottleneck: width of the adapter's down-projection (``> 0``).
        activation: ``"gelu"``, ``"relu"``, ``"silu"`` or ``"tanh"``.
        init_std: standard deviation of the projection weights at initialisation.

    Returns:
        The spec selecting exactly the four added tensors (``select('*.top_adapter.*')``).
    """
    check_bottleneck(bottleneck)
    layout = find_layout(model)
    path = layout.output_norm(len(layout.layers) - 1)
    norm = model.get_submodule(path)
    if not isinstance(norm, nn.LayerNorm):
        raise TypeError(f"expected an nn.LayerNorm at {path}, found {type(norm).__name__}.")
    features = norm.normalized_shape[-1]
    adapter = _new_adapter(norm, features, bottleneck, activation, init_std)
    model.set_submodule(path, AdaptedLayerNorm.wrap(norm, adapter))
    added = [f"{path}.top_adapter.{name}" for name, _ in adapter.named_parameters()]
    return exact_spec(model, added, "*.top_adapter.*")
