"""A meta-training budget study: how LEOPARD accuracy moves with the number of meta-steps.

For one meta-trained setting (e.g. ``meta_adapters``), a set of budgets (meta-steps) and a grid of outer
rates, the study

1. **sweeps**: for every rate, meta-trains once to the largest budget, measuring the pool's fixed dev
   episodes (query loss before and after the inner loop) every ``dev_every`` steps and saving the
   meta-learned weights at every budget. The outer optimizer's rate is constant, so the weights after
   ``n`` steps of that run are the weights of an ``n``-step run (`MetaTraining`); one run serves all
   budgets;
2. **chooses** each budget's rate on the pool's dev episodes (the lowest query loss after the inner
   loop at that step), never on LEOPARD;
3. **evaluates** each budget's chosen weights on the targets: a normal ``metakit fewshot run`` folder
   per budget (``eval/steps-{n}``, its config saying ``meta_steps = n`` and the chosen ``outer_lr``,
   its checkpoint the sweep's weights), and the from-scratch ``baseline`` setting once
   (``eval/baseline``, or an existing folder's units with ``baseline_from``), so ``metakit fewshot
   verify`` and ``table`` work on each.

Layout of the output folder::

    config.json                 the study (base config, setting, budgets, rates, ...) and its fingerprint
    results.json                the sweep's dev curves, the chosen rates, each budget's paired gain
    budget.md                   the study's table
    sweep/lr-{rate}/state.pt    the sweep's last saved training state (resume; git-ignored)
    sweep/lr-{rate}/step-{n}.pt the meta-learned weights after n steps (git-ignored)
    eval/steps-{n}/, eval/baseline/   ``metakit fewshot run`` folders

A stopped study resumes from the last budget its sweeps saved and from its folders' finished units.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metakit.experiments.fewshot.config import FewShotConfig
from metakit.experiments.fewshot.meta import MetaTraining
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.folder import open_folder
from metakit.experiments.paired import interval_text, paired_difference
from metakit.experiments.report import read_results, write_json

#: Config keys that only meta-training reads: a from-scratch baseline's units do not depend on them.
META_TRAINING_KEYS = (
    "meta_steps", "meta_batch", "n_way", "k_shot", "q_query", "inner_steps", "inner_lr", "outer_lr",
    "prime_lr", "meta_strategy", "meta_head_init", "meta_dev_episodes", "arch_lr", "pool_tasks",
    "pool_examples", "settings",
)  # fmt: skip

__all__ = ["META_TRAINING_KEYS", "BudgetStudy", "budget_report", "run_budget_study", "study_from_folder"]


@dataclass
class BudgetStudy:
    """What a budget study runs.

    Args:
        base: the few-shot config (its ``settings``, ``meta_steps`` and ``outer_lr`` are replaced).
        setting: the meta-trained setting studied (``meta_adapters``, ``meta_lora``, ...).
        baseline: the setting it is compared with on the targets (``adapters``, ``lora``; ``None``: none).
        budgets: meta-steps at which the weights are evaluated.
        rates: outer (AdamW) rates; each budget gets the one with the lowest dev loss.
        inner_rates: when given, the inner rate is chosen first among these, on the dev episodes before
            meta-training (lowest query loss after the inner loop); otherwise ``base.inner_lr``.
        dev_every: measure the dev episodes every this many steps (and at every budget).
        baseline_from: a ``metakit fewshot run`` folder that already holds the baseline's units (e.g.
            another study's ``eval/baseline``; a relative path is relative to the study's folder) instead
            of running them again; its config must equal ``base`` in every key that changes a
            from-scratch unit (all but `META_TRAINING_KEYS`). Neither it nor ``baseline`` changes the
            sweep or the budgets' folders, so a study can be resumed with them added.
    """

    base: FewShotConfig
    setting: str
    baseline: str | None = None
    budgets: list[int] = field(default_factory=lambda: [30, 100, 300])
    rates: list[float] = field(default_factory=lambda: [3e-4, 1e-3])
    inner_rates: list[float] | None = None
    dev_every: int = 10
    baseline_from: str | None = None

    def __post_init__(self) -> None:
        spec = FEWSHOT_SETTINGS.get(self.setting)
        if spec is None or spec.meta is None:
            meta = sorted(k for k, s in FEWSHOT_SETTINGS.items() if s.meta is not None)
            raise ValueError(f"The budget study needs a meta-trained setting ({meta}), got {self.setting!r}.")
        if self.baseline is not None and self.baseline not in FEWSHOT_SETTINGS:
            raise ValueError(
                f"Unknown baseline setting {self.baseline!r}; settings: {sorted(FEWSHOT_SETTINGS)}."
            )
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be meta-step counts >= 1, got {self.budgets}.")
        self.budgets = sorted(set(self.budgets))
        for name, rates in (("rates", self.rates), ("inner_rates", self.inner_rates or [1.0])):
            if not rates or any(not (isinstance(r, int | float) and r > 0) for r in rates):
                raise ValueError(f"{name} must be positive numbers, got {rates}.")
        if self.dev_every < 1:
            raise ValueError(f"dev_every must be >= 1, got {self.dev_every}.")
        if self.base.meta_dev_episodes < 1:
            raise ValueError(
                "The budget study chooses rates on the pool's dev episodes; set meta_dev_episodes >= 1."
            )

    def baseline_folder(self, out: str | Path) -> Path:
        """Where the baseline's units are: ``baseline_from`` or the study's own ``eval/baseline``."""
        return Path(out) / self.baseline_from if self.baseline_from else Path(out) / "eval" / "baseline"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["base"] = self.base.to_dict()
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def config_for(self, budget: int, outer_lr: float, inner_lr: float) -> FewShotConfig:
        """The few-shot config whose meta-training a budget's weights are."""
        keys = {**self.base.to_dict(), "settings": [self.setting], "meta_steps": budget}
        return FewShotConfig(**{**keys, "outer_lr": outer_lr, "inner_lr": inner_lr})


