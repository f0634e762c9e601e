"""Meta-training on the GLUE-style pool: Meta-Adapters (settings d, f2, g1, g2) and priming (setting e).

Every episode is an N-way k-shot task from one pool dataset, its head started from the support set's
prototypes (`metakit.prototype`). Meta-Adapters use `metakit.recipes.meta_adapters` (inner:
PE modules + head; outer: PE modules; backbone frozen), TARP (g1: inner = task factors + head; outer
= task factors' start + shared factors + generator) and TARP+TAMS (g2, `metakit.recipes.tams`:
inner = candidates' task parameters + head; outer = those + TARP's shared parts + architecture
weights), all with the same budget; priming uses `metakit.recipes.priming`
(inner: PE modules + head; outer: backbone + PE modules; first order, Algorithm 1). The head's offset is
reset to zero after every meta-step: tasks have different label sets, so no head value carries over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torchopt
from datasets import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from metakit import recipes
from metakit.experiments.data.episodes import FewShotSampler
from metakit.experiments.fewshot.config import FewShotConfig
from metakit.experiments.fewshot.data import episode_batch
from metakit.experiments.fewshot.model import FewShotGroups
from metakit.experiments.fewshot.settings import FewShotSetting
from metakit.functional import bind
from metakit.inner import InnerLoop
from metakit.learner import MetaLearner
from metakit.prototype import PrototypeClassifier, prototype_loss
from metakit.strategies import FirstOrder, SecondOrder
from metakit.task import Task

__all__ = ["meta_train", "pool_dev_loss", "pool_task"]

#: The dev episodes' sampler seed, fixed whatever the run's seed so every setting is scored on the same ones.
DEV_EPISODE_SEED = 1


def pool_task(
    tokenizer: PreTrainedTokenizerBase,
    episode,
    max_length: int,
    prefix: str = "",
    device: str | torch.device = "cpu",
) -> Task:
    """A `Task` of an `Episode`, prototype head and loss."""
    support = episode_batch(tokenizer, episode.support, max_length, prefix)
    support.n_classes = episode.n_way
    query = episode_batch(tokenizer, episode.query, max_length, prefix, support=support)
    for batch in (support, query):
        batch.inputs = {key: value.to(device) for key, value in batch.inputs.items()}
        batch.labels = batch.labels.to(device)
    return Task(support, query, prototype_loss)


def pool_dev_loss(learner: MetaLearner, tasks: list[Task]) -> float:
    """Mean query loss over ``tasks`` after the learner's inner loop, in eval mode (no dropout)."""
    model = learner.model
    was_training = model.training
    model.eval()
    try:
        losses = []
        for task in tasks:
            task.support.prototypes = None  # cached from the encoder as it was at the last evaluation
            adapted = learner.adapt(task)
            with torch.no_grad():
                losses.append(float(task.loss_fn(bind(model, adapted), task.query)))
    finally:
        model.train(was_training)
    return sum(losses) / len(losses)


