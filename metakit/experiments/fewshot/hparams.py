"""Fine-tuning learning rates chosen once, on the meta-training pool's dev sets (never on LEOPARD's tests).

For each kind of tuning (``full`` encoder, ``head`` only, ``pe`` modules) and each candidate rate of
``config.hp_grid``, simulated few-shot episodes are run on pool tasks: a seeded k-shot support set from
the task's *train* split (all its classes), fine-tuned with the unit's own procedure
(`evaluate_episode`, from the untouched encoder; ``pe`` uses
Houlsby adapters from scratch), and scored on a stratified subsample of the task's *dev* split. The rate
with the best mean accuracy over tasks × episodes wins (ties: the smaller rate).

Example:
    >>> chosen = choose_finetune_lrs(config, FewShotResources(config))  # doctest: +SKIP
    >>> config = dataclasses.replace(config, **chosen["lrs"])  # doctest: +SKIP
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from metakit.experiments.data.episodes import FewShotSampler
from metakit.experiments.fewshot.config import FewShotConfig
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.fewshot.unit import FewShotResources, evaluate_episode, score

__all__ = ["choose_finetune_lrs"]

#: The setting whose fine-tuning stands for each kind of tuning.
_KIND_SETTING = {"full": "full", "head": "head", "pe": "adapters"}


def choose_finetune_lrs(
    config: FewShotConfig,
    resources: FewShotResources,
    *,
    kinds: Sequence[str] = ("full", "head", "pe"),
    tasks: Sequence[str] | None = None,
    k: int | None = None,
    episodes: int | None = None,
    dev_examples: int | None = None,
) -> dict[str, Any]:
    """Pick ``ft_lr_full``, ``ft_lr_head``, ``ft_lr_pe`` from ``config.hp_grid`` on the pool's dev sets.

    Args:
        kinds: which rates to choose.
        tasks: pool tasks to simulate episodes on (default: the config's ``hp_tasks``, else ``pool_tasks``).
        k: support examples per class; episodes: simulated episodes per task; dev_examples: per task
            (defaults: the config's ``hp_k``, ``hp_episodes``, ``hp_dev_examples``).

    Returns:
        ``{"lrs": {"ft_lr_full": ..., ...}, "accuracy": {kind: {lr: mean accuracy}}, "protocol": {...}}``.
    """
    tasks = list(tasks or config.hp_tasks or config.pool_tasks)
    k = k if k is not None else config.hp_k
    episodes = episodes if episodes is not None else config.hp_episodes
    dev_examples = dev_examples if dev_examples is not None else config.hp_dev_examples
    unknown = sorted(set(kinds) - set(_KIND_SETTING))
    if unknown:
        raise ValueError(f"Unknown kinds of tuning {unknown}; choose from {sorted(_KIND_SETTING)}.")
    dev = {name: data for name, data in resources.pool_dev(dev_examples).items() if name in tasks}
    without = [task for task in tasks if task not in dev]
    if without:
        raise ValueError(
            f"Choosing fine-tuning rates needs a dev set of every task it simulates episodes on; {without} "
            "name none (dev or dev_split in the task file): add them or pass tasks= with those that do."
        )
    sampler = FewShotSampler(
        {t: resources.pool()[t] for t in tasks}, n_way=None, k_shot=k, q_query=0, seed=config.seed
    )
    simulated = [(task, sampler.sample(task)) for task in tasks for _ in range(episodes)]
    accuracy: dict[str, dict[float, float]] = {}
    lrs: dict[str, float] = {}
    for kind in kinds:
        setting = FEWSHOT_SETTINGS[_KIND_SETTING[kind]]
        accuracy[kind] = {}
        for lr in config.hp_grid[kind]:
            scores = []
            for index, (task, episode) in enumerate(simulated):
                classes = episode.classes
                test = dev[task].filter(lambda row, known=frozenset(classes): row["label"] in known)
                predicted, _, _ = evaluate_episode(
                    config,
                    setting,
                    resources,
                    episode.support,
                    classes,
                    test,
                    lr=lr,
                    seed=config.seed + index,
                )
                scores.append(score(list(test["label"]), predicted, classes)["accuracy"])
            accuracy[kind][lr] = statistics.fmean(scores)
        best = max(accuracy[kind].values())
        lrs[f"ft_lr_{kind}"] = min(lr for lr, value in accuracy[kind].items() if value == best)
    protocol = {"tasks": tasks, "k": k, "episodes": episodes, "dev_examples": dev_examples}
    return {"lrs": lrs, "accuracy": accuracy, "protocol": protocol}
