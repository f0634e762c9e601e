"""The committed budget studies (`benchmarks/results/fewshot-budget/`) hold together: every evaluation
folder verifies, each budget's rate is the one with the lowest dev loss, each evaluation folder ran the
config its budget says, and the stored gains are the paired differences of the folders' own units."""

from __future__ import annotations

from pathlib import Path

import pytest

from metakit.experiments.fewshot.budget import study_from_folder
from metakit.experiments.fewshot.verify import verify_fewshot_folder
from metakit.experiments.paired import paired_difference
from metakit.experiments.report import read_results

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fewshot-budget"
STUDIES = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file()) if ROOT.is_dir() else []


def _accuracies(folder: Path, setting: str) -> dict:
    units = read_results(folder / "results.json")["units"]
    return {(u["task"], u["k"], u["episode"]): u["accuracy"] for u in units if u["setting"] == setting}


@pytest.mark.skipif(not STUDIES, reason="no committed budget study")
@pytest.mark.parametrize("name", STUDIES)
def test_committed_budget_study_holds_together(name):
    folder = ROOT / name
    study = study_from_folder(folder)
    results = read_results(folder / "results.json")
    baseline = folder / "eval" / "baseline"
    for budget in study.budgets:
        curves = {rate: record["dev"] for rate, record in results["sweep"].items()}
        dev = {rate: next(p["after"] for p in curve if p["step"] == budget) for rate, curve in curves.items()}
        chosen = results["chosen"][str(budget)]
        assert dev[f"{chosen:g}"] == min(dev.values())
        evaluated = folder / "eval" / f"steps-{budget}"
        if not (evaluated / "results.json").is_file():
            continue  # not evaluated yet (the study's README says so)
        assert verify_fewshot_folder(evaluated) == []
        config = read_results(evaluated / "results.json")["config"]
        assert (config["meta_steps"], config["outer_lr"]) == (budget, chosen)
        assert config["inner_lr"] == results["inner_rate"]["chosen"]
        if study.baseline and (baseline / "results.json").is_file():
            gain = paired_difference(
                _accuracies(evaluated, study.setting), _accuracies(baseline, study.baseline)
            )
            stored = results["gains"][str(budget)]
            assert stored["pairs"] == gain["pairs"] > 0
            assert stored["mean_difference"] == pytest.approx(gain["mean_difference"], abs=1e-12)
    if (baseline / "results.json").is_file():
        assert verify_fewshot_folder(baseline) == []