def meta_train(
    config: FewShotConfig,
    setting: FewShotSetting,
    model: PrototypeClassifier,
    groups: FewShotGroups,
    tokenizer: PreTrainedTokenizerBase,
    pool: Mapping[str, Dataset],
    *,
    dev_pool: Mapping[str, Dataset] | None = None,
    writer: SummaryWriter | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, object]:
    """Meta-train ``model`` (already on ``device``) in place for ``setting`` on ``pool``; returns a log.

    The query losses of meta-training's own episodes swing with the task drawn (a 2-way and a 6-way
    task differ by ln 3 at chance), so progress is also measured on ``config.meta_dev_episodes`` fixed
    episodes of ``dev_pool`` (the pool's dev splits): their mean query loss after the inner loop,
    before and after meta-training.

    Returns:
        ``{"steps", "query_loss" (per step), "inner_loss_first", "inner_loss_last" (mean over tasks),
        "dev_query_loss_before", "dev_query_loss_after"}`` (the dev keys only with ``dev_pool``).
    """
    if setting.meta is None or groups.pe is None:
        raise ValueError(f"Setting {setting.key!r} has no meta-training.")
    c = config
    torch.manual_seed(c.seed)
    inner_opt = torchopt.sgd(lr=c.inner_lr)
    if setting.meta == "meta_adapters":
        strategy = SecondOrder() if c.meta_strategy == "second" else FirstOrder()
        if setting.pe == "tams":
            learner = recipes.tams(
                model, prototype_loss, controller=groups.controller, head=groups.head, steps=c.inner_steps,
                strategy=strategy, optimizer=inner_opt,
            )  # fmt: skip
        elif setting.pe == "tarp":
            # As the paper assigns them: task factors adapt in the inner loop (and their start is
            # meta-learned, as Meta-Adapters' adapters are); shared factors and generator are outer only.
            learner = MetaLearner(
                model, prototype_loss, inner=InnerLoop(groups.pe | groups.head, inner_opt, c.inner_steps),
                outer_params=groups.pe_outer | groups.pe, strategy=strategy, inner_only="keep",
            )  # fmt: skip
        else:
            learner = recipes.meta_adapters(
                model, prototype_loss, adapters=groups.pe, head=groups.head, steps=c.inner_steps,
                strategy=strategy, optimizer=inner_opt,
            )  # fmt: skip
        outer = learner.outer_parameters()
        arch = {id(p) for n, p in model.named_parameters() if n.endswith(".tams_alpha")}
        param_groups = [{"params": [p for p in outer if id(p) not in arch], "lr": c.outer_lr}]
        if arch:
            param_groups.append(
                {"params": [p for p in outer if id(p) in arch], "lr": c.arch_lr or c.outer_lr}
            )
        optimizer = torch.optim.AdamW(param_groups)
    else:
        learner = recipes.priming(
            model, prototype_loss, pe=groups.pe, head=groups.head, backbone=groups.backbone,
            steps=c.inner_steps, strategy=FirstOrder(), optimizer=inner_opt,
        )  # fmt: skip
        pe_names, backbone_names = set(groups.pe.names(model)), set(groups.backbone.names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups_lr = [
            {"params": [p for n, p in named if n in pe_names], "lr": c.outer_lr},
            {"params": [p for n, p in named if n in backbone_names], "lr": c.prime_lr},
        ]
        optimizer = torch.optim.AdamW(groups_lr)
    dev_tasks: list[Task] = []
    if dev_pool is not None and c.meta_dev_episodes > 0:
        dev_sampler = FewShotSampler(dev_pool, c.n_way, c.k_shot, c.q_query, seed=DEV_EPISODE_SEED)
        dev_tasks = [
            pool_task(tokenizer, dev_sampler.sample(), c.max_length, c.text_prefix, device)
            for _ in range(c.meta_dev_episodes)
        ]
    dev_before = pool_dev_loss(learner, dev_tasks) if dev_tasks else None
    sampler = FewShotSampler(pool, c.n_way, c.k_shot, c.q_query, seed=c.seed)
    log: dict[str, list[float]] = {"query_loss": [], "inner_loss_first": [], "inner_loss_last": []}
    model.train()
    for step in tqdm(range(c.meta_steps), desc=f"meta-train {setting.key}", leave=False, unit="step"):
        tasks = [
            pool_task(tokenizer, sampler.sample(), c.max_length, c.text_prefix, device)
            for _ in range(c.meta_batch)
        ]
        result = learner.meta_step(tasks, final_support_loss=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
        log["query_loss"].append(float(result.loss))
        log["inner_loss_first"].append(float(result.inner_losses[:, 0].mean()))
        log["inner_loss_last"].append(float(result.inner_losses[:, -1].mean()))
        if writer is not None:
            writer.add_scalar("meta/query_loss", log["query_loss"][-1], step)
            writer.add_scalar("meta/inner_loss_first", log["inner_loss_first"][-1], step)
            writer.add_scalar("meta/inner_loss_last", log["inner_loss_last"][-1], step)
    model.eval()
    out: dict[str, object] = {"steps": c.meta_steps, **log}
    if dev_tasks:
        out["dev_query_loss_before"] = dev_before
        out["dev_query_loss_after"] = pool_dev_loss(learner, dev_tasks)
        if writer is not None:
            writer.add_scalar("meta/dev_query_loss", out["dev_query_loss_before"], 0)
            writer.add_scalar("meta/dev_query_loss", out["dev_query_loss_after"], c.meta_steps)
    return out
