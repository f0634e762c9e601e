"""Mixed precision for the inner and outer loops: autocast forward passes, float32 everything else.

`precision_objective` wraps an objective ``objective(params, batch) -> loss`` so that its
forward pass runs under ``torch.autocast`` in bfloat16 or float16, while the parameters, the inner
gradients and updates, and the meta-gradient stay in the parameters' own dtype (float32): autocast
casts weights to the low dtype inside each matmul, and their gradients flow back to the float32
tensors. The loss is returned in float32. It works under every strategy, second order included
(the backward of an autocast forward is differentiable again).

float16 has a narrow range, so its gradients need loss scaling: the inner loop and the strategies
take gradients with `scaled_grad`, ``grad(S · loss) / S``, which is the same function of the
parameters (so second order through it is exact) while the gradients inside the float16 region
are S times larger and do not underflow. The scale is static: a meta-gradient cannot skip an inner
step the way ``torch.amp.GradScaler`` skips an outer one; a non-finite result makes
``MetaLearner.meta_step`` raise, and a smaller scale is the fix. (Scaling the gradient on its way
through an identity op, at the loss and back at the parameters, would be right for first order
but wrong by a factor 1/S for every second-order term, so metakit does not do it.)

Example:
    >>> objective = precision_objective(model_objective(model, loss_fn), "bf16", "cpu")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "DEFAULT_FP16_LOSS_SCALE",
    "PRECISIONS",
    "autocast_dtype",
    "loss_scale_for",
    "precision_objective",
    "scaled_grad",
]

Objective = Callable[[Mapping[str, torch.Tensor], Any], torch.Tensor]

#: The precisions by name: the autocast dtype of the forward passes (``None``: no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Static loss scale for float16 (a power of two, so scaling and unscaling are exact).
DEFAULT_FP16_LOSS_SCALE = 2.0**12


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device_type``; a clear error where it cannot run.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        device_type: ``"cpu"`` or ``"cuda"`` (``torch.device.type`` of the parameters).

    Returns:
        ``None`` for fp32, else the low dtype.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}.")
    dtype = PRECISIONS[precision]
    if dtype is torch.float16 and device_type != "cuda":
        raise ValueError(
            f"precision='fp16' needs a CUDA device: float16 autocast with loss scaling is for GPUs, and the "
            f"parameters are on {device_type!r}. Use precision='bf16' on CPU (or 'fp32')."
        )
    if dtype is torch.bfloat16 and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            "precision='bf16' needs a GPU with bfloat16 support (Ampere or newer); this one has none. "
            "Use precision='fp16' or 'fp32'."
        )
    return dtype


def precision_objective(objective: Objective, precision: str, device_type: str) -> Objective:
    """``objective`` with its forward pass under autocast in ``precision``; the loss in float32.

    Args:
        objective: ``objective(params, batch, ...) -> scalar loss`` (e.g. ``metakit.inner.model_objective``;
            any further arguments are passed through).
        precision: ``"fp32"`` (returns ``objective`` itself), ``"bf16"`` or ``"fp16"`` (CUDA only; take
            its gradients with `scaled_grad`).
        device_type: where the parameters are (``"cpu"`` or ``"cuda"``).

    Returns:
        the wrapped objective.
    """
    dtype = autocast_dtype(precision, device_type)
    if dtype is None:
        return objective

    def low_precision_objective(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype):
            loss = objective(*args, **kwargs)
        return loss.float()

    return low_precision_objective


def loss_scale_for(precision: str) -> float | None:
    """The static loss scale a precision needs: ``DEFAULT_FP16_LOSS_SCALE`` for fp16, else ``None``."""
    return DEFAULT_FP16_LOSS_SCALE if PRECISIONS.get(precision) is torch.float16 else None


def scaled_grad(
    loss: torch.Tensor,
    inputs: Sequence[torch.Tensor],
    loss_scale: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, **kwargs)`` computed as ``grad(S · loss) / S``.

    The same function of the inputs (so ``create_graph=True`` and second order through it are
    exact), with the gradients inside the network S times larger, so float16 ones do not underflow.
    ``loss_scale=None`` is plain ``torch.autograd.grad``.
    """
    if loss_scale is None:
        return torch.autograd.grad(loss, inputs, **kwargs)
    if not (isinstance(loss_scale, int | float) and loss_scale > 0):
        raise ValueError(f"loss_scale must be a positive number, got {loss_scale!r}.")
    grads = torch.autograd.grad(loss * loss_scale, inputs, **kwargs)
    return tuple(None if g is None else g / loss_scale for g in grads)
