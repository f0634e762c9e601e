"""Save and load just a task's PE parameters and head, as safetensors."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from metakit.extras import require
from metakit.spec import Spec, require_nonempty

__all__ = ["load_pe", "save_pe"]

_FORMAT = "metakit-pe/1"


def save_pe(
    path: str | os.PathLike,
    model: nn.Module,
    spec: Spec,
    params: Mapping[str, torch.Tensor] | None = None,
) -> list[str]:
    """Write the parameters ``spec`` selects (e.g. ``adapters | head_spec(model)``) to a safetensors file.

    Args:
        path: destination file (conventionally ``*.safetensors``).
        model: the model the names refer to.
        spec: which parameters to save; must select at least one.
        params: values to save instead of the model's own, e.g. the adapted params that
            ``learner.adapt(task)`` returns; names not in it are read from the model.

    Returns:
        The names written.
    """
    names = require_nonempty(spec, model, "save_pe")
    own = dict(model.named_parameters())
    values = {**own, **(params or {})}
    tensors = {name: values[name].detach().to("cpu").contiguous().clone() for name in names}
    metadata = {"format": _FORMAT, "spec": repr(spec), "model": type(model).__name__}
    require("safetensors.torch", "hf", "metakit.peft.save_pe").save_file(
        tensors, str(path), metadata=metadata
    )
    return names


def load_pe(path: str | os.PathLike, model: nn.Module) -> list[str]:
    """Copy the tensors saved by `save_pe` into ``model``'s parameters, in place.

    The model must already have the same PE modules inserted (call ``add_houlsby_adapters`` etc. with
    the same settings first). Every saved name must exist with the same shape.

    Returns:
        The names loaded.

    Raises:
        FileNotFoundError, ValueError: missing or unreadable file, unknown names or shape mismatches.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_pe: no such file {str(path)!r}.")
    safetensors = require("safetensors", "hf", "metakit.peft.load_pe")
    require("safetensors.torch", "hf", "metakit.peft.load_pe")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError) as err:
        raise ValueError(f"load_pe: {str(path)!r} is not a readable safetensors file: {err}") from err
    own = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(
            f"load_pe: {str(path)!r} has tensors that are not parameters of {type(model).__name__}: "
            f"{unknown[:5]}. Insert the same PE modules (same settings) into the model before loading."
        )
    wrong = {n: (tuple(t.shape), tuple(own[n].shape)) for n, t in tensors.items() if t.shape != own[n].shape}
    if wrong:
        listed = json.dumps({n: f"saved {s} vs model {m}" for n, (s, m) in list(wrong.items())[:5]})
        raise ValueError(f"load_pe: shape mismatch for {len(wrong)} tensors of {str(path)!r}: {listed}.")
    with torch.no_grad():
        for name, tensor in tensors.items():
            own[name].copy_(tensor.to(device=own[name].device, dtype=own[name].dtype))
    return sorted(tensors)
