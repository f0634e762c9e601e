"""The experiment's configuration: one flat dataclass, named presets, TOML/YAML files, strict keys.

Example:
    >>> config = load_config("cpu", overrides={"seeds": [0]})
    >>> config.targets
    ['hi', 'af', 'az', 'lt', 'et', 'nl']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "PRESET_INFO", "ExperimentConfig", "differing_keys", "load_config", "read_config_file"]

#: The folder of the Rahimi/XTREME WikiAnn files, relative to the repository root.
DEFAULT_DATA_DIR = str((Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "wikiann").resolve())

#: Keys that choose *which* units to run; everything else changes results and must match on resume.
SELECTION_KEYS = ("settings", "targets", "seeds")


@dataclass
class ExperimentConfig:
    """Every knob of the experiment (see the issue for the paper's values, in the ``paper`` preset).

    Model and data:
        model: hub name or local path of a token-classification backbone; ``"e5"`` is the offline
            multilingual-e5-small from `metakit.experiments.pretrained.multilingual_e5_small`; ``"tiny"`` a
            random 2-layer BERT with a tokenizer built from the data (tests, smoke runs).
        data_dir: folder of ``{split}-{lang}.tsv`` files; ``None`` loads ``unimelb-nlp/wikiann`` from the hub.
        sources, targets: priming languages and fine-tuning/test languages.
        settings, seeds: which of the seven settings and which seeds to run.
        source_sentences, target_sentences, test_sentences: seeded sub-samples (``None``: all).
        max_length: sub-words per sentence (longer ones are truncated and counted).
        bottleneck: width of the top adapter.
        freeze_word_embeddings: keep the (large) word-embedding matrix fixed in every setting.
        cache_features: run the encoder once per batch when only the adapter and head change.
    Priming (settings 4–7 meta priming; 5 fine-tuning priming):
        prime_steps: outer steps; support_size, query_size: sentences per task and language;
        inner_lr, inner_steps: the inner SGD; prime_lr: AdamW on the outer params (linear decay);
        prime_batch_size: batch of fine-tuning priming (setting 5), drawn from all sources.
    Fine-tuning on a target:
        ft_epochs, ft_batch_size; ft_lr_full (setting 1), ft_lr_pe (adapter or head tuning);
        ft_epochs_full: epochs of full fine-tuning if it should differ (``None``: ``ft_epochs``).
    Other: eval_batch_size, checkpoint_every (priming steps), threads (torch threads, 0: torch's default).
    """

    model: str = "e5"
    data_dir: str | None = DEFAULT_DATA_DIR
    sources: list[str] = field(default_factory=lambda: ["en", "es"])
    targets: list[str] = field(default_factory=lambda: ["hi", "af", "az", "lt", "et", "nl"])
    settings: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    source_sentences: int | None = None
    target_sentences: int | None = None
    test_sentences: int | None = None
    max_length: int = 128
    bottleneck: int = 64
    freeze_word_embeddings: bool = False
    cache_features: bool = True
    prime_steps: int = 1250
    support_size: int = 8
    query_size: int = 8
    inner_lr: float = 0.03
    inner_steps: int = 5
    prime_lr: float = 5e-5
    prime_batch_size: int = 16
    ft_epochs: float = 3.0
    ft_epochs_full: float | None = None
    ft_batch_size: int = 16
    ft_lr_full: float = 2e-5
    ft_lr_pe: float = 1e-3
    eval_batch_size: int = 64
    checkpoint_every: int = 50
    threads: int = 0

    def __post_init__(self) -> None:
        from metakit.experiments.settings import SETTINGS

        for spec in dataclasses.fields(self):
            _check_type(spec.name, spec.type, getattr(self, spec.name))
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise ValueError(f"Unknown settings {bad}; the experiment has settings {sorted(SETTINGS)}.")
        at_least_one = (
            "prime_steps",
            "support_size",
            "query_size",
            "inner_steps",
            "ft_batch_size",
            "prime_batch_size",
            "eval_batch_size",
            "checkpoint_every",
            "max_length",
            "bottleneck",
            "source_sentences",
            "target_sentences",
            "test_sentences",
        )
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")
        for name in ("ft_epochs", "ft_epochs_full", "prime_lr", "inner_lr", "ft_lr_full", "ft_lr_pe"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value}.")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0 (0: torch's default), got {self.threads}.")
        if not self.targets or not self.seeds or not self.settings or not self.sources:
            raise ValueError("settings, targets, sources and seeds must each name at least one value.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every key."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every key that changes results (not the selection of settings, targets and seeds)."""
        keys = {k: v for k, v in self.to_dict().items() if k not in SELECTION_KEYS}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


_SCALARS = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _check_type(name: str, annotation: str, value: Any) -> None:
    """Raise a ``ValueError`` naming the key unless ``value`` fits ``annotation`` (e.g. ``"list[int]"``)."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in kinds:
        return
    kind = next(k for k in kinds if k != "None")
    example = {"list[str]": '["hi", "af"]', "list[int]": "[0, 1]"}.get(kind)
    if kind.startswith("list["):
        item = _SCALARS[kind[5:-1]]
        ok = isinstance(value, list) and all(
            isinstance(v, item) and not (isinstance(v, bool) and item is int) for v in value
        )
        if not ok:
            raise ValueError(f"{name} must be a list like {name} = {example}, got {value!r}.")
        return
    expected = _SCALARS[kind]
    ok = isinstance(value, expected) and (kind == "bool" or not isinstance(value, bool))
    if not ok:
        article = "an" if kind == "int" else "a"
        word = {"int": "integer", "float": "number", "str": "string", "bool": "true or false"}[kind]
        raise ValueError(f"{name} must be {article} {word}, got {value!r}.")


PRESETS: dict[str, dict[str, Any]] = {
    # The hyper-parameters: mBERT, full data, one pass over each source language in priming.
    "paper": {
        "model": "bert-base-multilingual-cased",
        "cache_features": False,
        "prime_steps": 1250,
        "ft_epochs": 3.0,
    },
    # The offline e5 encoder on 2 CPU cores: sub-sampled data and short schedules.
    "cpu": {
        "model": "e5",
        "source_sentences": 2000,
        "target_sentences": 500,
        "test_sentences": 300,
        "max_length": 64,
        "freeze_word_embeddings": True,
        "prime_steps": 20,
        "prime_lr": 1e-4,
        "prime_batch_size": 16,
        # Adapter and head tuning run on cached encoder features: many epochs cost little.
        "ft_epochs": 20.0,
        "ft_epochs_full": 2.0,
        "ft_batch_size": 16,
        "ft_lr_full": 1e-4,
        "ft_lr_pe": 1e-3,
        "checkpoint_every": 5,
        # One thread: on a shared 2-core machine, two torch threads per process thrash (8x slower seen).
        "threads": 1,
    },
    # A few minutes: the cpu preset on fewer sentences and steps, one seed, two targets.
    "cpu-quick": {
        "model": "e5",
        "targets": ["hi", "af"],
        "seeds": [0],
        "source_sentences": 400,
        "target_sentences": 200,
        "test_sentences": 100,
        "max_length": 48,
        "freeze_word_embeddings": True,
        "prime_steps": 5,
        "prime_lr": 1e-4,
        "ft_epochs": 10.0,
        "ft_epochs_full": 1.0,
        "ft_lr_full": 1e-4,
        "ft_lr_pe": 1e-3,
        "checkpoint_every": 5,
        "threads": 1,
    },
    # Seconds: a random tiny BERT; checks the plumbing, not the science.
    "tiny": {
        "model": "tiny",
        "targets": ["hi", "af"],
        "seeds": [0, 1],
        "source_sentences": 40,
        "target_sentences": 24,
        "test_sentences": 16,
        "max_length": 32,
        "bottleneck": 8,
        "prime_steps": 3,
        "support_size": 4,
        "query_size": 4,
        "prime_batch_size": 8,
        "ft_epochs": 1.0,
        "ft_batch_size": 8,
        "checkpoint_every": 2,
        "eval_batch_size": 16,
        "threads": 1,
    },
}


def _same(key: str, a: Any, b: Any) -> bool:
    if key.endswith("_dir") and a is not None and b is not None:
        # The same folder reached from two checkouts ("main/../shared", "wt/../shared") is the same data.
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def differing_keys(
    saved: dict[str, Any],
    current: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    selection: tuple[str, ...] = SELECTION_KEYS,
) -> list[str]:
    """Keys that change results (not the ``selection``) and differ between a saved config and ``current``.

    A key missing from ``saved`` (a folder written before the key existed) counts as its default
    (``defaults``: the priming experiment's, unless given).
    """
    defaults = ExperimentConfig().to_dict() if defaults is None else defaults
    keys = (set(saved) | set(current)) - set(selection)
    return sorted(
        k for k in keys if not _same(k, saved.get(k, defaults.get(k)), current.get(k, defaults.get(k)))
    )


#: What each preset is for, how big it is and how long it runs: ``metakit ner presets`` prints these.
PRESET_INFO: dict[str, dict[str, str]] = {
    "paper": {
        "purpose": "the paper's hyper-parameters (mBERT from the hub, full data); needs a GPU and the hub",
        "size": "7 settings x 6 targets x 3 seeds, full WikiAnn splits, 1250 priming steps",
        "time": "hours on a GPU; impractical on CPU",
    },
    "cpu": {
        "purpose": "the committed result: offline multilingual-e5-small on CPU, sub-sampled data",
        "size": "7 settings x 6 targets x 3 seeds; 2000 source, 500 train, 300 test sentences; 20 priming steps",
        "time": "about 95 min on 2 shared CPU cores",
    },
    "cpu-quick": {
        "purpose": "a first look with the real encoder: the cpu preset, smaller",
        "size": "7 settings x 2 targets (hi, af) x 1 seed; 400/200/100 sentences; 5 priming steps",
        "time": "a few minutes on 2 CPU cores",
    },
    "tiny": {
        "purpose": "plumbing checks (tests, smoke runs): a random 2-layer BERT, no pretrained weights",
        "size": "7 settings x 2 targets x 2 seeds; 40/24/16 sentences; 3 priming steps",
        "time": "under a minute",
    },
}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Keys of a ``.toml`` or ``.yaml``/``.yml`` file (a ``preset`` key names the preset it starts from)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {str(path)!r} does not exist.")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError as error:
                raise ImportError(
                    "Reading .toml configs on Python 3.10 needs `pip install tomli`."
                ) from error

        with open(path, "rb") as handle:
            try:
                data = tomllib.load(handle)
            except tomllib.TOMLDecodeError as error:
                raise ValueError(f"Config file {str(path)!r} is not valid TOML: {error}.") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        with open(path, encoding="utf-8") as handle:
            try:
                data = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                reason = " ".join(str(error).split())
                raise ValueError(f"Config file {str(path)!r} is not valid YAML: {reason}.") from None
    else:
        raise ValueError(f"Config file {str(path)!r} must end in .toml, .yaml or .yml.")
    if not isinstance(data, dict):
        raise ValueError(f"Config file {str(path)!r} must hold a table of keys, got {type(data).__name__}.")
    return data


def _check_keys(keys: dict[str, Any], where: str) -> None:
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(keys) - known)
    if unknown:
        raise ValueError(f"Unknown config keys {unknown} in {where}; known keys: {sorted(known)}.")


def load_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Build a config from a preset, then a file's keys, then ``overrides`` (flags); unknown keys raise."""
    file_keys = read_config_file(config_file) if config_file else {}
    preset = preset or file_keys.pop("preset", None) or "cpu"
    file_keys.pop("preset", None)
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}; presets: {sorted(PRESETS)}.")
    _check_keys(file_keys, f"config file {config_file}")
    _check_keys(overrides or {}, "the command-line overrides")
    return ExperimentConfig(**{**PRESETS[preset], **file_keys, **(overrides or {})})
