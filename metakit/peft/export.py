"""Export meta-learned LoRA weights in the ``peft`` library's adapter format.

``export_peft(model, path)`` writes ``adapter_config.json`` and ``adapter_model.safetensors``, so
``peft.PeftModel.from_pretrained(base, path)`` loads them. It handles metakit's own LoRA
(`add_lora`) and models wrapped by ``peft`` itself.

What peft cannot represent: bottleneck adapters. metakit's Houlsby adapters
(`add_houlsby_adapters`) and the priming paper's top adapter
(`add_top_adapter`) are ``x + up(act(down(x)))`` blocks inserted after a
sublayer; peft's tuners re-parameterise existing weights (LoRA and its relatives, IA³, OFT, VeRA, …),
prepend prompts, tune LayerNorms, or (ShadowPEFT) run a parallel network beside decoder-only models,
and none of them is a serial nonlinear bottleneck. `export_peft` refuses such a model with a
clear error; save those with `save_pe` instead.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metakit.extras import require
from metakit.peft.interop import import_peft
from metakit.peft.modules import BottleneckAdapter, PELinear
from metakit.spec import Spec, require_nonempty

__all__ = ["export_peft"]

_PREFIX = "base_model.model."
#: The heads peft itself treats as modules_to_save, by task type.
_TASK_HEADS = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}


def export_peft(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    params: Mapping[str, torch.Tensor] | None = None,
    head: Spec | None = None,
    task_type: str | None = None,
    base_dir: str | os.PathLike | None = None,
) -> Path:
    """Save ``model``'s LoRA weights (and optionally its head) as a ``peft`` adapter directory.

    Args:
        model: a model with metakit LoRA (`add_lora`), or a ``peft.PeftModel``.
        path: the directory to write (created if missing).
        params: values to save instead of the model's own, by parameter name, e.g. the adapted
            params that ``learner.adapt(task)`` returns; names not in it are read from the model.
        head: metakit LoRA only: a spec of head parameters (e.g. ``head_spec(model)``) whose modules
            are saved whole, as peft's ``modules_to_save``. For a ``PeftModel`` its own
            ``modules_to_save`` decide.
        task_type: metakit LoRA only: peft's task type (``"TOKEN_CLS"``, ``"SEQ_CLS"``, ...), which
            picks the ``PeftModelFor...`` class on loading; ``None`` loads a plain ``PeftModel``. For the
            classification and QA types the head peft wraps by itself (``classifier``, ``score``,
            ``qa_outputs``) is saved too, since peft loads it from the file.
        base_dir: metakit LoRA on a Hugging Face model only: also write the model without its LoRA
            tensors there with ``save_pretrained``. Priming meta-learns the backbone too, so the
            adapter reproduces the outputs only on top of this base; it is recorded as
            ``base_model_name_or_path``.

    Returns:
        ``path``, ready for ``peft.PeftModel.from_pretrained(base, path)``.

    Raises:
        ValueError: the model has bottleneck adapters (peft has no such tuner), no LoRA at all, or
            layers whose LoRA cannot be written.

    Example:
        >>> lora = add_lora(model, rank=8)  # doctest: +SKIP
        >>> export_peft(model, "adapter", head=head_spec(model), task_type="TOKEN_CLS")  # doctest: +SKIP
        >>> peft.PeftModel.from_pretrained(fresh_base, "adapter")  # doctest: +SKIP
    """
    peft = import_peft()
    path = Path(path)
    values = {**dict(model.named_parameters()), **dict(params or {})}
    unknown = sorted(set(params or {}) - set(dict(model.named_parameters())))
    if unknown:
        raise KeyError(
            f"export_peft: params has names that are not parameters of {type(model).__name__}: {unknown[:5]}."
        )
    if isinstance(model, peft.PeftModel):
        if head is not None or task_type is not None or base_dir is not None:
            raise ValueError(
                "export_peft: head, task_type and base_dir apply to metakit's LoRA; a PeftModel keeps its "
                "own config (set modules_to_save and task_type in peft.LoraConfig)."
            )
        return _export_peft_model(peft, model, path, values)
    return _export_metakit_lora(peft, model, path, values, head, task_type, base_dir)


def _export_peft_model(peft: Any, model: nn.Module, path: Path, values: Mapping[str, torch.Tensor]) -> Path:
    from peft.utils import get_peft_model_state_dict

    state = {**model.state_dict(), **{n: v.detach() for n, v in values.items()}}
    path.mkdir(parents=True, exist_ok=True)
    for adapter_name, config in model.peft_config.items():
        tensors = get_peft_model_state_dict(model, state_dict=state, adapter_name=adapter_name)
        target = path if adapter_name == "default" else path / adapter_name
        target.mkdir(parents=True, exist_ok=True)
        _save_file(_contiguous(tensors), str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(str(target))
    return path


def _export_metakit_lora(
    peft: Any,
    model: nn.Module,
    path: Path,
    values: Mapping[str, torch.Tensor],
    head: Spec | None,
    task_type: str | None,
    base_dir: str | os.PathLike | None,
) -> Path:
    bottlenecks = [name for name, m in model.named_modules() if isinstance(m, BottleneckAdapter)]
    if bottlenecks:
        raise ValueError(
            f"export_peft: {type(model).__name__} has bottleneck adapters ({bottlenecks[:3]}"
            f"{' ...' if len(bottlenecks) > 3 else ''}), metakit's Houlsby or top adapter. peft has no tuner "
            "for a serial x + up(act(down(x))) block, so they cannot be written in its format; save them "
            "with metakit.peft.save_pe(path, model, spec) instead (or use LoRA, which peft represents)."
        )
    layers = {
        name: m for name, m in model.named_modules() if isinstance(m, PELinear) and m.lora_A is not None
    }
    if not layers:
        raise ValueError(
            f"export_peft: {type(model).__name__} has no LoRA layers; add them with metakit.peft.add_lora() "
            "(or wrap the model with peft.get_peft_model) before meta-learning and exporting."
        )
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    dropouts = []
    for name, layer in layers.items():
        lora_a, lora_b = values[f"{name}.lora_A"], values[f"{name}.lora_B"]
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_b
        ranks[name] = int(lora_a.shape[0])
        alphas[name] = _lora_scale(name, layer) * ranks[name]
        dropout = getattr(layer, "lora_dropout", None)
        dropouts.append(float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0)
    modules_to_save = None
    if head is not None:
        head_names = require_nonempty(head, model, "export_peft(head=...)")
        modules_to_save = sorted({name.rpartition(".")[0] for name in head_names})
    # peft adds these heads to modules_to_save by itself for these task types and then loads them from
    # the file, so they must be there.
    implied = [
        name
        for name, _ in model.named_modules()
        if any(name == key or name.endswith(f".{key}") for key in _TASK_HEADS.get(task_type, ()))
    ]
    if implied:
        modules_to_save = sorted(set(modules_to_save or []) | set(implied))
    if modules_to_save:
        for module_name in modules_to_save:
            for param_name, _ in model.get_submodule(module_name).named_parameters():
                full = f"{module_name}.{param_name}"
                tensors[f"{_PREFIX}{full}"] = values[full]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas[n] for n in layers if ranks[n] == rank).most_common(1)[0][0]
    base_name = None
    if base_dir is not None:
        base_name = str(_save_base(model, Path(base_dir), values))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        # Exact module paths: peft matches a pattern key as a dotted-name suffix regex.
        rank_pattern={_exact(n): r for n, r in ranks.items() if r != rank},
        alpha_pattern={_exact(n): a for n, a in alphas.items() if a != alpha},
        lora_dropout=max(dropouts),
        bias="none",
        modules_to_save=modules_to_save,
        task_type=task_type,
        base_model_name_or_path=base_name,
        inference_mode=True,
    )
    path.mkdir(parents=True, exist_ok=True)
    _save_file(_contiguous(tensors), str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(path))
    return path


def _lora_scale(name: str, layer: PELinear) -> float:
    """The layer's ``alpha / rank``: its own attribute, or measured from its output if it has none."""
    scale = getattr(layer, "lora_scale", None)
    if isinstance(scale, (int, float)):
        return float(scale)
    lora_a, lora_b = layer.lora_A.detach(), layer.lora_B.detach()
    if not lora_b.any():
        return 1.0  # the update is zero, so any scale reproduces the outputs
    was_training = layer.training
    layer.eval()
    try:
        with torch.no_grad():
            x = torch.randn(4, layer.in_features, dtype=lora_a.dtype, device=lora_a.device)
            delta = layer(x) - F.linear(x, layer.weight, layer.bias)
            unscaled = F.linear(F.linear(x, lora_a), lora_b)
    finally:
        layer.train(was_training)
    scale = float((delta * unscaled).sum() / (unscaled * unscaled).sum())
    if not torch.allclose(delta, scale * unscaled, rtol=1e-4, atol=1e-6):
        raise ValueError(
            f"export_peft: {name}'s output is not W x + b + scale · B A x, so peft cannot represent it."
        )
    return float(f"{scale:.6g}")  # so layers that share alpha / rank share one value in the config


def _save_base(model: nn.Module, base_dir: Path, values: Mapping[str, torch.Tensor]) -> Path:
    if not hasattr(model, "save_pretrained"):
        raise ValueError(
            f"export_peft(base_dir=...) needs a Hugging Face model (save_pretrained); {type(model).__name__} is "
            "not one. Save its state_dict without the '.lora_A'/'.lora_B' entries yourself."
        )
    state = {
        name: values.get(name, tensor).detach()
        for name, tensor in model.state_dict().items()
        if not name.endswith((".lora_A", ".lora_B"))
    }
    model.save_pretrained(str(base_dir), state_dict=state)
    return base_dir


def _exact(module_name: str) -> str:
    return module_name.replace(".", r"\.")


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def _save_file(tensors: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    require("safetensors.torch", "hf", "metakit.peft.export_peft").save_file(tensors, path, metadata=metadata)
