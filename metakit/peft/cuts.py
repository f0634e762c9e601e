"""Feature-reuse cuts for the Hugging Face layouts metakit knows.

A BERT-family ``*ForTokenClassification`` or ``*ForSequenceClassification`` model whose inner loop
adapts only the priming paper's top adapter and/or the task head splits into an encoder the inner
loop does not change and a small top: ``classifier(dropout([pooler](top_adapter(h))))``.
`feature_cut` returns that `Cut`; the recipes use it automatically.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metakit.peft.layout import find_layout
from metakit.reuse import Cut
from metakit.spec import Spec

__all__ = ["feature_cut"]


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def feature_cut(model: nn.Module, inner: Spec) -> Cut | None:
    """The cut below the top adapter (or the head) of a Hugging Face classifier, or ``None``.

    ``None`` when the layout is not one metakit knows (the model then runs whole at every step,
    which is always correct), or when an inner parameter lies below the top adapter.

    Example:
        >>> adapter = metakit.peft.add_top_adapter(model)  # doctest: +SKIP
        >>> metakit.peft.feature_cut(model, adapter | metakit.peft.head_spec(model))  # doctest: +SKIP
        Cut(at='bert.encoder.layer.11.output.LayerNorm.top_adapter')
    """
    try:
        layout = find_layout(model)
    except ValueError:
        return None
    if layout.task_model is None:
        return None
    task = model.get_submodule(layout.task_model)
    kind = type(task).__name__
    token = kind.endswith("ForTokenClassification")
    if not (token or kind.endswith("ForSequenceClassification")):
        return None
    if not isinstance(getattr(task, "classifier", None), nn.Linear) or not isinstance(
        getattr(task, "dropout", None), nn.Dropout
    ):
        return None  # e.g. XLM-R's sequence head, which pools by itself
    pooler = None
    if not token:
        pooler = _join(layout.backbone, "pooler")
        if not isinstance(getattr(model.get_submodule(layout.backbone), "pooler", None), nn.Module):
            return None
    classifier, dropout = _join(layout.task_model, "classifier"), _join(layout.task_model, "dropout")
    adapter = f"{layout.output_norm(len(layout.layers) - 1)}.top_adapter"
    has_adapter = _exists(model, adapter)
    names = inner.names(model)
    if not names:
        return None
    if all(name.startswith(classifier + ".") for name in names):
        top_adapter, at = None, dropout
    elif has_adapter and all(name.startswith((classifier + ".", adapter + ".")) for name in names):
        top_adapter, at = adapter, adapter
    else:
        return None
    config = task.config

    def rest(run, features: torch.Tensor, *args: Any, labels: torch.Tensor | None = None, **kwargs: Any):
        hidden = features
        if top_adapter is not None:
            hidden = run(top_adapter)(hidden)
            if pooler is not None:
                hidden = run(pooler)(hidden)
        logits = run(classifier)(run(dropout)(hidden))
        loss = None if labels is None else _loss(config, logits, labels, token)
        return _output(token)(loss=loss, logits=logits)

    return Cut(at=at, rest=rest)


def _exists(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _loss(config: Any, logits: torch.Tensor, labels: torch.Tensor, token: bool) -> torch.Tensor:
    """The loss Hugging Face's own head computes for these labels."""
    num_labels = logits.shape[-1]
    if token:
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return (
            F.mse_loss(logits.squeeze(), labels.squeeze()) if num_labels == 1 else F.mse_loss(logits, labels)
        )
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels)


def _output(token: bool):
    from transformers.modeling_outputs import SequenceClassifierOutput, TokenClassifierOutput

    return TokenClassifierOutput if token else SequenceClassifierOutput
