"""One unit of the few-shot experiment — (setting, task, k, episode) — as a pure function.

`run_unit` fine-tunes a fresh copy of the (meta-trained, if the setting says so) model on the
episode's support set and scores it on the task's test set. `FewShotResources` loads what units
share once: the encoder, the data, the test encodings of the frozen encoder, and each setting's
meta-trained weights (computed on first use, or loaded from / saved to a checkpoint folder).

Example:
    >>> config = load_fewshot_config("tiny")  # doctest: +SKIP
    >>> resources = FewShotResources(config)  # doctest: +SKIP
    >>> result = run_unit(config, "meta_adapters", "scitail", 4, 0, resources=resources)  # doctest: +SKIP
    >>> result["accuracy"], result["macro_f1"]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from sklearn.metrics import accuracy_score, f1_score
from torch.utils.tensorboard import SummaryWriter

from metakit.experiments.data.episodes import label_ids
from metakit.experiments.data.leopard import EmptyEpisodeError, stratified_subsample
from metakit.experiments.fewshot.config import FewShotConfig
from metakit.experiments.fewshot.data import at_max_length, episode_batch, input_batches
from metakit.experiments.fewshot.meta import meta_train
from metakit.experiments.fewshot.model import FewShotBackbone
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS, FewShotSetting
from metakit.experiments.fewshot.sources import FewShotData, fewshot_data
from metakit.experiments.fewshot.tune import encode_all, finetune_episode, predict_labels
from metakit.experiments.model import fraction, trainable_state

__all__ = ["FewShotResources", "evaluate_episode", "fewshot_units", "run_unit", "score"]

logger = logging.getLogger(__name__)

#: Test and pool sub-samples use this seed whatever the run's seed, so every setting sees the same data.
DATA_SEED = 0


def fewshot_units(config: FewShotConfig, resources: FewShotResources | None = None) -> Iterator[tuple]:
    """Every ``(setting, task, k, episode)`` the config selects; empty upstream episodes are skipped,
    logged once and listed in ``resources.skipped``."""
    resources = resources if resources is not None else FewShotResources(config)
    for setting in config.settings:
        for task in config.tasks:
            for k in config.shots:
                for episode in config.episodes:
                    if resources.is_empty(task, k, episode):
                        if (task, k, episode) not in resources.skipped:
                            resources.skipped.append((task, k, episode))
                            logger.warning(
                                "Skipping LEOPARD %s k=%d episode %d: its file is empty upstream.",
                                task,
                                k,
                                episode,
                            )
                        continue
                    yield setting, task, k, episode


def score(gold: list[str], predicted: list[str], classes: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 over ``classes``; gold labels outside them are counted and left out."""
    known = set(classes)
    unseen = Counter(g for g in gold if g not in known)
    kept = [(g, p) for g, p in zip(gold, predicted, strict=True) if g in known]
    if not kept:
        return {
            "accuracy": float("nan"),
            "macro_f1": float("nan"),
            "n_scored": 0,
            "unseen_test_labels": dict(unseen),
        }
    g, p = zip(*kept, strict=True)
    return {
        "accuracy": float(accuracy_score(g, p)),
        "macro_f1": float(f1_score(g, p, labels=classes, average="macro", zero_division=0)),
        "n_scored": len(kept),
        "unseen_test_labels": dict(unseen),
    }