def study_from_folder(out: str | Path) -> BudgetStudy:
    """The study a folder holds (to resume it or render its report)."""
    saved = json.loads((Path(out) / "config.json").read_text(encoding="utf-8"))["config"]
    return BudgetStudy(**{**saved, "base": FewShotConfig(**saved["base"])})


def _rate_key(rate: float) -> str:
    return f"{rate:g}"


def run_budget_study(study: BudgetStudy, out: str | Path, *, resume: bool = False) -> dict[str, Any]:
    """Sweep, choose and evaluate (see the module); returns the results (also in ``results.json``)."""
    from metakit.experiments.fewshot.runner import FewShotExperiment
    from metakit.experiments.fewshot.unit import FewShotResources

    out = Path(out)
    if study.baseline_from is not None:
        _check_baseline_from(study, out)
    if study.base.threads:
        torch.set_num_threads(study.base.threads)
    lock, results = open_folder(
        out,
        study.to_dict(),
        study.fingerprint(),
        # the baseline does not change the sweep or the budgets' folders: it may be added on resume
        differing=lambda saved: sorted(
            k
            for k, v in study.to_dict().items()
            if k not in ("baseline", "baseline_from") and saved.get(k) != v
        ),
        resume=resume,
        # "units" stays empty (the evaluated units live in eval/*): the shared results reader wants the key
        empty={
            "units": [],
            "config": study.to_dict(),
            "sweep": {},
            "inner_rate": None,
            "chosen": {},
            "gains": {},
        },
        experiment="fewshot-budget",
    )
    try:
        resources = FewShotResources(study.base)
        save = lambda: _save(out, study, results)  # noqa: E731
        if results["inner_rate"] is None:
            results["inner_rate"] = _choose_inner_rate(study, resources, results)
            save()
        inner_lr = results["inner_rate"]["chosen"]
        for rate in study.rates:
            _sweep(study, resources, out, rate, inner_lr, results, save)
        results["chosen"] = {
            str(budget): min(study.rates, key=lambda r: _dev_at(results, r, budget))
            for budget in study.budgets
        }
        save()
        folders = {str(b): out / "eval" / f"steps-{b}" for b in study.budgets}
        for budget in study.budgets:
            rate = results["chosen"][str(budget)]
            config = study.config_for(budget, rate, inner_lr)
            folder = folders[str(budget)]
            checkpoint = folder / "checkpoints" / f"meta-{study.setting}.pt"
            if not checkpoint.is_file():
                checkpoint.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "sweep" / f"lr-{_rate_key(rate)}" / f"step-{budget}.pt", checkpoint)
            with FewShotExperiment(config, folder, resume=(folder / "config.json").is_file()) as experiment:
                experiment.run()
        if study.baseline is not None and study.baseline_from is None:
            config = FewShotConfig(**{**study.base.to_dict(), "settings": [study.baseline]})
            folder = out / "eval" / "baseline"
            with FewShotExperiment(config, folder, resume=(folder / "config.json").is_file()) as experiment:
                experiment.run()
        save()
        return results
    finally:
        lock.release()


