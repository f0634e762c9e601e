"""The meta-training budget study on the tiny model: why one sweep serves every budget (a longer run's
prefix is the shorter run, exactly), exact resumption, the zero head's start at chance, rates chosen on
dev, verifiable evaluation folders, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metakit.cli import main
from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR
from metakit.experiments.data.leopard import DEFAULT_LEOPARD_DIR
from metakit.experiments.fewshot.budget import BudgetStudy, run_budget_study, study_from_folder
from metakit.experiments.fewshot.config import load_fewshot_config
from metakit.experiments.fewshot.meta import MetaTraining, meta_train
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.fewshot.unit import FewShotResources
from metakit.experiments.fewshot.verify import verify_fewshot_folder
from metakit.experiments.report import read_results
from metakit.functional import bind

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_LEOPARD_DIR).is_dir() and Path(DEFAULT_GLUE_META_DIR).is_dir()),
    reason="../shared/data/leopard or glue-meta absent",
)

SETTING = FEWSHOT_SETTINGS["meta_adapters"]


@pytest.fixture(scope="module")
def tiny():
    # First order keeps it quick; the prefix and resume properties do not depend on the strategy.
    config = load_fewshot_config("tiny", overrides={"meta_strategy": "first", "tasks": ["scitail"]})
    return config, FewShotResources(config)


def _training(config, resources, **keys) -> MetaTraining:
    config = type(config)(**{**config.to_dict(), **keys})
    model, groups = resources.backbone.build(SETTING, config.seed)
    return MetaTraining(
        config, SETTING, model, groups, resources.backbone.tokenizer, resources.pool(),
        dev_pool=resources.pool_dev() or None,
    )  # fmt: skip


def _weights(training: MetaTraining) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in training.model.named_parameters()}


def test_a_longer_runs_prefix_is_the_shorter_run_with_dev_evaluations_between(tiny):
    config, resources = tiny
    short = type(config)(**{**config.to_dict(), "meta_steps": 2})
    model, groups = resources.backbone.build(SETTING, config.seed)
    log = meta_train(short, SETTING, model, groups, resources.backbone.tokenizer, resources.pool())
    longer = _training(config, resources, meta_steps=4)
    for _ in range(2):
        longer.dev_losses()
        longer.step()
        longer.dev_losses()
    assert longer.log["query_loss"] == log["query_loss"]
    expected = {n: p.detach() for n, p in model.named_parameters()}
    moved = 0
    for name, value in _weights(longer).items():
        assert torch.equal(value, expected[name]), name
        moved += not torch.equal(
            value, dict(resources.backbone.build(SETTING, config.seed)[0].named_parameters())[name]
        )
    assert moved > 0  # meta-training changed something, so the equality is not trivially true


def test_a_resumed_run_continues_exactly(tiny, tmp_path):
    config, resources = tiny
    straight = _training(config, resources)
    straight.step()
    straight.step()
    first = _training(config, resources)
    first.step()
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = _training(config, resources)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    resumed.step()
    assert resumed.steps_done == 2 and resumed.log == straight.log
    expected = _weights(straight)
    assert all(torch.equal(v, expected[n]) for n, v in _weights(resumed).items())


def test_a_zero_head_starts_every_dev_episode_at_chance(tiny):
    config, resources = tiny
    zero = _training(config, resources, meta_head_init="zero", inner_lr=1.0)
    before, after = zero.dev_losses()
    ways = [len(set(task.query.labels.tolist())) for task in zero.dev_tasks]
    assert before == pytest.approx(sum(math.log(n) for n in ways) / len(ways), abs=1e-6)
    # The inner loop learns the head from the support set (the tiny random encoder's query need not follow).
    task = zero.dev_tasks[0]
    zero.model.head.init = "zero"
    try:
        task.support.prototypes = None
        adapted = zero.learner.adapt(task)
        with torch.no_grad():
            support_after = float(task.loss_fn(bind(zero.model, adapted), task.support))
    finally:
        zero.model.head.init = "euclidean"
    assert support_after < math.log(ways[0]) - 0.01
    assert after != pytest.approx(before, abs=1e-4)
    # ... and the model's own head keeps its prototype start outside meta-training
    assert zero.model.head.init == "euclidean"
    prototype = _training(config, resources)
    assert prototype.dev_losses()[0] != pytest.approx(before, abs=1e-4)


def _study(config, **keys) -> BudgetStudy:
    return BudgetStudy(
        config, "meta_adapters", baseline="adapters", budgets=[1, 2], rates=[1e-3, 3e-2], dev_every=1, **keys
    )


def test_the_study_chooses_on_dev_evaluates_verifiably_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    config, _ = tiny
    study = _study(config)
    results = run_budget_study(study, tmp_path / "a")
    for budget in (1, 2):
        dev = {r: _dev(results, r, budget) for r in ("0.001", "0.03")}
        assert results["chosen"][str(budget)] == float(min(dev, key=dev.get))
        folder = tmp_path / "a" / "eval" / f"steps-{budget}"
        assert verify_fewshot_folder(folder) == []
        saved = read_results(folder / "results.json")
        assert saved["config"]["meta_steps"] == budget
        assert saved["config"]["outer_lr"] == results["chosen"][str(budget)]
        rate = f"{results['chosen'][str(budget)]:g}"
        sweep_state = torch.load(tmp_path / "a" / "sweep" / f"lr-{rate}" / f"step-{budget}.pt")
        used = torch.load(folder / "checkpoints" / "meta-meta_adapters.pt")
        assert sweep_state.keys() == used.keys() and all(torch.equal(sweep_state[k], used[k]) for k in used)
        assert set(results["gains"][str(budget)]) >= {"mean_difference", "ci95", "ci95_groups", "pairs"}
    assert verify_fewshot_folder(tmp_path / "a" / "eval" / "baseline") == []
    assert "| 2 |" in (tmp_path / "a" / "budget.md").read_text()
    assert study_from_folder(tmp_path / "a").to_dict() == study.to_dict()

    # Interrupt a second study after the sweep at 3e-2 saved step 1; the resumed one ends where the first did.
    calls = {"n": 0}
    original = MetaTraining.step

    def interrupted(self, writer=None):
        if self.config.outer_lr == 3e-2 and self.steps_done == 1:
            calls["n"] += 1
            raise KeyboardInterrupt
        return original(self, writer)

    monkeypatch.setattr(MetaTraining, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_budget_study(study, tmp_path / "b")
    monkeypatch.setattr(MetaTraining, "step", original)
    assert calls["n"] == 1
    with pytest.raises(FileExistsError):
        run_budget_study(study, tmp_path / "b")
    resumed = run_budget_study(study, tmp_path / "b", resume=True)
    for rate in ("0.001", "0.03"):
        assert resumed["sweep"][rate]["dev"] == results["sweep"][rate]["dev"]
        assert resumed["sweep"][rate]["query_loss"] == results["sweep"][rate]["query_loss"]
        a = torch.load(tmp_path / "a" / "sweep" / f"lr-{rate}" / "step-2.pt")
        b = torch.load(tmp_path / "b" / "sweep" / f"lr-{rate}" / "step-2.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["gains"] == results["gains"]

    # A study may take its baseline's units from another folder run with the same unit-changing keys.
    shared = BudgetStudy(**{**study.__dict__, "baseline_from": str(tmp_path / "a" / "eval" / "baseline")})
    borrowed = run_budget_study(shared, tmp_path / "c")
    assert borrowed["gains"] == results["gains"] and not (tmp_path / "c" / "eval" / "baseline").exists()
    other = type(config)(**{**config.to_dict(), "ft_steps": config.ft_steps + 1})
    with pytest.raises(ValueError, match=r"keys that change its units: \['ft_steps'\]"):
        run_budget_study(BudgetStudy(**{**shared.__dict__, "base": other}), tmp_path / "d")

    # A finished study resumed again runs nothing and keeps its results; the plot draws both studies.
    again = run_budget_study(study, tmp_path / "a", resume=True)
    assert again["sweep"] == results["sweep"] and again["gains"] == results["gains"]
    assert (
        main(
            [
                "fewshot",
                "budget",
                "plot",
                str(tmp_path / "a"),
                str(tmp_path / "b"),
                "--out",
                str(tmp_path / "p.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def _dev(results, rate: str, step: int) -> float:
    return next(p["after"] for p in results["sweep"][rate]["dev"] if p["step"] == step)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--setting", "adapters"], "needs a meta-trained setting"),
        (["--setting", "meta_adapters", "--budgets", "0,30"], "budgets must be meta-step counts >= 1"),
        (["--setting", "meta_adapters", "--rates", "-1"], "rates must be positive"),
        (["--setting", "meta_adapters", "--baseline", "nope"], "Unknown baseline setting 'nope'"),
        ([], "--setting is required"),
        (["--setting", "meta_adapters", "--set", "meta_head_init=ones"], "meta_head_init must be"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "study"
    code = main(["fewshot", "budget", "run", "--preset", "tiny", *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not out.exists()
