"""The few-shot model: a pretrained encoder (loaded once), copied per run with its PE modules and head.

Parameter groups of a run's `PrototypeClassifier`: ``backbone`` (the encoder's
own weights less what stays frozen), ``pe`` (Houlsby adapters, LoRA, TARP's task factors or TAMS's
task-adaptive candidates, if the setting has them), ``pe_outer`` (TARP's shared factors and generator,
TAMS's architecture weights), ``head`` (the prototype head's offset) and ``frozen`` (the word embeddings
when configured).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import AutoModel, AutoTokenizer, BertModel, PreTrainedTokenizerBase

from metakit.experiments.fewshot.config import FewShotConfig
from metakit.experiments.fewshot.settings import FewShotSetting
from metakit.experiments.model import resolve_model_path
from metakit.experiments.tiny import tiny_bert_config
from metakit.prototype import PrototypeClassifier
from metakit.spec import Spec, everything, nothing, select

if TYPE_CHECKING:
    from metakit.peft import TamsController

__all__ = ["FewShotBackbone", "FewShotGroups"]

WORD_EMBEDDINGS = select("*word_embeddings.weight")


@dataclass
class FewShotGroups:
    """The parameter groups of one run's model."""

    backbone: Spec
    pe: Spec | None
    head: Spec
    frozen: Spec
    #: Outer-only PE parameters (TARP's shared factors and generator, TAMS's architecture weights):
    #: meta-learned, never tuned on an episode.
    pe_outer: Spec | None = None
    #: The TAMS controller (setting ``meta_tams``), to `discretize`.
    controller: TamsController | None = None

    @property
    def meta_learned(self) -> Spec:
        """What meta-training on the pool learns in the PE modules (their start and outer-only parts)."""
        return self.pe | self.pe_outer if self.pe_outer is not None else self.pe

    def tuned(self, setting: FewShotSetting) -> Spec:
        """What fine-tuning on an episode updates in ``setting``."""
        if setting.tune == "full":
            return self.backbone | self.head
        if setting.tune == "head":
            return self.head
        return self.pe | self.head


def tiny_encoder(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> BertModel:
    """A random bare BERT small enough for tests (mean-pooled, so no pooler)."""
    torch.manual_seed(seed)
    return BertModel(tiny_bert_config(vocab_size, hidden, layers), add_pooling_layer=False)


class FewShotBackbone:
    """A pretrained encoder and its tokenizer, loaded once; `build` makes a run's model.

    Args:
        config: ``model``, ``bottleneck``, ``lora_rank``, ``lora_alpha``, ``head_init``, ``max_classes``,
            ``freeze_word_embeddings``.
        tiny_texts: texts to build the ``"tiny"`` model's vocabulary from.
    """

    def __init__(self, config: FewShotConfig, tiny_texts: Iterable[str] = ()):
        self.config = config
        if config.model == "tiny":
            from metakit.experiments.tiny import tiny_tokenizer

            self.tokenizer: PreTrainedTokenizerBase = tiny_tokenizer(w for t in tiny_texts for w in t.split())
            self.encoder = tiny_encoder(len(self.tokenizer))
        else:
            path = resolve_model_path(config.model)
            self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
            self.encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        self.encoder.eval()
        self.hidden_size = int(self.encoder.config.hidden_size)

    def build(
        self, setting: FewShotSetting, seed: int, state: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[PrototypeClassifier, FewShotGroups]:
        """A fresh classifier for ``setting``: encoder copy, PE modules from ``seed``, then ``state`` by name."""
        from metakit.peft import add_houlsby_adapters, add_lora, add_tams, add_tarp

        c = self.config
        torch.manual_seed(seed)
        model = PrototypeClassifier(copy.deepcopy(self.encoder), self.hidden_size, c.max_classes, c.head_init)
        pe: Spec | None = None
        pe_outer: Spec | None = None
        controller = None
        if setting.pe == "houlsby":
            pe = add_houlsby_adapters(model, bottleneck=c.bottleneck)
        elif setting.pe == "lora":
            pe = add_lora(model, rank=c.lora_rank, alpha=c.lora_alpha)
        elif setting.pe == "tarp":
            tarp = add_tarp(model, rank=c.tarp_rank)
            pe, pe_outer = tarp.inner, tarp.outer
        elif setting.pe == "tams":
            controller = add_tams(
                model, candidates=tuple(c.tams_candidates), rank=c.tarp_rank, bottleneck=c.bottleneck
            )
            pe, pe_outer = controller.inner, controller.outer
        head = PrototypeClassifier.head_spec()
        frozen = WORD_EMBEDDINGS if c.freeze_word_embeddings else nothing()
        backbone = everything() - head - (pe or nothing()) - (pe_outer or nothing()) - frozen
        if state is not None:
            params = dict(model.named_parameters())
            unknown = sorted(set(state) - set(params))
            if unknown:
                raise KeyError(f"Saved state names parameters the model lacks: {unknown[:5]}.")
            with torch.no_grad():
                for name, value in state.items():
                    params[name].copy_(value)
        frozen_names = set(frozen.names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen_names)
        model.eval()
        groups = FewShotGroups(
            backbone=backbone, pe=pe, head=head, frozen=frozen, pe_outer=pe_outer, controller=controller
        )
        return model, groups
