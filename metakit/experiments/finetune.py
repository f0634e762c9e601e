"""Fine-tuning on a target language and prediction, from token ids or from cached encoder features.

When the encoder is frozen (head or adapter tuning), `sentence_features` runs it once over the
data in eval mode, and training runs on the top part only: many epochs for the price of one forward.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from datasets import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import DataCollatorForTokenClassification, get_linear_schedule_with_warmup

from metakit.experiments.data.metrics import word_predictions
from metakit.experiments.data.ner import IGNORE_INDEX, batches, model_inputs
from metakit.experiments.data.wikiann import WIKIANN_LABELS
from metakit.experiments.tagger import Tagger, token_loss
from metakit.spec import Spec

__all__ = ["finetune", "predict", "sentence_features"]


@torch.no_grad()
def sentence_features(
    tagger: Tagger, rows: Sequence[dict], collator: DataCollatorForTokenClassification, batch_size: int
) -> list[torch.Tensor]:
    """Top-of-encoder features of each sentence, ``[its length, hidden]``, computed in eval mode."""
    was_training = tagger.training
    tagger.eval()
    out: list[torch.Tensor] = []
    for batch in batches(rows, collator, batch_size):
        features = tagger.features(batch)
        for sentence, mask in zip(features, batch["attention_mask"], strict=True):
            out.append(sentence[: int(mask.sum())].clone())
    tagger.train(was_training)
    return out


def _feature_batches(
    features: Sequence[torch.Tensor], rows: Sequence[dict], batch_size: int, *, shuffle: bool, seed: int
):
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        feats = torch.nn.utils.rnn.pad_sequence([features[i] for i in picked], batch_first=True)
        labels = torch.full(feats.shape[:2], IGNORE_INDEX, dtype=torch.long)
        for j, i in enumerate(picked):
            labels[j, : len(rows[i]["labels"])] = torch.tensor(rows[i]["labels"])
        yield {"features": feats, "labels": labels}


def finetune(
    tagger: Tagger,
    tuned: Spec,
    rows: Sequence[dict],
    collator: DataCollatorForTokenClassification,
    *,
    epochs: float,
    batch_size: int,
    lr: float,
    seed: int,
    features: Sequence[torch.Tensor] | None = None,
    writer: SummaryWriter | None = None,
    desc: str = "fine-tuning",
    progress: bool = True,
) -> dict[str, float]:
    """Train the parameters ``tuned`` selects with AdamW and a linear decay; everything else is frozen.

    Args:
        rows: encoded sentences (`metakit.experiments.data.ner.model_inputs`).
        features: their `sentence_features`, to train the top part only (the encoder must be frozen).
        writer: TensorBoard writer for ``finetune/loss`` and ``finetune/lr``.
        progress: show a progress bar (off on the ranks that do not write, under ``torchrun``).

    Returns:
        ``{"steps", "final_loss"}``.
    """
    names = set(tuned.names(tagger))
    if not names:
        raise ValueError(f"The fine-tuning spec {tuned!r} selects no parameter of the model.")
    for name, param in tagger.named_parameters():
        param.requires_grad_(name in names)
    params = [p for n, p in tagger.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=lr)
    total = max(1, math.ceil(epochs * math.ceil(len(rows) / batch_size)))
    schedule = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total)
    tagger.train()
    step, loss_value, epoch = 0, float("nan"), 0
    with tqdm(total=total, desc=desc, leave=False, unit="step", disable=not progress) as bar:
        while step < total:
            source = (
                _feature_batches(features, rows, batch_size, shuffle=True, seed=seed + epoch)
                if features is not None
                else batches(rows, collator, batch_size, shuffle=True, seed=seed + epoch)
            )
            for batch in source:
                loss = token_loss(tagger, batch)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = float(loss.detach())
                if writer is not None:
                    writer.add_scalar("finetune/loss", loss_value, step)
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                if step >= total:
                    break
            epoch += 1
    tagger.eval()
    return {"steps": step, "final_loss": loss_value}


@torch.no_grad()
def predict(
    tagger: Tagger,
    encoded: Dataset,
    collator: DataCollatorForTokenClassification,
    batch_size: int,
    features: Sequence[torch.Tensor] | None = None,
) -> list[list[str]]:
    """Word-level predicted tags for every sentence of an `encode_ner` dataset."""
    tagger.eval()
    rows = model_inputs(encoded)
    word_index, n_words = encoded["word_index"], [len(t) for t in encoded["tokens"]]
    source = (
        _feature_batches(features, rows, batch_size, shuffle=False, seed=0)
        if features is not None
        else batches(rows, collator, batch_size)
    )
    predicted: list[list[str]] = []
    for start, batch in zip(range(0, len(rows), batch_size), source, strict=True):
        logits = tagger(**{k: v for k, v in batch.items() if k != "labels"})
        end = start + logits.shape[0]
        predicted += word_predictions(logits, word_index[start:end], n_words[start:end], WIKIANN_LABELS)
    return predicted
