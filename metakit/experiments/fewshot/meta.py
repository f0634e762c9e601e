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

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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
from metakit.experiments.model import trainable_state
from metakit.functional import bind
from metakit.inner import InnerLoop
from metakit.learner import MetaLearner
from metakit.prototype import PrototypeClassifier, prototype_loss
from metakit.strategies import FirstOrder, SecondOrder
from metakit.task import Task

__all__ = ["MetaTraining", "meta_train", "pool_dev_loss", "pool_dev_losses", "pool_task"]

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
    return pool_dev_losses(learner, tasks)[1]


def pool_dev_losses(learner: MetaLearner, tasks: list[Task]) -> tuple[float, float]:
    """Mean query loss over ``tasks`` before and after the learner's inner loop, in eval mode (no dropout).

    Their difference is what the inner loop itself buys: the query loss of the head's start (and the
    meta-learned weights) against that of the adapted weights.
    """
    model = learner.model
    was_training = model.training
    model.eval()
    try:
        before, after = [], []
        for task in tasks:
            with torch.no_grad():
                task.support.prototypes = None  # cached from the encoder as it was at the last evaluation
                before.append(float(task.loss_fn(model, task.query)))
            task.support.prototypes = None
            adapted = learner.adapt(task)
            with torch.no_grad():
                after.append(float(task.loss_fn(bind(model, adapted), task.query)))
    finally:
        model.train(was_training)
    return sum(before) / len(before), sum(after) / len(after)


class MetaTraining:
    """Meta-training of ``model`` (already on ``device``) for ``setting`` on ``pool``, one meta-step at a time.

    The AdamW rates are constant, so the first ``n`` steps of a longer run are exactly a run of ``n``
    steps: a budget study trains once to its largest budget and saves the weights at the smaller ones
    (`metakit.experiments.fewshot.budget`). Evaluating the dev episodes between steps changes nothing
    (eval mode, no randomness drawn). `state_dict` / `load_state_dict` hold everything the next step
    depends on (weights, optimizer, episode sampler, torch's RNG), so a run resumed from one continues
    exactly as an uninterrupted one would.

    Args:
        dev_pool: the pool's dev splits; ``config.meta_dev_episodes`` fixed episodes of it measure
            progress (`dev_losses`).
    """

    def __init__(
        self,
        config: FewShotConfig,
        setting: FewShotSetting,
        model: PrototypeClassifier,
        groups: FewShotGroups,
        tokenizer: PreTrainedTokenizerBase,
        pool: Mapping[str, Dataset],
        *,
        dev_pool: Mapping[str, Dataset] | None = None,
        device: str | torch.device = "cpu",
    ):
        if setting.meta is None or groups.pe is None:
            raise ValueError(f"Setting {setting.key!r} has no meta-training.")
        c = self.config = config
        self.setting, self.model, self.groups, self.tokenizer, self.device = (
            setting, model, groups, tokenizer, device,
        )  # fmt: skip
        torch.manual_seed(c.seed)
        self.learner, self.optimizer = _learner_and_optimizer(c, setting, model, groups)
        self.dev_tasks: list[Task] = []
        if dev_pool is not None and c.meta_dev_episodes > 0:
            dev_sampler = FewShotSampler(dev_pool, c.n_way, c.k_shot, c.q_query, seed=DEV_EPISODE_SEED)
            self.dev_tasks = [
                pool_task(tokenizer, dev_sampler.sample(), c.max_length, c.text_prefix, device)
                for _ in range(c.meta_dev_episodes)
            ]
        self.sampler = FewShotSampler(pool, c.n_way, c.k_shot, c.q_query, seed=c.seed)
        self.steps_done = 0
        self.log: dict[str, list[float]] = {"query_loss": [], "inner_loss_first": [], "inner_loss_last": []}

    def step(self, writer: SummaryWriter | None = None) -> None:
        """One meta-step on ``config.meta_batch`` fresh pool episodes; the head's offset is reset after it."""
        c, model = self.config, self.model
        tasks = [
            pool_task(self.tokenizer, self.sampler.sample(), c.max_length, c.text_prefix, self.device)
            for _ in range(c.meta_batch)
        ]
        model.train()
        with _head_start(model, c.meta_head_init):
            result = self.learner.meta_step(tasks, final_support_loss=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
        model.eval()
        values = {
            "query_loss": float(result.loss),
            "inner_loss_first": float(result.inner_losses[:, 0].mean()),
            "inner_loss_last": float(result.inner_losses[:, -1].mean()),
        }
        for key, value in values.items():
            self.log[key].append(value)
            if writer is not None:
                writer.add_scalar(f"meta/{key}", value, self.steps_done)
        self.steps_done += 1

    def dev_losses(self) -> tuple[float, float] | None:
        """Mean query loss of the fixed dev episodes before and after the inner loop (``None``: no dev pool)."""
        if not self.dev_tasks:
            return None
        with _head_start(self.model, self.config.meta_head_init):
            return pool_dev_losses(self.learner, self.dev_tasks)

    def meta_learned_state(self) -> dict[str, torch.Tensor]:
        """The meta-learned weights (what `FewShotResources.meta_state` saves), on the CPU."""
        trained = (
            self.groups.pe | self.groups.backbone
            if self.setting.meta == "priming"
            else self.groups.meta_learned
        )
        return {
            name: value.detach().cpu().clone() for name, value in trainable_state(self.model, trained).items()
        }

    def state_dict(self) -> dict[str, object]:
        """Everything the next step depends on, to resume exactly."""
        return {
            "steps_done": self.steps_done,
            "weights": {n: p.detach().cpu().clone() for n, p in self.model.named_parameters()},
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.rng.getstate(),
            "torch_rng": torch.get_rng_state(),
            "log": {key: list(values) for key, values in self.log.items()},
        }

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Continue from a `state_dict` of a run with the same config."""
        weights = state["weights"]
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                param.copy_(weights[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.rng.setstate(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        self.steps_done = int(state["steps_done"])
        self.log = {key: list(values) for key, values in state["log"].items()}


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
    training = MetaTraining(config, setting, model, groups, tokenizer, pool, dev_pool=dev_pool, device=device)
    dev_before = training.dev_losses()
    for _ in tqdm(range(config.meta_steps), desc=f"meta-train {setting.key}", leave=False, unit="step"):
        training.step(writer)
    out: dict[str, object] = {"steps": config.meta_steps, **training.log}
    if dev_before is not None:
        out["dev_query_loss_before"] = dev_before[1]
        out["dev_query_loss_after"] = training.dev_losses()[1]
        if writer is not None:
            writer.add_scalar("meta/dev_query_loss", out["dev_query_loss_before"], 0)
            writer.add_scalar("meta/dev_query_loss", out["dev_query_loss_after"], config.meta_steps)
    return out


@contextmanager
def _head_start(model: PrototypeClassifier, init: str) -> Iterator[None]:
    """Meta-train with the head started as ``init`` (``"zero"``: the inner loop learns it from nothing)."""
    saved = model.head.init
    model.head.init = init
    try:
        yield
    finally:
        model.head.init = saved


def _learner_and_optimizer(
    c: FewShotConfig, setting: FewShotSetting, model: PrototypeClassifier, groups: FewShotGroups
) -> tuple[MetaLearner, torch.optim.Optimizer]:
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
    return learner, optimizer
