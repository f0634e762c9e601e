"""A classifier head initialised per episode from class prototypes (Proto-MAML; LEOPARD's head).

For an episode with support encodings ``h_i`` and labels ``y_i``, the prototype of class ``c`` is the
mean encoding ``p_c = mean{h_i : y_i = c}``. The head starts as

- ``"euclidean"`` (default, Proto-MAML, Triantafillou et al. 2020; LEOPARD): ``W = 2·P``, ``b = −‖p_c‖²``,
  so its logits ``2⟨h, p_c⟩ − ‖p_c‖²`` are ``−‖h − p_c‖²`` up to a per-example constant;
- ``"mean"``: ``W = P``, ``b = 0`` (dot product with the class means),

and is then adapted in the inner loop. `PrototypeHead` holds only the *offset* from that start
(zero-initialised ``weight`` and ``bias`` of shape ``[max_classes, hidden]``, ``[max_classes]``), so the
inner loop adapts ordinary parameters while the start stays a differentiable function of the encoder:
a strategy that differentiates through the first inner step (``SecondOrder``) carries the meta-gradient
through the prototypes into the encoder (and its adapters), exactly as Proto-MAML. With ``FirstOrder``
the prototypes are constants, as in first-order Proto-MAML.

Any recipe can use it: wrap an encoder in `PrototypeClassifier`, build tasks with
`prototype_task`, pass `prototype_loss` as the loss, and put `PrototypeHead` 's
parameters (``select("head.*")``) in the inner spec and never in the outer one.

Example:
    >>> model = PrototypeClassifier(encoder, hidden_size=384, max_classes=16)  # doctest: +SKIP
    >>> learner = recipes.meta_adapters(model, prototype_loss, adapters=adapters, head=select("head.*"))  # doctest: +SKIP
    >>> learner.meta_step([prototype_task(support_inputs, support_labels, query_inputs, query_labels)])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from metakit.spec import Spec, select
from metakit.task import Task

__all__ = [
    "PrototypeBatch",
    "PrototypeClassifier",
    "PrototypeHead",
    "class_prototypes",
    "mean_pool",
    "prototype_loss",
    "prototype_task",
]

Init = Literal["euclidean", "mean", "zero"]


def class_prototypes(encodings: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The mean encoding of each class ``0..n_classes-1``: ``[n_classes, hidden]``, differentiable.

    Raises:
        ValueError: a class has no example, or a label is outside ``0..n_classes-1``.
    """
    if encodings.ndim != 2 or labels.shape != encodings.shape[:1]:
        raise ValueError(
            f"class_prototypes needs encodings [n, hidden] and labels [n], got {tuple(encodings.shape)} and "
            f"{tuple(labels.shape)}."
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"Labels must lie in 0..{n_classes - 1}, got {sorted(set(labels.tolist()))}.")
    one_hot = F.one_hot(labels, n_classes).to(encodings.dtype)  # [n, C]
    counts = one_hot.sum(0)
    empty = [c for c in range(n_classes) if counts[c] == 0]
    if empty:
        raise ValueError(f"Classes {empty} have no support example, so they have no prototype.")
    return (one_hot.T @ encodings) / counts[:, None]


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Average of the token states over the attention mask (e5's sentence encoding): ``[batch, hidden]``."""
    if attention_mask is None:
        return hidden.mean(1)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class PrototypeHead(nn.Module):
    """A linear head whose start is computed from prototypes; its parameters are the offset from it.

    Args:
        hidden_size: width of the encodings.
        max_classes: the most classes an episode may have (the offset's rows; an episode uses the first N).
        init: ``"euclidean"`` (``W = 2P``, ``b = −‖p‖²``), ``"mean"`` (``W = P``, ``b = 0``) or ``"zero"``
            (``W = 0``, ``b = 0``).
    """

    def __init__(self, hidden_size: int, max_classes: int, init: Init = "euclidean"):
        super().__init__()
        if init not in ("euclidean", "mean", "zero"):
            raise ValueError(f"PrototypeHead init must be 'euclidean', 'mean' or 'zero', got {init!r}.")
        if max_classes < 1:
            raise ValueError(f"max_classes must be >= 1, got {max_classes}.")
        self.init, self.max_classes = init, max_classes
        self.weight = nn.Parameter(torch.zeros(max_classes, hidden_size))
        self.bias = nn.Parameter(torch.zeros(max_classes))

    def start(self, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The head's weight and bias at the start of an episode, from its prototypes ``[N, hidden]``."""
        if self.init == "euclidean":
            return 2.0 * prototypes, -(prototypes * prototypes).sum(-1)
        if self.init == "zero":
            return torch.zeros_like(prototypes), prototypes.new_zeros(prototypes.shape[0])
        return prototypes, prototypes.new_zeros(prototypes.shape[0])

    def effective(self, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and bias the head applies now: the start plus the (adapted) offset."""
        n = prototypes.shape[0]
        if n > self.max_classes:
            raise ValueError(
                f"The episode has {n} classes but the PrototypeHead was built for at most {self.max_classes}; "
                "build it with a larger max_classes."
            )
        weight, bias = self.start(prototypes)
        return weight + self.weight[:n], bias + self.bias[:n]

    def forward(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, N]`` of ``features`` ``[batch, hidden]``."""
        weight, bias = self.effective(prototypes)
        return features @ weight.T + bias


class PrototypeClassifier(nn.Module):
    """An encoder with a `PrototypeHead`; parameter names are ``encoder.*`` and ``head.*``.

    ``forward(**inputs)`` returns sentence encodings ``[batch, hidden]`` (mean-pooled last hidden states
    for a Hugging Face encoder, or whatever tensor the encoder returns); ``forward(features=...,
    prototypes=...)`` returns the head's logits for given encodings.

    Args:
        encoder: a Hugging Face ``AutoModel`` (any module returning ``last_hidden_state``) or a module
            returning ``[batch, hidden]``.
        hidden_size: the encodings' width.
        max_classes, init: see `PrototypeHead`.
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, max_classes: int, init: Init = "euclidean"):
        super().__init__()
        self.encoder = encoder
        self.head = PrototypeHead(hidden_size, max_classes, init)

    @staticmethod
    def head_spec() -> Spec:
        """The head's parameters (inner only: every episode restarts them from its prototypes)."""
        return select("head.*")

    def encode(self, **inputs: Any) -> torch.Tensor:
        """Sentence encodings of a tokenised batch."""
        out = self.encoder(**inputs)
        if isinstance(out, torch.Tensor):
            return out
        return mean_pool(out.last_hidden_state, inputs.get("attention_mask"))

    def forward(
        self, features: torch.Tensor | None = None, prototypes: torch.Tensor | None = None, **inputs: Any
    ) -> torch.Tensor:
        if features is None:
            return self.encode(**inputs)
        if prototypes is None:
            raise ValueError("PrototypeClassifier(features=...) needs prototypes= to compute logits.")
        return self.head(features, prototypes)


@dataclass(eq=False)
class PrototypeBatch:
    """A batch of an episode: model inputs, labels ``0..N-1``, and the support batch it belongs to.

    The support batch caches its prototypes the first time a loss sees it, from the encoder it was
    run with then (the start of the inner loop), and every later step and the query loss reuse them.

    Attributes:
        inputs: keyword inputs of the encoder (``input_ids``, ``attention_mask``, ...).
        labels: class ids ``[batch]``.
        n_classes: N.
        support: the episode's support batch, or ``None`` when this is it.
    """

    inputs: Mapping[str, torch.Tensor]
    labels: torch.Tensor
    n_classes: int
    support: PrototypeBatch | None = None
    prototypes: torch.Tensor | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Forget the cached prototypes (to start the episode again from other weights)."""
        (self.support or self).prototypes = None


def episode_prototypes(
    forward: Any, batch: PrototypeBatch, features: torch.Tensor | None = None
) -> torch.Tensor:
    """The prototypes of ``batch``'s episode, computed with ``forward`` on the first call and cached."""
    support = batch.support or batch
    if support.prototypes is None:
        if features is None or batch.support is not None:
            features = forward(**support.inputs)
        support.prototypes = class_prototypes(features, support.labels, support.n_classes)
    return support.prototypes


def prototype_loss(forward: Any, batch: PrototypeBatch) -> torch.Tensor:
    """Cross-entropy of the prototype head on ``batch`` (``forward``: a bound `PrototypeClassifier`)."""
    features = forward(**batch.inputs)
    prototypes = episode_prototypes(forward, batch, features)
    return F.cross_entropy(forward(features=features, prototypes=prototypes), batch.labels)


def prototype_task(
    support_inputs: Mapping[str, torch.Tensor],
    support_labels: torch.Tensor,
    query_inputs: Mapping[str, torch.Tensor],
    query_labels: torch.Tensor,
    n_classes: int | None = None,
) -> Task:
    """A `Task` whose query shares its support's prototypes (loss: `prototype_loss`)."""
    n = int(support_labels.max()) + 1 if n_classes is None else n_classes
    support = PrototypeBatch(support_inputs, support_labels, n)
    return Task(support, PrototypeBatch(query_inputs, query_labels, n, support=support), prototype_loss)