def _check_baseline_from(study: BudgetStudy, out: Path) -> None:
    """``baseline_from`` must hold the baseline's units for this study's targets, run with its config."""
    from metakit.experiments.folder import saved_config

    folder = study.baseline_folder(out)
    saved = saved_config(folder) if (folder / "config.json").is_file() else None
    if saved is None or not (folder / "results.json").is_file():
        raise FileNotFoundError(f"baseline_from {str(folder)!r} holds no `metakit fewshot run` results.")
    if study.baseline is None or study.baseline not in saved.get("settings", []):
        raise ValueError(
            f"baseline_from {str(folder)!r} did not run the baseline setting {study.baseline!r}."
        )
    mine = study.base.to_dict()
    differ = sorted(
        k
        for k in set(mine) | set(saved)
        if k not in META_TRAINING_KEYS and k != "threads" and saved.get(k) != mine.get(k)
    )
    if differ:
        raise ValueError(
            f"baseline_from {str(folder)!r} was run with another config (keys that change its units: {differ}); "
            "run the study's own baseline instead (leave out --baseline-from)."
        )


def _dev_at(results: dict[str, Any], rate: float, step: int) -> float:
    curve = results["sweep"][_rate_key(rate)]["dev"]
    return next(point["after"] for point in curve if point["step"] == step)


def _new_training(study: BudgetStudy, resources, outer_lr: float, inner_lr: float) -> MetaTraining:
    config = study.config_for(max(study.budgets), outer_lr, inner_lr)
    spec = FEWSHOT_SETTINGS[study.setting]
    model, groups = resources.backbone.build(spec, config.seed)
    return MetaTraining(
        config, spec, model, groups, resources.backbone.tokenizer, resources.pool(),
        dev_pool=resources.pool_dev() or None,
    )  # fmt: skip


def _choose_inner_rate(study: BudgetStudy, resources, results: dict[str, Any]) -> dict[str, Any]:
    """The inner rate: ``base.inner_lr``, or the best of ``inner_rates`` on the dev episodes at step 0."""
    if not study.inner_rates:
        return {"chosen": study.base.inner_lr, "dev": {}}
    dev = {}
    for rate in study.inner_rates:
        training = _new_training(study, resources, study.rates[0], rate)
        before, after = training.dev_losses()
        dev[_rate_key(rate)] = {"before": before, "after": after}
    chosen = min(study.inner_rates, key=lambda r: dev[_rate_key(r)]["after"])
    return {"chosen": chosen, "dev": dev}


def _sweep(study: BudgetStudy, resources, out: Path, rate: float, inner_lr: float, results, save) -> None:
    """Meta-train at ``rate`` to the largest budget (resuming from its saved state), keeping the weights at
    every budget and the dev curve."""
    key = _rate_key(rate)
    record = results["sweep"].setdefault(key, {"rate": rate, "dev": [], "steps_done": 0, "seconds": 0.0})
    last = max(study.budgets)
    if record["steps_done"] >= last:
        return
    folder = out / "sweep" / f"lr-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    training = _new_training(study, resources, rate, inner_lr)
    state_path = folder / "state.pt"
    if record["steps_done"]:
        training.load_state_dict(torch.load(state_path, weights_only=False))
        record["dev"] = [p for p in record["dev"] if p["step"] <= training.steps_done]
    else:
        record["dev"] = [_dev_point(training)]
    began = time.perf_counter() - record["seconds"]
    bar = tqdm(total=last, initial=training.steps_done, desc=f"{study.setting} lr={key}", unit="step")
    while training.steps_done < last:
        training.step()
        bar.update(1)
        step = training.steps_done
        if step % study.dev_every == 0 or step in study.budgets:
            record["dev"].append(_dev_point(training))
        if step in study.budgets:
            torch.save(training.meta_learned_state(), folder / f"step-{step}.pt")
            torch.save(training.state_dict(), folder / "state.tmp")
            (folder / "state.tmp").replace(state_path)
            record["steps_done"], record["seconds"] = step, time.perf_counter() - began
            record["query_loss"] = training.log["query_loss"]
            record["inner_loss_first"] = training.log["inner_loss_first"]
            record["inner_loss_last"] = training.log["inner_loss_last"]
            save()
    bar.close()


