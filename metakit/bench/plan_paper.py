"""The priming paper's model and meta-batch, built on fake tensors: mBERT is never allocated.

Gheini et al. prime ``bert-base-multilingual-cased`` on WikiAnn NER (7 tags) with one task per
source language (en, es), 8 support and 8 query sentences of up to 128 sub-words each, 5 inner SGD
steps (the ``paper`` preset of `metakit.experiments.config`). The model is built from its
``BertConfig`` (no download) under ``FakeTensorMode``, in training mode (dropout 0.1, as when priming).
"""

from __future__ import annotations

import torch
import torchopt
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import metakit as mk
from metakit.task import Task

__all__ = ["MBERT", "mbert_learner", "mbert_tagger", "paper_tasks"]

#: bert-base-multilingual-cased's configuration (its config.json on the hub), 7 NER labels.
MBERT = {
    "vocab_size": 119547,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "num_labels": 7,
}
TASKS, SUPPORT, QUERY, LENGTH, INNER_LR, BOTTLENECK = 2, 8, 8, 128, 0.03, 64


def mbert_tagger(mode: FakeTensorMode) -> nn.Module:
    """``BertForTokenClassification`` of mBERT's shape, every tensor fake (about 0.7 GB it never allocates)."""
    from transformers import BertConfig, BertForTokenClassification

    with mode:
        model = BertForTokenClassification(BertConfig(**MBERT))
    return model.train()


def paper_tasks(mode: FakeTensorMode, seed: int = 0) -> list[Task]:
    """Two tasks (en, es) of 8 support and 8 query sentences of 128 sub-words, with real token ids."""
    generator = torch.Generator().manual_seed(seed)

    def batch(size: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1000, MBERT["vocab_size"], (size, LENGTH), generator=generator)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": torch.randint(0, MBERT["num_labels"], (size, LENGTH), generator=generator),
        }

    return [Task(batch(SUPPORT), batch(QUERY)) for _ in range(TASKS)]


def mbert_learner(partition: str, steps: int, mode: FakeTensorMode) -> tuple[nn.Module, mk.MetaLearner]:
    """The fake mBERT and its learner: ``"priming"`` (top adapter + head inner) or ``"maml"`` (every parameter)."""
    from metakit.bench.workloads import token_classification_loss
    from metakit.peft import add_top_adapter, head_spec

    model = mbert_tagger(mode)
    if partition == "priming":
        # Built real (about 0.1 M parameters): Module.to() cannot swap a fake parameter in place.
        adapter = add_top_adapter(model, bottleneck=BOTTLENECK)
        learner = mk.recipes.priming(
            model,
            token_classification_loss,
            pe=adapter,
            head=head_spec(model),
            inner_lr=INNER_LR,
            steps=steps,
        )
    elif partition == "maml":
        learner = mk.MetaLearner(
            model,
            token_classification_loss,
            inner=mk.InnerLoop(params=mk.everything(), optimizer=torchopt.sgd(lr=INNER_LR), steps=steps),
            outer_params=mk.everything(),
            strategy=mk.SecondOrder(),
        )
    else:
        raise ValueError(f"partition must be 'priming' or 'maml', got {partition!r}.")
    return model, learner