class FewShotResources:
    """What units share, loaded on first use.

    Args:
        config: the experiment config.
        checkpoint_dir: where meta-trained weights are saved (``meta-{setting}.pt``) and found again;
            ``None`` keeps them in memory only.
        log_dir: where meta-training writes its TensorBoard losses (``meta-{setting}``); ``None``: nowhere.
        data: where the tasks come from (default: `fewshot_data` of the config).
    """

    def __init__(
        self,
        config: FewShotConfig,
        checkpoint_dir: str | Path | None = None,
        log_dir: str | Path | None = None,
        data: FewShotData | None = None,
    ):
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # one bar per tiny select()/filter() drowns the experiment's own bars
        self.config = config
        #: Where the tasks come from: LEOPARD and the GLUE-style pool, or a task file's (``own_tasks``).
        self.data: FewShotData = data if data is not None else fewshot_data(config)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self._backbone: FewShotBackbone | None = None
        self._episodes: dict[tuple[str, int, int], Dataset | None] = {}
        self._tests: dict[str, Dataset] = {}
        self._test_features: dict[str, torch.Tensor] = {}
        self._meta: dict[str, dict[str, torch.Tensor]] = {}
        self.meta_logs: dict[str, dict[str, Any]] = {}
        self._pool: dict[str, Dataset] | None = None
        self._truncated: dict[str, int] = {}
        #: ``(task, k, episode)`` of the empty upstream episodes `fewshot_units` skipped.
        self.skipped: list[tuple[str, int, int]] = []

    # -- data --------------------------------------------------------------------------------------
    def episode(self, task: str, k: int, episode: int) -> Dataset:
        """The training episode: LEOPARD's official one (raises `EmptyEpisodeError` for the empty one),
        or a task file's seeded one."""
        key = (task, k, episode)
        if key not in self._episodes:
            try:
                self._episodes[key] = self.data.episode(task, k, episode)
            except EmptyEpisodeError:
                self._episodes[key] = None
                raise
        data = self._episodes[key]
        if data is None:
            self.data.episode(task, k, episode)  # raises with the message
        return data

    def is_empty(self, task: str, k: int, episode: int) -> bool:
        """Whether the episode file holds no example (a unit to skip, saying so)."""
        try:
            self.episode(task, k, episode)
        except EmptyEpisodeError:
            return True
        return False

    def test(self, task: str) -> Dataset:
        """The task's test set (sub-sampled as configured)."""
        if task not in self._tests:
            data, n = self.data.test(task), self.config.test_examples
            self._tests[task] = stratified_subsample(data, n, seed=DATA_SEED) if n is not None else data
        return self._tests[task]

    def pool(self) -> dict[str, Dataset]:
        """The meta-training pool's train splits (sub-sampled as configured)."""
        if self._pool is None:
            c = self.config
            self._pool = {}
            for name in c.pool_tasks:
                data = self.data.pool_split(name, "train")
                if c.pool_examples is not None:
                    data = stratified_subsample(data, c.pool_examples, seed=DATA_SEED)
                self._pool[name] = data
        return self._pool

    def pool_dev(self, max_examples: int | None = None) -> dict[str, Dataset]:
        """The pool's dev splits (for choosing fine-tuning hyper-parameters, and meta-training's dev
        loss); a task file's pool task without ``dev`` or ``dev_split`` is left out."""
        out = {}
        for name in self.config.pool_tasks:
            data = self.data.pool_split(name, "dev")
            if data is not None:
                out[name] = stratified_subsample(data, max_examples, seed=DATA_SEED) if max_examples else data
        return out

    # -- model -------------------------------------------------------------------------------------
    @property
    def backbone(self) -> FewShotBackbone:
        """The encoder and tokenizer (for ``"tiny"``, the vocabulary comes from the selected tasks' texts
        and the pool's, so a tiny unit depends on the selected tasks, k and episodes, not on the settings)."""
        if self._backbone is None:
            texts: list[str] = []
            if self.config.model == "tiny":
                texts = list(self._all_texts())
            self._backbone = FewShotBackbone(self.config, tiny_texts=texts)
        return self._backbone

    def _all_texts(self) -> Iterator[str]:
        c = self.config
        sources = [self.test(task) for task in c.tasks]
        sources += [
            self.episode(t, k, e)
            for t in c.tasks
            for k in c.shots
            for e in c.episodes
            if not self.is_empty(t, k, e)
        ]
        # the pool whatever the settings, so a unit does not depend on which other settings the run selects
        sources += list(self.pool().values())
        for data in sources:
            for a, b in zip(data["text_a"], data["text_b"], strict=True):
                yield a
                if b is not None:
                    yield b

    def test_features(self, task: str) -> torch.Tensor:
        """Encodings of the test set by the untouched encoder (shared by every head-only unit of the task)."""
        if task not in self._test_features:
            model, _ = self.backbone.build(FEWSHOT_SETTINGS["head"], self.config.seed)
            self._test_features[task] = torch.cat(
                [encode_all(model, batch, self.config.eval_batch_size) for batch in self._test_inputs(task)]
            )
        return self._test_features[task]

    def _test_inputs(self, task: str) -> Iterator[dict[str, torch.Tensor]]:
        c = self.config
        return input_batches(
            self.backbone.tokenizer, self.test(task), c.max_length, c.eval_batch_size, c.text_prefix
        )

    def at_max_length(self, task: str) -> int:
        """How many test examples of ``task`` fill ``max_length`` sub-words (probably truncated)."""
        if task not in self._truncated:
            self._truncated[task] = sum(
                at_max_length(b, self.config.max_length) for b in self._test_inputs(task)
            )
        return self._truncated[task]

    def meta_state(
        self, setting: FewShotSetting, device: str | torch.device = "cpu"
    ) -> dict[str, torch.Tensor]:
        """The weights meta-training gives ``setting`` (trained on ``device`` on first use, then cached and
        checkpointed; returned on the CPU)."""
        if setting.key in self._meta:
            return self._meta[setting.key]
        path = self.checkpoint_dir / f"meta-{setting.key}.pt" if self.checkpoint_dir is not None else None
        if path is not None and path.is_file():
            state = torch.load(path, weights_only=True)
        else:
            model, groups = self.backbone.build(setting, self.config.seed)
            model.to(device)
            began = time.perf_counter()
            writer = SummaryWriter(str(self.log_dir / f"meta-{setting.key}")) if self.log_dir else None
            try:
                log = meta_train(
                    self.config, setting, model, groups, self.backbone.tokenizer, self.pool(),
                    dev_pool=(self.pool_dev() or None) if self.config.meta_dev_episodes else None,
                    writer=writer, device=device,
                )  # fmt: skip
            finally:
                if writer is not None:
                    writer.close()
            log["seconds"] = time.perf_counter() - began
            self.meta_logs[setting.key] = log
            trained = groups.pe | groups.backbone if setting.meta == "priming" else groups.meta_learned
            if groups.controller is not None:
                log["structure"] = groups.controller.choice()
            state = {name: value.cpu() for name, value in trainable_state(model, trained).items()}
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
        self._meta[setting.key] = state
        return state


