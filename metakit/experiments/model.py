"""Backbone loading and per-run model construction: a fresh tagger, its parameter groups, its seed.

The pretrained backbone is loaded once (`Backbone`); every run deep-copies it, adds the top
adapter if its setting needs one, and re-initialises the classifier from the run's seed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForTokenClassification, AutoTokenizer, PreTrainedTokenizerBase

from metakit.experiments.config import ExperimentConfig
from metakit.experiments.data.wikiann import WIKIANN_LABELS
from metakit.experiments.settings import Setting
from metakit.experiments.tagger import Tagger
from metakit.spec import Spec, everything, nothing, select

__all__ = ["Backbone", "Groups", "check_model", "fraction", "resolve_model_path", "trainable_state"]

WORD_EMBEDDINGS = select("*word_embeddings.weight")


def resolve_model_path(name: str) -> str:
    """``"e5"`` → the offline multilingual-e5-small folder; any other name or path as given."""
    if name == "e5":
        try:
            from metakit.experiments.pretrained import multilingual_e5_small
        except ImportError as error:
            raise ImportError(
                "model 'e5' needs metakit.experiments.pretrained.multilingual_e5_small (the offline encoder); "
                f"it could not be imported: {error}. Pass a hub name or a local path instead."
            ) from error
        return str(multilingual_e5_small())
    return name


def check_model(name: str) -> None:
    """Fail early, with one line, if ``name`` cannot be loaded: before an output folder is written.

    ``"tiny"`` always works; ``"e5"`` needs the offline encoder's packages (built here if missing); a
    local folder needs a ``config.json``; anything else must be in the Hugging Face cache or on the hub.
    """
    if name == "tiny":
        return
    if name == "e5":
        resolve_model_path(name)
        return
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise ValueError(f"--model {name!r} is a folder without a config.json: not a Hugging Face model.")
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return
    except (OSError, ValueError):
        pass  # not cached: ask the hub once (no retries), below
    from huggingface_hub import file_exists

    hint = "Pass 'e5' (offline multilingual-e5-small), 'tiny', or a local model folder."
    try:
        found = file_exists(name, "config.json")
    except Exception as error:  # no network, bad name, ...: every failure means the same to the user
        reason = " ".join(str(error).split())[:200]
        raise ValueError(
            f"--model {name!r} is not a local folder, not in the Hugging Face cache, and the hub cannot be "
            f"asked ({reason}). {hint}"
        ) from None
    if not found:
        raise ValueError(f"--model {name!r}: the Hugging Face hub has no such model. {hint}")


@dataclass
class Groups:
    """The parameter groups of one run's model: the paper's θp, θa, θh, and what stays frozen."""

    backbone: Spec
    adapter: Spec | None
    head: Spec
    frozen: Spec

    def tuned(self, setting: Setting) -> Spec:
        """What target fine-tuning updates in ``setting``."""
        if setting.tune == "full":
            return self.backbone | self.head
        if setting.tune == "head":
            return self.head
        return self.adapter | self.head


class Backbone:
    """A pretrained token-classification model and its tokenizer, loaded once and copied per run.

    Args:
        config: the experiment config (``model``, ``bottleneck``, ``freeze_word_embeddings``).
        tiny_words: words to build the ``"tiny"`` model's vocabulary from.
    """

    def __init__(self, config: ExperimentConfig, tiny_words: Iterable[str] = ()):
        self.config = config
        labels = {"num_labels": len(WIKIANN_LABELS)}
        if config.model == "tiny":
            from metakit.experiments.tiny import tiny_bert, tiny_tokenizer

            self.tokenizer: PreTrainedTokenizerBase = tiny_tokenizer(tiny_words)
            self.model = tiny_bert(len(self.tokenizer), **labels)
        else:
            path = resolve_model_path(config.model)
            self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
            self.model = AutoModelForTokenClassification.from_pretrained(
                path,
                id2label=dict(enumerate(WIKIANN_LABELS)),
                label2id={name: i for i, name in enumerate(WIKIANN_LABELS)},
                **labels,
            )
        self.model.eval()

    def build(
        self, setting: Setting, seed: int, state: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[Tagger, Groups]:
        """A fresh tagger for ``setting``: copy, adapter (if any), classifier from ``seed``, then ``state``.

        Args:
            setting: decides whether the top adapter is added.
            seed: initialises the adapter and classifier.
            state: parameters to load on top (a primed model's trained tensors), by name.
        """
        from metakit.peft import add_top_adapter, head_spec

        model = copy.deepcopy(self.model)
        torch.manual_seed(seed)
        head = head_spec(model)
        _reset_head(model)
        adapter = add_top_adapter(model, bottleneck=self.config.bottleneck) if setting.has_adapter else None
        frozen = WORD_EMBEDDINGS if self.config.freeze_word_embeddings else nothing()
        backbone = everything() - head - (adapter or nothing()) - frozen
        if state is not None:
            _load_partial(model, state)
        frozen_names = set(frozen.names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name not in frozen_names)
        return Tagger(model, adapter), Groups(backbone=backbone, adapter=adapter, head=head, frozen=frozen)


def _reset_head(model: nn.Module) -> None:
    std = getattr(model.config, "initializer_range", 0.02)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, std)
        model.classifier.bias.zero_()


def _load_partial(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise KeyError(f"Saved state names parameters the model lacks: {unknown[:5]}.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def trainable_state(model: nn.Module, spec: Spec) -> dict[str, torch.Tensor]:
    """Detached copies of the parameters ``spec`` selects (what a checkpoint or primed model keeps)."""
    names = set(spec.names(model))
    return {name: p.detach().clone() for name, p in model.named_parameters() if name in names}


def fraction(model: nn.Module, spec: Spec) -> float:
    """Share of the model's parameter elements that ``spec`` selects (among requires_grad ones)."""
    total = sum(p.numel() for p in model.parameters())
    names = set(spec.names(model))
    chosen = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n in names)
    return chosen / total
