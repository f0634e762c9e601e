"""Run a module on a params dict, and make that forward safe to differentiate twice.

Everything in metakit handles parameters as a flat ``dict[str, Tensor]`` keyed by
``model.named_parameters()`` names and runs the module through
`torch.func.functional_call`; the module itself is never mutated or copied.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["bind", "double_backward_safe", "parameter_names"]


def parameter_names(model: nn.Module) -> set[str]:
    """Every name a parameter can be passed under, tied aliases included."""
    return {name for name, _ in model.named_parameters(remove_duplicate=False)}


def bind(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    *,
    check_names: bool = True,
    buffers: Mapping[str, torch.Tensor] | None = None,
) -> Callable[..., Any]:
    """Return ``forward(*args, **kwargs)`` that runs ``model`` with ``params`` in place of its own.

    Parameters missing from ``params`` keep the module's values, buffers are the module's, and
    tied weights stay tied (passing either name of a tied pair replaces both).

    Args:
        model: the module to run; it is not modified.
        params: ``{dotted name: tensor}``, a subset of ``model.named_parameters()``.
        check_names: raise ``KeyError`` for names that are not parameters of ``model`` (a typo
            would otherwise be ignored silently). metakit's inner loop, whose names come from the
            model itself, turns this off on its hot path.
        buffers: the module's buffers by name, when the caller already has them (default: read
            from ``model``).

    Example:
        >>> params = {k: v * 2 for k, v in model.named_parameters()}  # doctest: +SKIP
        >>> bind(model, params)(x)  # same as model(x) with doubled weights  # doctest: +SKIP
    """
    if check_names:
        known = parameter_names(model)
        unknown = [name for name in params if name not in known]
        if unknown:
            raise KeyError(
                f"bind() got names that are not parameters of {type(model).__name__}: {unknown[:5]}. "
                f"Some real names: {sorted(known)[:5]}."
            )
    buffers = dict(model.named_buffers()) if buffers is None else buffers

    def forward(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, {**buffers, **params}, args, kwargs, tie_weights=True, strict=False)

    return forward


@contextlib.contextmanager
def double_backward_safe(enabled: bool = True) -> Iterator[None]:
    """Run attention with the math SDPA kernel, whose backward can itself be differentiated.

    PyTorch's fused SDPA kernels (flash, memory-efficient, the CPU flash kernel) have no double
    backward, and Hugging Face models call them by default. Every strategy that differentiates
    through inner gradients wraps its forward passes in this context, so users never see
    ``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``.
    The math kernel computes the same function; it is slower and uses more memory.
    """
    if not enabled or _math_kernel.depth:
        yield  # nothing to do, or already inside (the inner loop re-enters it at every step)
        return
    _math_kernel.depth += 1
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _math_kernel.depth -= 1


class _Depth(threading.local):
    depth = 0


_math_kernel = _Depth()
