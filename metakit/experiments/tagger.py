"""The token tagger of the priming experiment, and its shortcut through cached encoder features.

``logits = h(g(f(x; θp); θa); θh)``: ``f`` is the encoder, ``g`` the single adapter on top of it
(`metakit.peft.add_top_adapter`), ``h`` the classifier. When only ``g`` and ``h`` change, the
encoder's output for a batch is the same at every step. Meta priming's inner loop then uses the
library's feature reuse (`Tagger.feature_cut`, a `metakit.Cut`), exact under every
strategy; adapter and head tuning on a frozen encoder run on `Tagger.features` computed once
per sentence (``model(features=..., ...)``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from metakit.experiments.data.ner import IGNORE_INDEX
from metakit.reuse import Cut
from metakit.spec import Spec

__all__ = ["Tagger", "token_loss"]


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    prefix = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        prefix.append(pieces[0])
    return ".".join(prefix)


class Tagger(nn.Module):
    """A ``*ForTokenClassification`` model whose ``forward`` also accepts cached top-of-encoder features.

    The wrapped model's children are registered under their own names, so parameter names (and every
    `Spec` built on the wrapped model) are unchanged. ``forward`` returns logits.

    Args:
        model: a Hugging Face token-classification model with ``dropout`` and ``classifier`` children.
        adapter: the spec of the top adapter's parameters, or ``None`` when the model has none.
    """

    def __init__(self, model: nn.Module, adapter: Spec | None = None):
        super().__init__()
        for attribute in ("dropout", "classifier"):
            if not isinstance(getattr(model, attribute, None), nn.Module):
                raise TypeError(
                    f"Tagger needs a token-classification model with a {attribute!r} module (BERT, "
                    f"XLM-R, ...); {type(model).__name__} has none."
                )
        for name, child in model.named_children():
            self.add_module(name, child)
        self._model = (model,)  # a tuple keeps it out of the module tree: its children are ours already
        self.adapter_path: str | None = None
        if adapter is not None:
            names = adapter.names(model)
            if not names:
                raise ValueError(
                    f"The adapter spec {adapter!r} selects no parameter of {type(model).__name__}."
                )
            self.adapter_path = _common_prefix(names)

    @property
    def model(self) -> nn.Module:
        """The wrapped Hugging Face model (sharing all modules with this one)."""
        return self._model[0]

    @property
    def config(self):
        return self.model.config

    def _top_entry(self) -> nn.Module:
        return self.get_submodule(self.adapter_path) if self.adapter_path else self.dropout

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[batch, length, labels]``, from token ids or from `features` of them."""
        if features is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                inputs["token_type_ids"] = token_type_ids
            return self.model(**inputs).logits
        hidden = self.get_submodule(self.adapter_path)(features) if self.adapter_path else features
        return self.classifier(self.dropout(hidden))

    @torch.no_grad()
    def features(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The hidden states that enter the top part (adapter or, without one, dropout + classifier)."""
        captured: list[torch.Tensor] = []
        handle = self._top_entry().register_forward_pre_hook(lambda module, args: captured.append(args[0]))
        try:
            self.forward(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            handle.remove()
        if len(captured) != 1:
            raise RuntimeError(
                f"Expected the top module to run once per forward, it ran {len(captured)} times."
            )
        return captured[0].detach()

    def feature_cut(self, inner: Spec) -> Cut | None:
        """The library's feature reuse for this tagger (`metakit.Cut`), or ``None``.

        When ``inner`` holds only the top adapter and the classifier, the encoder's output for a batch
        is the same at every inner step: the cut runs it once per batch and only the top in each step.
        """
        top = [f"{self.adapter_path}." if self.adapter_path else None, "classifier."]
        names = inner.names(self)
        if not names or not all(name.startswith(tuple(p for p in top if p)) for name in names):
            return None
        adapter = self.adapter_path

        def rest(run, features: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden = run(adapter)(features) if adapter else features
            return run("classifier")(run("dropout")(hidden))

        return Cut(at=adapter or "dropout", rest=rest)


def token_loss(forward, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over labelled sub-words: ``loss_fn(forward, batch)`` for the meta-learner."""
    logits = forward(**batch)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX)
