"""The few-shot experiment's configuration: one flat dataclass, named presets, strict keys.

Config files are read with `metakit.experiments.config.read_config_file` (TOML or YAML, a
``preset`` key names the preset they start from), exactly as for the priming experiment.

Example:
    >>> config = load_fewshot_config("cpu", overrides={"tasks": ["scitail"]})
    >>> config.shots
    [8, 16]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metakit.experiments.config import read_config_file
from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR, GLUE_META_TASKS
from metakit.experiments.data.leopard import (
    DEFAULT_LEOPARD_DIR,
    LEOPARD_EPISODES,
    LEOPARD_SHOTS,
    LEOPARD_TASKS,
)
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS

__all__ = ["FEWSHOT_PRESETS", "FEWSHOT_SELECTION_KEYS", "FewShotConfig", "load_fewshot_config"]

#: Keys that choose *which* units run; every other key changes results and must match on resume.
FEWSHOT_SELECTION_KEYS = ("settings", "tasks", "shots", "episodes")


@dataclass
class FewShotConfig:
    """Every knob of the few-shot experiment.

    Model and data:
        model: ``"e5"`` (offline multilingual-e5-small), ``"tiny"`` (a random 2-layer BERT built from a
            config, tokenizer from the data; tests) or a hub name / local path of an encoder.
        leopard_dir, pool_dir: the LEOPARD and GLUE-meta folders.
        own_tasks: your own pool and targets instead of LEOPARD's and the GLUE-style pool: the content of
            a task file (`metakit.experiments.fewshot.task_config`, ``--task-config``), recorded whole so
            that a resume with other tasks is refused. ``None``: LEOPARD.
        tasks, shots, episodes, settings: which units run (targets, k, episode numbers, settings); with
            ``own_tasks`` any k >= 1 and episode >= 0 (episodes are drawn, seeded), else LEOPARD's.
        pool_tasks: the meta-training pool; pool_examples: a seeded per-task subsample of it (``None``: all).
        test_examples: a seeded stratified subsample of each test set (``None``: the full test set).
        max_length: sub-words per example (pairs are truncated longest-first); text_prefix: put before
            the first text (e5 was trained with ``"query: "``).
        head_init: the prototype head's start, ``"euclidean"`` (W = 2P, b = −‖P‖²) or ``"mean"`` (W = P).
        max_classes: rows of the prototype head's offset (the most classes of any episode).
        bottleneck: Houlsby adapter width (also TAMS's adapter candidate); lora_rank, lora_alpha: LoRA on
            the query and value projections; tarp_rank: TARP's rank (on the query and value projections,
            and TAMS's TARP candidate); tams_candidates: TAMS's candidate structures per sublayer
            (attention-output and feed-forward-output projections).
        freeze_word_embeddings: keep the word-embedding matrix fixed everywhere (most of e5's weights).
    Meta-training on the pool (settings d, e, f2), shared by every unit of a setting:
        meta_steps, meta_batch (episodes per step), n_way (``None``: all of a task's classes), k_shot,
        q_query, inner_steps, inner_lr (SGD), outer_lr (AdamW on adapters / LoRA), prime_lr (AdamW on the
        backbone in priming), meta_strategy: ``"second"`` (exact, Meta-Adapters) or ``"first"``;
        priming always uses first order (Algorithm 1); meta_head_init: where meta-training's episodes
        start the head (`PrototypeHead`: ``"euclidean"`` prototypes, ``"mean"``, or ``"zero"``, which
        leaves the inner loop the whole head to learn; fine-tuning always starts from the prototypes);
        meta_dev_episodes: fixed episodes of the pool's dev
        splits whose query loss after the inner loop is measured before and after meta-training (0: none).
        arch_lr: the AdamW rate of TAMS's architecture weights (``None``: outer_lr), which DARTS-style
        searches give a rate of their own.
    Fine-tuning on an episode's support set:
        ft_steps (AdamW steps, linear decay), ft_batch_size, ft_lr_full, ft_lr_head, ft_lr_pe; chosen on
        the pool's dev sets by `metakit.experiments.fewshot.hparams.choose_finetune_lrs` from
        hp_grid (candidate learning rates per kind of tuning), on hp_tasks (``None``: every pool task),
        hp_episodes simulated hp_k-shot episodes per task, hp_dev_examples dev examples per task.
    Other: seed (meta-training, initialisation), eval_batch_size, threads (0: torch's default).
    """

    model: str = "e5"
    leopard_dir: str = DEFAULT_LEOPARD_DIR
    pool_dir: str = DEFAULT_GLUE_META_DIR
    own_tasks: dict[str, Any] | None = None
    tasks: list[str] = field(default_factory=lambda: list(LEOPARD_TASKS))
    shots: list[int] = field(default_factory=lambda: list(LEOPARD_SHOTS))
    episodes: list[int] = field(default_factory=lambda: list(range(LEOPARD_EPISODES)))
    settings: list[str] = field(default_factory=lambda: list(FEWSHOT_SETTINGS))
    pool_tasks: list[str] = field(default_factory=lambda: list(GLUE_META_TASKS))
    pool_examples: int | None = None
    test_examples: int | None = None
    max_length: int = 128
    text_prefix: str = "query: "
    head_init: str = "euclidean"
    max_classes: int = 16
    bottleneck: int = 64
    lora_rank: int = 8
    lora_alpha: float = 16.0
    tarp_rank: int = 4
    tams_candidates: list[str] = field(default_factory=lambda: ["frozen", "tarp", "adapter"])
    freeze_word_embeddings: bool = True
    meta_steps: int = 1000
    meta_batch: int = 4
    n_way: int | None = None
    k_shot: int = 8
    q_query: int = 8
    inner_steps: int = 5
    inner_lr: float = 1e-2
    outer_lr: float = 1e-4
    prime_lr: float = 2e-5
    meta_strategy: str = "second"
    meta_head_init: str = "euclidean"
    meta_dev_episodes: int = 8
    arch_lr: float | None = None
    ft_steps: int = 50
    ft_batch_size: int = 16
    ft_lr_full: float = 2e-5
    ft_lr_head: float = 1e-3
    ft_lr_pe: float = 1e-3
    hp_grid: dict[str, list[float]] = field(
        default_factory=lambda: {
            "full": [1e-5, 3e-5, 1e-4],
            "head": [3e-4, 1e-3, 3e-3],
            "pe": [3e-4, 1e-3, 3e-3],
        }
    )
    hp_tasks: list[str] | None = None
    hp_episodes: int = 2
    hp_k: int = 8
    hp_dev_examples: int = 200
    seed: int = 0
    eval_batch_size: int = 64
    threads: int = 0

    def __post_init__(self) -> None:
        _check_names("settings", self.settings, FEWSHOT_SETTINGS)
        if self.own_tasks is not None:
            self._check_own_tasks()
        else:
            self._check_leopard_tasks()
        _check_names("hp_tasks", self.hp_tasks or [], {t: 1 for t in self.pool_tasks})
        if self.arch_lr is not None and self.arch_lr <= 0:
            raise ValueError(f"arch_lr must be > 0 or None (outer_lr), got {self.arch_lr}.")
        if self.meta_dev_episodes < 0:
            raise ValueError(
                f"meta_dev_episodes must be >= 0 (0: no dev episodes), got {self.meta_dev_episodes}."
            )
        if self.head_init not in ("euclidean", "mean"):
            raise ValueError(f"head_init must be 'euclidean' or 'mean', got {self.head_init!r}.")
        if self.meta_head_init not in ("euclidean", "mean", "zero"):
            raise ValueError(
                f"meta_head_init must be 'euclidean', 'mean' or 'zero', got {self.meta_head_init!r}."
            )
        if self.meta_strategy not in ("second", "first"):
            raise ValueError(f"meta_strategy must be 'second' or 'first', got {self.meta_strategy!r}.")
        for name in (
            "max_length",
            "max_classes",
            "meta_batch",
            "k_shot",
            "inner_steps",
            "ft_steps",
            "ft_batch_size",
            "tarp_rank",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.n_way is not None and not 2 <= self.n_way <= self.max_classes:
            raise ValueError(f"n_way must be None or in 2..max_classes={self.max_classes}, got {self.n_way}.")
        if not (self.settings and self.tasks and self.shots and self.episodes):
            raise ValueError("settings, tasks, shots and episodes must each name at least one value.")
        from metakit.peft.tams import CANDIDATES

        unknown = [name for name in self.tams_candidates if name not in CANDIDATES]
        if not self.tams_candidates or unknown:
            raise ValueError(
                f"tams_candidates must name at least one of {sorted(CANDIDATES)}, got {self.tams_candidates}."
            )
        missing = sorted({"full", "head", "pe"} - set(self.hp_grid))
        if missing:
            raise ValueError(f"hp_grid lacks candidate learning rates for {missing}.")

    def _check_leopard_tasks(self) -> None:
        _check_names("tasks", self.tasks, LEOPARD_TASKS)
        _check_names("pool_tasks", self.pool_tasks, GLUE_META_TASKS)
        bad_k = [k for k in self.shots if k not in LEOPARD_SHOTS]
        if bad_k:
            raise ValueError(
                f"shots {bad_k} are not LEOPARD's; its episodes have k in {list(LEOPARD_SHOTS)}."
            )
        bad_e = [e for e in self.episodes if not 0 <= e < LEOPARD_EPISODES]
        if bad_e:
            raise ValueError(
                f"episodes {bad_e} do not exist; LEOPARD has episodes 0..{LEOPARD_EPISODES - 1}."
            )

    def _check_own_tasks(self) -> None:
        from metakit.experiments.fewshot.task_config import TaskConfig

        names = TaskConfig.from_dict(self.own_tasks).names
        for key, section in (("tasks", "targets"), ("pool_tasks", "pool")):
            bad = [v for v in getattr(self, key) if v not in names[section]]
            if bad:
                raise ValueError(f"{key} {bad} are not among the task config's {section} {names[section]}.")
        bad_k = [k for k in self.shots if not isinstance(k, int) or k < 1]
        bad_e = [e for e in self.episodes if not isinstance(e, int) or e < 0]
        if bad_k or bad_e:
            raise ValueError(f"shots must be >= 1 and episodes >= 0, got shots {bad_k} and episodes {bad_e}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every key."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of every key that changes results (not the selection of settings, tasks, shots, episodes)."""
        keys = {k: v for k, v in self.to_dict().items() if k not in FEWSHOT_SELECTION_KEYS}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _check_names(key: str, values: list[str], known: dict) -> None:
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"Unknown {key} {bad}; known: {sorted(known)}.")


FEWSHOT_PRESETS: dict[str, dict[str, Any]] = {
    # A GPU: every task, k and episode, full test sets, long meta-training, exact meta-gradients.
    "paper": {
        "model": "e5",
        "max_length": 128,
        "meta_steps": 1000,
        "meta_batch": 4,
        "meta_strategy": "second",
        "ft_steps": 50,
    },
    # Every setting, k = 8 and 16, episodes 0 and 1, 100 test examples per task (seeded, stratified), max
    # length 48, 8 fine-tuning steps, 30 first-order meta-steps. Measured per unit on 1 thread:
    # adapters/LoRA/full ~12-15 s, head ~1.4 s, TARP ~20 s; a meta-step ~6.5 s. One thread per process, so
    # a 2-core machine runs two halves side by side (~75 min each) and `metakit fewshot merge` joins them:
    #   metakit fewshot run --preset cpu --settings full,head,adapters,meta_adapters,lora,meta_lora --out A
    #   metakit fewshot run --preset cpu --settings priming,meta_tarp,meta_tams --out B
    #   metakit fewshot merge A B --out DIR
    "cpu": {
        "model": "e5",
        "shots": [8, 16],
        "episodes": [0, 1],
        "test_examples": 100,
        "max_length": 48,
        "pool_examples": 2000,
        "meta_steps": 30,
        "meta_batch": 2,
        "n_way": None,
        "k_shot": 4,
        "q_query": 4,
        "inner_steps": 2,
        "meta_strategy": "first",
        # Chosen on the pool's dev sets (16 fixed dev episodes, query loss after the inner loop, 30
        # Meta-Adapters meta-steps): outer_lr 1e-4 / 1e-3 / 3e-3 took it from 0.750 to 0.747 / 0.731 / 0.826.
        # The inner rate barely matters at the start: 0 / 1e-3 / 1e-2 / 1e-1 / 1 give 0.7506 / 0.7506 /
        # 0.7505 / 0.7501 / 0.819 (prototypes from the support set already fit it), so it stays 1e-2.
        "outer_lr": 1e-3,
        "ft_steps": 8,
        "ft_batch_size": 16,
        # Chosen by choose_finetune_lrs on this preset (pool dev sets of MNLI, SST-2, subj, trec; one
        # 8-shot episode each; 100 dev examples): mean dev accuracy full 3e-5/1e-4/3e-4 = .648/.670/.645,
        # head 1e-3/1e-2/3e-2 = .653/.623/.563, pe 1e-3/3e-3/1e-2 = .655/.650/.543 (340 s of CPU).
        "ft_lr_full": 1e-4,
        "ft_lr_head": 1e-3,
        "ft_lr_pe": 1e-3,
        # 8 steps: wider rates than the paper preset's grid.
        "hp_grid": {"full": [3e-5, 1e-4, 3e-4], "head": [1e-3, 1e-2, 3e-2], "pe": [1e-3, 3e-3, 1e-2]},
        "hp_tasks": ["MNLI", "SST-2", "subj", "trec"],
        "hp_episodes": 1,
        "hp_dev_examples": 100,
        "threads": 1,
    },
    # A few minutes: three tasks, k = 8, one episode.
    "cpu-quick": {
        "model": "e5",
        "tasks": ["scitail", "sentiment_books", "airline"],
        "shots": [8],
        "episodes": [0],
        "test_examples": 100,
        "max_length": 48,
        "pool_examples": 500,
        "meta_steps": 5,
        "meta_batch": 2,
        "k_shot": 4,
        "q_query": 4,
        "inner_steps": 2,
        "meta_strategy": "first",
        "ft_steps": 8,
        "ft_batch_size": 32,
        "ft_lr_full": 1e-4,  # the cpu preset's choice
        "ft_lr_head": 1e-3,
        "ft_lr_pe": 1e-3,
        "threads": 1,
    },
    # Seconds: a random tiny BERT; checks the plumbing, not the science.
    "tiny": {
        "model": "tiny",
        "tasks": ["scitail", "political_message"],
        "shots": [4],
        "episodes": [0],
        "test_examples": 24,
        "max_length": 32,
        "text_prefix": "",
        "pool_tasks": ["MNLI", "trec", "SST-2"],
        "pool_examples": 60,
        "bottleneck": 8,
        "lora_rank": 2,
        "tarp_rank": 2,
        "meta_steps": 2,
        "meta_batch": 2,
        "meta_dev_episodes": 2,
        "n_way": 2,
        "k_shot": 2,
        "q_query": 2,
        "inner_steps": 2,
        "ft_steps": 3,
        "ft_batch_size": 8,
        "eval_batch_size": 16,
        "threads": 1,
    },
}


def load_fewshot_config(
    preset: str | None = None,
    config_file: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    task_config: str | os.PathLike | None = None,
) -> FewShotConfig:
    """Build a config from a preset, then a file's keys, then ``overrides`` (flags); unknown keys raise.

    Args:
        task_config: a task file (TOML or YAML) of your own ``pool`` and ``targets``
            (`metakit.experiments.fewshot.task_config`); a config file may name one too, as
            ``task_config = "tasks.toml"`` (relative to the config file). Its content becomes
            ``own_tasks``; ``tasks`` and ``pool_tasks`` default to all its targets and pool tasks and
            ``hp_tasks`` to every pool task, unless the file or ``overrides`` set them.
    """
    file_keys = read_config_file(config_file) if config_file else {}
    preset = preset or file_keys.pop("preset", None) or "cpu"
    file_keys.pop("preset", None)
    named = file_keys.pop("task_config", None)
    if task_config is None and named is not None:
        task_config = Path(config_file).resolve().parent / named
    if preset not in FEWSHOT_PRESETS:
        raise ValueError(f"Unknown few-shot preset {preset!r}; presets: {sorted(FEWSHOT_PRESETS)}.")
    known = {f.name for f in dataclasses.fields(FewShotConfig)}
    for keys, where in (
        (file_keys, f"config file {config_file}"),
        (overrides or {}, "the command-line overrides"),
    ):
        unknown = sorted(set(keys) - known)
        if unknown:
            raise ValueError(f"Unknown config keys {unknown} in {where}; known keys: {sorted(known)}.")
    explicit = {**file_keys, **(overrides or {})}
    keys = {**FEWSHOT_PRESETS[preset], **explicit}
    if task_config is not None:
        from metakit.experiments.fewshot.task_config import read_task_config

        tasks = read_task_config(task_config)
        keys["own_tasks"] = tasks.to_dict()
        defaults = {"tasks": tasks.names["targets"], "pool_tasks": tasks.names["pool"], "hp_tasks": None}
        keys.update({key: value for key, value in defaults.items() if key not in explicit})
    return FewShotConfig(**keys)