def evaluate_episode(
    config: FewShotConfig,
    setting: FewShotSetting,
    resources: FewShotResources,
    train: Dataset,
    classes: list[str],
    test: Dataset,
    *,
    lr: float,
    seed: int,
    state: dict[str, torch.Tensor] | None = None,
    test_features: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> tuple[list[str], dict[str, float], float]:
    """Build ``setting``'s model (with ``state``), fine-tune it on ``train``, predict ``test``'s labels.

    Args:
        train: the support set (``label`` names among ``classes``).
        classes: the episode's classes; predictions are names from it.
        test_features: the untouched encoder's encodings of ``test`` (head-only tuning skips the encoder).

    Returns:
        Predicted label names (test order), the fine-tuning log, and the share of parameters tuned.
    """
    c = config
    backbone = resources.backbone
    model, groups = backbone.build(setting, c.seed, state)
    if groups.controller is not None:
        # TAMS: fine-tune the structure meta-training chose (argmax of the architecture weights)
        groups.controller.discretize()
        groups.pe = groups.controller.inner
    model.to(device)
    support = episode_batch(backbone.tokenizer, label_ids(train, classes), c.max_length, c.text_prefix)
    support.inputs = {key: value.to(device) for key, value in support.inputs.items()}
    support.labels = support.labels.to(device)
    head_only = setting.tune == "head"
    tuned = groups.tuned(setting)
    log = finetune_episode(
        model, tuned, support, steps=c.ft_steps, batch_size=c.ft_batch_size, lr=lr, seed=seed,
        head_only=head_only, eval_batch_size=c.eval_batch_size,
    )  # fmt: skip
    if head_only and test_features is not None:
        predicted = predict_labels(model, support.prototypes, features=test_features.to(device))
    else:
        inputs = input_batches(backbone.tokenizer, test, c.max_length, c.eval_batch_size, c.text_prefix)
        predicted = predict_labels(
            model, support.prototypes, inputs=[{k: v.to(device) for k, v in b.items()} for b in inputs]
        )
    return [classes[i] for i in predicted], log, fraction(model, tuned)


def run_unit(
    config: FewShotConfig,
    setting: str | FewShotSetting,
    task: str,
    k: int,
    episode: int,
    *,
    resources: FewShotResources | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Fine-tune on one training episode and score on the task's test set.

    Args:
        config: the experiment config (learning rates, steps, data, model).
        setting: a key of `FEWSHOT_SETTINGS` (or the setting itself).
        task, k, episode: the target task (LEOPARD's or a task file's), shots per class, episode number.
        resources: shared, cached data and models (a fresh one when ``None``).
        device: where the episode's model runs (``"cpu"``; a GPU name on a machine that has one).

    Returns:
        A JSON-ready dict: the unit's keys, ``accuracy``, ``macro_f1``, ``n_test``, ``n_scored``,
        ``unseen_test_labels`` (test labels the episode never shows: counted, not scored), ``classes``,
        ``predictions`` and ``gold`` (label names, test order), fine-tuning losses, ``tuned_fraction``,
        ``at_max_length`` (test examples that fill ``max_length``, probably truncated), ``seconds`` (this
        unit) and ``meta_seconds`` (meta-training, if this unit was the first of its setting to need it).
    """
    spec = FEWSHOT_SETTINGS.get(setting) if isinstance(setting, str) else setting
    if spec is None:
        raise ValueError(f"Unknown few-shot setting {setting!r}; settings: {sorted(FEWSHOT_SETTINGS)}.")
    resources = resources if resources is not None else FewShotResources(config)
    c = config
    if c.threads:
        torch.set_num_threads(c.threads)
    began = time.perf_counter()
    train = resources.episode(task, k, episode)
    classes = sorted(set(train["label"]))
    if len(classes) > c.max_classes:
        raise ValueError(
            f"{task} has {len(classes)} classes, more than max_classes={c.max_classes}; raise max_classes."
        )
    state = resources.meta_state(spec, device) if spec.meta is not None else None
    meta_seconds = time.perf_counter() - began
    lr = {"full": c.ft_lr_full, "head": c.ft_lr_head, "pe": c.ft_lr_pe}[spec.tune]
    test = resources.test(task)
    outcome = evaluate_episode(
        c, spec, resources, train, classes, test, lr=lr, seed=c.seed + episode, state=state,
        test_features=resources.test_features(task) if spec.tune == "head" else None, device=device,
    )  # fmt: skip
    predicted_names, log, tuned_fraction = outcome
    gold = list(test["label"])
    return {
        "setting": spec.key,
        "task": task,
        "k": k,
        "episode": episode,
        **score(gold, predicted_names, classes),
        "n_test": len(gold),
        "classes": classes,
        "lr": lr,
        **{f"ft_{key}": value for key, value in log.items()},
        "tuned_fraction": tuned_fraction,
        "at_max_length": resources.at_max_length(task),
        "meta_seconds": meta_seconds,
        "seconds": time.perf_counter() - began - meta_seconds,
        "predictions": predicted_names,
        "gold": gold,
    }
