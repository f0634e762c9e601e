"""Priming on the source languages (settings 4–7), with checkpoints that a resumed run continues from.

Meta priming is `metakit.recipes.priming` (Algorithm 1), or `maml_loop_priming`
for setting 6; fine-tuning priming (setting 5) trains θp ∪ θa ∪ θh on the same source sentences. With a
only the adapter and head in the inner loop, each support batch goes through the encoder once, by the
library's feature reuse (`Tagger.feature_cut`): exact under every strategy.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_linear_schedule_with_warmup

from metakit import recipes
from metakit.experiments.config import ExperimentConfig
from metakit.experiments.data.ner import EpisodeSampler, batches, make_collator, model_inputs
from metakit.experiments.model import Groups, trainable_state
from metakit.experiments.ranks import Ranks
from metakit.experiments.settings import Setting
from metakit.experiments.tagger import Tagger, token_loss
from metakit.logging import TensorBoardLogger
from metakit.task import Task

__all__ = ["CheckpointError", "load_checkpoint", "prime", "rng_states", "set_rng_states"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically, so an interrupted save never leaves a truncated checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, unit: str, *, weights_only: bool = False) -> Any:
    """``torch.load(path)``, or one clear error naming the file and what deleting it does."""
    try:
        return torch.load(path, weights_only=weights_only)
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on a bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is corrupted ({reason}); delete it to restart {unit} from the start."
        ) from None


def rng_states() -> dict[str, Any]:
    """Every random state a unit's outcome depends on: Python's, NumPy's and torch's (CPU)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore `rng_states`."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])


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
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Prime ``tagger`` in place; returns ``{"steps", "seconds", "resumed_from", "final_loss", ...}``.

    ``checkpoint_dir/last.pt`` holds everything the rest of the run depends on every
    ``config.checkpoint_every`` steps: the trained tensors, optimizer, schedule, the sampler or shuffle
    position, and the Python, NumPy and torch random states. An existing one is continued from, and
    the result is bit-identical to an uninterrupted run (on CPU, one thread). Meta priming also
    reports the inner loop's mean adaptation gain on the query sets (see `_MetaPriming`).

    Under ``torchrun`` (``ranks``) every rank continues from the same checkpoint; meta priming splits
    each meta-batch across the ranks, fine-tuning priming runs on every rank alike, and rank 0 alone
    writes the checkpoint and the TensorBoard logs.
    """
    ranks = ranks or Ranks()
    trained = groups.backbone | groups.adapter | groups.head
    last = checkpoint_dir / "last.pt"
    unit = f"priming s{setting.number} seed {seed}"
    checkpoint = load_checkpoint(last, unit) if last.is_file() else None
    if checkpoint is not None:
        _restore(tagger, checkpoint["params"])
    tagger.train()
    if setting.priming == "finetune":
        loop = _FinetunePriming(tagger, groups, config, sources, tokenizer, seed)
    else:
        loop = _MetaPriming(tagger, groups, setting, config, sources, tokenizer, seed, log_dir, ranks)
    names = set(trained.names(tagger))
    params = [p for n, p in tagger.named_parameters() if n in names and p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.prime_lr)
    schedule = get_linear_schedule_with_warmup(optimizer, 0, loop.total)
    start, loss = 0, float("nan")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule.load_state_dict(checkpoint["schedule"])
        loop.load_state_dict(checkpoint["loop"])
        set_rng_states(checkpoint["rng"])
        start, loss = checkpoint["step"], checkpoint["loss"]
    began = time.perf_counter()
    try:
        bar = tqdm(
            total=loop.total, initial=start, desc=unit, leave=False, unit="step", disable=not ranks.main
        )
        with bar:
            for step in range(start, loop.total):
                loss = loop.step(step)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                done = step + 1
                if ranks.main and (done % config.checkpoint_every == 0 or done == loop.total):
                    payload = {
                        "step": done,
                        "loss": loss,
                        "params": trainable_state(tagger, trained),
                        "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(),
                        "loop": loop.state_dict(),
                        "rng": rng_states(),
                    }
                    save_checkpoint(last, payload)
    except BaseException:
        loop.close(finished=False)
        raise
    loop.close()
    tagger.eval()
    info = {
        "steps": loop.total,
        "seconds": time.perf_counter() - began,
        "resumed_from": start,
        "final_loss": loss,
        **loop.summary(),
    }
    if ranks.launched:
        info["processes"] = ranks.world
    return info


class _MetaPriming:
    """One outer step = one meta-batch of a task per source language (settings 4, 6, 7).

    Each step also measures the query loss *before* adaptation (one no-grad forward per task with the
    current parameters, under a forked random state so it changes nothing else) beside the
    post-adaptation query loss the meta-step reports. Their difference, the adaptation gain, says
    whether the inner loop does anything: near zero, priming is just multi-task training.
    """

    def __init__(self, tagger, groups, setting, config, sources, tokenizer, seed, log_dir, ranks=None):
        ranks = ranks or Ranks()
        steps = setting.inner_steps or config.inner_steps
        recipe = recipes.maml_loop_priming if setting.priming == "maml_loop" else recipes.priming
        self.logger = (
            TensorBoardLogger(
                log_dir, hparams={"setting": setting.number, "seed": seed, "inner_steps": steps}
            )
            if ranks.main
            else None
        )
        self.executor = ranks.executor(seed)
        self.learner = recipe(
            tagger,
            token_loss,
            pe=groups.adapter,
            head=groups.head,
            backbone=groups.backbone,
            inner_lr=config.inner_lr,
            steps=steps,
            logger=self.logger,
            # The library's feature reuse: exact under every strategy, so no condition on it here.
            cut=tagger.feature_cut(groups.adapter | groups.head) if config.cache_features else None,
            executor=self.executor,
        )
        self.sampler = EpisodeSampler(sources, tokenizer, config.support_size, config.query_size, seed=seed)
        self.tagger, self.total = tagger, config.prime_steps
        self.sums = {"pre_query_loss": 0.0, "post_query_loss": 0.0, "steps": 0}

    def step(self, step: int) -> float:
        tasks: Sequence[Task] = self.sampler.sample()
        self.learner.step = step
        if self.executor is not None:  # under torchrun: each task's dropout stream follows the step
            self.executor.local.step = step
        # Every rank traces the final support loss and the query loss before adaptation (rank 0's logger
        # would switch them on), so each task makes the same forwards wherever it runs. The logger writes
        # adaptation/query_loss_before, adaptation/gain and meta/query_loss (the loss after adaptation).
        result = self.learner.meta_step(tasks, final_support_loss=True, query_loss_before=True)
        assert result.query_losses_before is not None
        pre, post = float(result.query_losses_before.mean()), float(result.loss)
        self.sums["pre_query_loss"] += pre
        self.sums["post_query_loss"] += post
        self.sums["steps"] += 1
        return post

    def summary(self) -> dict[str, float]:
        """Mean query loss before and after adaptation over the priming steps, and the gain."""
        n = max(1, self.sums["steps"])
        pre, post = self.sums["pre_query_loss"] / n, self.sums["post_query_loss"] / n
        gain = pre - post
        return {
            "pre_query_loss": pre,
            "post_query_loss": post,
            "adaptation_gain": gain,
            "relative_adaptation_gain": gain / pre if pre else float("nan"),
        }

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "sums": dict(self.sums)}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.sums = dict(state["sums"])

    def close(self, finished: bool = True) -> None:
        if self.logger is None:
            return
        if finished:
            self.logger.close({"final_query_loss": self.summary()["post_query_loss"], **self.summary()})
        else:  # an interrupted run: no hparams summary of a run that has not ended
            self.logger.writer.close()


class _FinetunePriming:
    """Setting 5: plain training of θp ∪ θa ∪ θh on shuffled source sentences, as many as meta priming sees.

    Its state is the seed of the current epoch's shuffle and the position in it, so a resumed run
    continues the same epoch where it stopped rather than reshuffling.
    """

    def __init__(self, tagger, groups, config, sources, tokenizer, seed):
        self.rows = [row for encoded in sources.values() for row in model_inputs(encoded)]
        seen = config.prime_steps * len(sources) * (config.support_size + config.query_size)
        self.total = max(1, math.ceil(seen / config.prime_batch_size))
        self.collator, self.batch_size = make_collator(tokenizer), config.prime_batch_size
        self.tagger, self.random = tagger, random.Random(seed)
        self.epoch_seed: float | None = None
        self.position = 0
        self._batches = iter(())

    def _epoch(self, seed: float, position: int) -> None:
        self.epoch_seed, self.position = seed, position
        self._batches = batches(self.rows, self.collator, self.batch_size, shuffle=True, seed=seed)
        for _ in range(position):
            next(self._batches)

    def step(self, step: int) -> float:
        batch = next(self._batches, None)
        if batch is None:
            self._epoch(self.random.random(), 0)
            batch = next(self._batches)
        self.position += 1
        loss = token_loss(self.tagger, batch)
        loss.backward()
        return float(loss.detach())

    def summary(self) -> dict[str, float]:
        return {}  # no inner loop, no adaptation gain

    def state_dict(self) -> dict:
        return {"random": self.random.getstate(), "epoch_seed": self.epoch_seed, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.random.setstate(state["random"])
        if state.get("epoch_seed") is not None:
            self._epoch(state["epoch_seed"], state["position"])

    def close(self, finished: bool = True) -> None:
        pass
