"""Priming on the source languages (settings 4–7), with checkpoints that a resumed run continues from.

Meta priming is :func:`metakit.recipes.priming` (Algorithm 1), or :func:`~metakit.recipes.maml_loop_priming`
for setting 6; fine-tuning priming (setting 5) trains θp ∪ θa ∪ θh on the same source sentences. With a
first-order strategy and only the adapter and head in the inner loop, each support batch goes through
the encoder once (:meth:`Tagger.cached`): its features are constants for the inner steps, and the
first-order meta-gradient only needs the query pass, so this is exact.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from metakit import recipes
from metakit.experiments.config import ExperimentConfig
from metakit.experiments.model import Groups, trainable_state
from metakit.experiments.settings import Setting
from metakit.experiments.tagger import Tagger, token_loss
from metakit.logging import TensorBoardLogger
from metakit.strategies import FirstOrder
from metakit.task import Task
from metakit.tasks.ner import EpisodeSampler, batches, make_collator, model_inputs

__all__ = ["prime"]


def _save(path: Path, payload: dict) -> None:
    """Write atomically, so an interrupted save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _restore(tagger: Tagger, state: Mapping[str, torch.Tensor]) -> None:
    params = dict(tagger.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def prime(
    tagger: Tagger,
    groups: Groups,
    setting: Setting,
    config: ExperimentConfig,
    sources: Mapping[str, Dataset],
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    checkpoint_dir: Path,
    log_dir: Path,
) -> dict[str, float]:
    """Prime ``tagger`` in place; returns ``{"steps", "seconds", "resumed_from", "final_loss"}``.

    ``checkpoint_dir/last.pt`` holds the trained tensors, optimizer, schedule and sampler state every
    ``config.checkpoint_every`` steps; an existing one is continued from.
    """
    trained = groups.backbone | groups.adapter | groups.head
    last = checkpoint_dir / "last.pt"
    checkpoint = torch.load(last, weights_only=False) if last.is_file() else None
    if checkpoint is not None:
        _restore(tagger, checkpoint["params"])
    tagger.train()
    if setting.priming == "finetune":
        loop = _FinetunePriming(tagger, groups, config, sources, tokenizer, seed)
    else:
        loop = _MetaPriming(tagger, groups, setting, config, sources, tokenizer, seed, log_dir)
    names = set(trained.names(tagger))
    params = [p for n, p in tagger.named_parameters() if n in names and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.prime_lr)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, loop.total)
    start = 0
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        loop.load_state_dict(checkpoint["loop"])
        start = checkpoint["step"]
    began, loss = time.perf_counter(), float("nan")
    desc = f"priming s{setting.number} seed {seed}"
    with tqdm(total=loop.total, initial=start, desc=desc, leave=False, unit="step") as bar:
        for step in range(start, loop.total):
            loss = loop.step(step)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            done = step + 1
            if done % config.checkpoint_every == 0 or done == loop.total:
                payload = {
                    "step": done,
                    "params": trainable_state(tagger, trained),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "loop": loop.state_dict(),
                }
                _save(last, payload)
    loop.close()
    tagger.eval()
    return {
        "steps": loop.total,
        "seconds": time.perf_counter() - began,
        "resumed_from": start,
        "final_loss": loss,
    }


class _MetaPriming:
    """One outer step = one meta-batch of a task per source language (settings 4, 6, 7)."""

    def __init__(self, tagger, groups, setting, config, sources, tokenizer, seed, log_dir):
        steps = setting.inner_steps or config.inner_steps
        recipe = recipes.maml_loop_priming if setting.priming == "maml_loop" else recipes.priming
        self.logger = TensorBoardLogger(
            log_dir, hparams={"setting": setting.number, "seed": seed, "inner_steps": steps}
        )
        self.learner = recipe(
            tagger,
            token_loss,
            pe=groups.adapter,
            head=groups.head,
            backbone=groups.backbone,
            inner_lr=config.inner_lr,
            steps=steps,
            logger=self.logger,
        )
        # Only when the inner loop sees nothing below the adapter and gradients do not flow through it.
        self.cache = (
            config.cache_features
            and setting.priming == "meta"
            and isinstance(self.learner.strategy, FirstOrder)
        )
        self.sampler = EpisodeSampler(sources, tokenizer, config.support_size, config.query_size, seed=seed)
        self.tagger, self.total = tagger, config.prime_steps

    def step(self, step: int) -> float:
        tasks: Sequence[Task] = self.sampler.sample()
        if self.cache:
            tasks = [Task(support=self.tagger.cached(t.support), query=t.query) for t in tasks]
        self.learner.step = step
        result = self.learner.meta_step(tasks)
        return float(result.loss)

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])

    def close(self) -> None:
        self.logger.close()


class _FinetunePriming:
    """Setting 5: plain training of θp ∪ θa ∪ θh on shuffled source sentences, as many as meta priming sees."""

    def __init__(self, tagger, groups, config, sources, tokenizer, seed):
        self.rows = [row for encoded in sources.values() for row in model_inputs(encoded)]
        seen = config.prime_steps * len(sources) * (config.support_size + config.query_size)
        self.total = max(1, math.ceil(seen / config.prime_batch_size))
        self.collator, self.batch_size = make_collator(tokenizer), config.prime_batch_size
        self.tagger, self.random = tagger, random.Random(seed)
        self._batches = iter(())

    def step(self, step: int) -> float:
        batch = next(self._batches, None)
        if batch is None:
            self._batches = batches(
                self.rows, self.collator, self.batch_size, shuffle=True, seed=self.random.random()
            )
            batch = next(self._batches)
        loss = token_loss(self.tagger, batch)
        loss.backward()
        return float(loss.detach())

    def state_dict(self) -> dict:
        return {"random": self.random.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.random.setstate(state["random"])  # the interrupted epoch restarts with a fresh shuffle

    def close(self) -> None:
        pass
