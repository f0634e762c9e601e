"""Fine-tuning on one episode's support set, and prediction, with the prototype head.

The head starts from the support set's prototypes, computed once with the model as it is before
fine-tuning (eval mode); the prototypes then stay fixed and the head's offset (and whatever else the
setting tunes) is trained with AdamW. When only the head is tuned, the support encodings are computed
once and the steps run on the head alone.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from transformers import get_linear_schedule_with_warmup

from metakit.prototype import PrototypeBatch, PrototypeClassifier, class_prototypes
from metakit.spec import Spec

__all__ = ["encode_all", "finetune_episode", "predict_labels"]


@torch.no_grad()
def encode_all(model: PrototypeClassifier, inputs: dict[str, torch.Tensor], batch_size: int) -> torch.Tensor:
    """Encodings ``[n, hidden]`` of padded ``inputs``, in eval mode, ``batch_size`` rows at a time."""
    was_training = model.training
    model.eval()
    n = next(iter(inputs.values())).shape[0]
    out = [model(**{k: v[i : i + batch_size] for k, v in inputs.items()}) for i in range(0, n, batch_size)]
    model.train(was_training)
    return torch.cat(out)


def finetune_episode(
    model: PrototypeClassifier,
    tuned: Spec,
    support: PrototypeBatch,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    head_only: bool = False,
    eval_batch_size: int = 64,
    writer: SummaryWriter | None = None,
) -> dict[str, float]:
    """Initialise the head from ``support``'s prototypes, then train what ``tuned`` selects for ``steps``.

    Args:
        tuned: the parameters to train (the head's offset and, unless ``head_only``, the encoder's or PE's).
        head_only: train on cached support encodings (the encoder must not be in ``tuned``).

    Returns:
        ``{"steps", "initial_loss", "final_loss"}``; ``support.prototypes`` holds the (fixed) prototypes.
    """
    names = set(tuned.names(model))
    if not names:
        raise ValueError(f"The fine-tuning spec {tuned!r} selects no parameter of the model.")
    if head_only and any(not n.startswith("head.") for n in names):
        raise ValueError("head_only fine-tuning runs on cached encodings, so it can only train the head.")
    features = encode_all(model, dict(support.inputs), eval_batch_size)
    prototypes = class_prototypes(features, support.labels, support.n_classes)
    support.prototypes = prototypes
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    params = [p for n, p in model.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=steps)
    n = len(support.labels)
    size = min(batch_size, n)
    rng = random.Random(seed)
    order: list[int] = []
    model.train()
    with torch.no_grad():
        initial = float(F.cross_entropy(model(features=features, prototypes=prototypes), support.labels))
    loss_value = initial
    for step in range(steps):
        if len(order) < size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        picked, order = order[:size], order[size:]
        index = torch.tensor(picked)
        if head_only:
            encodings = features[index]
        else:
            encodings = model(**{k: v[index] for k, v in support.inputs.items()})
        loss = F.cross_entropy(model(features=encodings, prototypes=prototypes), support.labels[index])
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = float(loss.detach())
        if writer is not None:
            writer.add_scalar("finetune/loss", loss_value, step)
    model.eval()
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"Fine-tuning diverged (loss {loss_value}); lower the learning rate ({lr}).")
    return {"steps": steps, "initial_loss": initial, "final_loss": loss_value}


@torch.no_grad()
def predict_labels(
    model: PrototypeClassifier,
    prototypes: torch.Tensor,
    *,
    inputs: list[dict[str, torch.Tensor]] | None = None,
    features: torch.Tensor | None = None,
) -> list[int]:
    """Predicted class ids for batches of encoder ``inputs``, or for precomputed ``features``."""
    model.eval()
    if features is not None:
        return model(features=features, prototypes=prototypes).argmax(-1).tolist()
    predicted: list[int] = []
    for batch in inputs or []:
        predicted += model(features=model(**batch), prototypes=prototypes).argmax(-1).tolist()
    return predicted