def _dev_point(training: MetaTraining) -> dict[str, float]:
    before, after = training.dev_losses()
    return {"step": training.steps_done, "before": before, "after": after}


def _accuracies(folder: Path, setting: str) -> dict[tuple, float]:
    path = folder / "results.json"
    if not path.is_file():
        return {}
    units = read_results(path)["units"]
    return {(u["task"], u["k"], u["episode"]): u["accuracy"] for u in units if u["setting"] == setting}


def _save(out: Path, study: BudgetStudy, results: dict[str, Any]) -> None:
    baseline = _accuracies(study.baseline_folder(out), study.baseline) if study.baseline else {}
    results["gains"] = {}
    results["accuracy"] = {}
    for budget in study.budgets:
        scores = _accuracies(out / "eval" / f"steps-{budget}", study.setting)
        if scores:
            results["accuracy"][str(budget)] = sum(scores.values()) / len(scores)
        if scores and baseline:
            gain = paired_difference(scores, baseline)
            gain.pop("by_group")
            results["gains"][str(budget)] = gain
    if baseline:
        results["baseline_accuracy"] = sum(baseline.values()) / len(baseline)
    write_json(out / "results.json", results)
    (out / "budget.md").write_text(budget_report(study, results), encoding="utf-8")


def budget_report(study: BudgetStudy, results: dict[str, Any]) -> str:
    """The study's markdown table: per budget the dev losses of every rate, the chosen rate, the inner
    loop's own gain and the targets' accuracy and paired gain over the baseline."""
    rates = [_rate_key(r) for r in study.rates]
    lines = [
        f"# Meta-training budget study: `{study.setting}`"
        + (f" against `{study.baseline}`" if study.baseline else ""),
        "",
        f"Inner rate {results['inner_rate']['chosen'] if results.get('inner_rate') else '–'}"
        f" (head start `{study.base.meta_head_init}`, {study.base.meta_strategy} order); dev = query loss of "
        f"{study.base.meta_dev_episodes} fixed pool dev episodes after the inner loop; inner gain = the same "
        "loss before the inner loop minus after it, at the chosen rate. Accuracy × 100 on the targets; "
        "gain = paired difference to the baseline, 95 % Student-t interval over pairs and over tasks.",
        "",
        "| meta-steps | " + " | ".join(f"dev, lr {r}" for r in rates) + " | chosen lr | inner gain | "
        "accuracy | gain | CI, pairs | CI, tasks |",
        "|---|" + "---|" * (len(rates) + 6),
    ]
    sweep = results.get("sweep", {})
    for budget in [0, *study.budgets]:
        devs = []
        for rate in rates:
            point = next((p for p in sweep.get(rate, {}).get("dev", []) if p["step"] == budget), None)
            devs.append("–" if point is None else f"{point['after']:.4f}")
        chosen = results.get("chosen", {}).get(str(budget)) if budget else None
        inner = "–"
        pick = _rate_key(chosen) if chosen is not None else (rates[0] if budget == 0 else None)
        if pick is not None:
            point = next((p for p in sweep.get(pick, {}).get("dev", []) if p["step"] == budget), None)
            if point is not None:
                inner = f"{point['before'] - point['after']:+.4f}"
        accuracy = results.get("accuracy", {}).get(str(budget))
        gain = results.get("gains", {}).get(str(budget))
        if budget == 0 and results.get("baseline_accuracy") is not None:
            accuracy = results["baseline_accuracy"]
        lines.append(
            f"| {budget} | "
            + " | ".join(devs)
            + f" | {'–' if chosen is None else _rate_key(chosen)} | {inner} | "
            + ("–" if accuracy is None else f"{100 * accuracy:.1f}")
            + (
                f" | {100 * gain['mean_difference']:+.1f} | {interval_text(gain['ci95'])} | "
                f"{interval_text(gain['ci95_groups'])} |"
                if gain
                else " | – | – | – |"
            )
        )
    lines += [
        "",
        "Row 0 is before meta-training; its accuracy is the baseline's (the setting's modules from scratch).",
    ]
    seconds = {r: sweep[r].get("seconds") for r in rates if r in sweep}
    if seconds:
        lines += [
            "",
            "Sweep wall time: "
            + ", ".join(
                f"lr {r}: {s / 60:.1f} min" for r, s in seconds.items() if s is not None and math.isfinite(s)
            )
            + ".",
        ]
    return "\n".join(lines) + "\n"
