"""The priming pipeline end to end on a tiny BERT and small TSV fixtures: every setting, F1, resume, bad input."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest
import torch

from metakit.experiments import priming
from metakit.experiments.cli import add_arguments, run
from metakit.experiments.config import load_config
from metakit.experiments.data import encode_ner, entity_f1, load_wikiann, make_collator
from metakit.experiments.model import Backbone
from metakit.experiments.report import load_predictions
from metakit.experiments.settings import SETTINGS

NAMES = ["Anna", "Pieter", "Ravi", "Maria", "Jonas"]
PLACES = ["Berlin", "Delhi", "Kaapstad", "Madrid", "Vilnius"]
FILLER = ["the", "visited", "in", "and", "lives", "city", "today", "with"]


def fixture_file(path: Path, n: int, seed: int) -> None:
    """``n`` sentences with PER and LOC entities in XTREME layout."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [(rng.choice(NAMES), "B-PER"), (rng.choice(FILLER), "O"), (rng.choice(PLACES), "B-LOC")]
        words += [(rng.choice(FILLER), "O") for _ in range(rng.randint(1, 4))]
        lines += [f"{w}\t{t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wikiann")
    for i, lang in enumerate(["en", "es", "hi", "af"]):
        for j, split in enumerate(["train", "test"]):
            fixture_file(folder / f"{split}-{lang}.tsv", 40, seed=10 * i + j)
    return folder


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(parser.parse_args(list(argv)))


def tiny_run(data_dir: Path, out: Path, *extra: str) -> int:
    return cli("run", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), *extra)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_every_setting_runs_and_f1_matches_saved_predictions(data_dir, tmp_path):
    out = tmp_path / "run"
    assert tiny_run(data_dir, out, "--seeds", "0") == 0
    units = results(out)["units"]
    assert {(u["setting"], u["lang"]) for u in units} == {
        (s, lang) for s in SETTINGS for lang in ("hi", "af")
    }
    for unit in units:
        gold, predicted = load_predictions(out / unit["predictions"])
        assert entity_f1(gold, predicted) == unit["f1"]
        assert 0 < unit["fraction_updated"] <= 1
    shares = {u["setting"]: u["fraction_updated"] for u in units}
    assert shares[2] < shares[3] == shares[4] < shares[1]
    table = (out / "table.md").read_text(encoding="utf-8")
    assert "Meta priming → adapter tuning" in table and "| hi | af |" in table
    assert set(results(out)["priming"]) == {f"s{s}-seed0" for s in (4, 5, 6, 7)}
    assert any((out / "tensorboard" / "prime-s4-meta-priming-seed0").iterdir())  # runs named by setting
    assert cli("table", str(out), "--write") == 0
    assert (out / "table.md").read_text(encoding="utf-8") == table


def test_resume_skips_finished_units_and_priming(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert tiny_run(data_dir, out, "--seeds", "0", "--settings", "3,4", "--langs", "hi") == 0
    first = results(out)["units"]
    assert tiny_run(data_dir, out, "--seeds", "0") == 2  # without --resume it refuses to overwrite
    calls = []
    monkeypatch.setattr(priming, "prime", lambda *a, **k: calls.append(a))
    monkeypatch.setattr("metakit.experiments.runner.prime", lambda *a, **k: calls.append(a))
    assert tiny_run(data_dir, out, "--seeds", "0", "--settings", "3,4", "--langs", "hi,af", "--resume") == 0
    units = results(out)["units"]
    assert units[: len(first)] == first  # finished units untouched
    assert {(u["setting"], u["lang"]) for u in units[len(first) :]} == {(3, "af"), (4, "af")}
    assert calls == []  # setting 4 reused its primed weights


def test_priming_restarts_from_its_last_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = priming._MetaPriming.step

    def crash_at_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(priming._MetaPriming, "step", crash_at_3)
    args = ("--seeds", "0", "--settings", "4", "--langs", "hi", "--set", "prime_steps=5")
    assert tiny_run(data_dir, out, *args) == 130
    assert torch.load(out / "checkpoints" / "prime-s4-seed0" / "last.pt", weights_only=False)["step"] == 2
    monkeypatch.setattr(priming._MetaPriming, "step", original)
    assert tiny_run(data_dir, out, *args, "--resume") == 0
    assert results(out)["priming"]["s4-seed0"]["resumed_from"] == 2


def test_resume_with_a_different_config_is_an_error(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert tiny_run(data_dir, out, "--seeds", "0", "--settings", "2", "--langs", "hi") == 0
    assert tiny_run(data_dir, out, "--settings", "2", "--set", "ft_lr_pe=0.5", "--resume") == 2
    assert "keys that differ: ['ft_lr_pe']" in capsys.readouterr().err


def test_bad_config_keys_and_paths(data_dir, tmp_path, capsys):
    assert tiny_run(data_dir, tmp_path / "a", "--set", "inner_lrr=0.1") == 2
    assert "Unknown config keys ['inner_lrr']" in capsys.readouterr().err
    config = tmp_path / "exp.yaml"
    config.write_text("preset: tiny\nsettings: [9]\n", encoding="utf-8")
    assert cli("run", "--config", str(config), "--out", str(tmp_path / "b")) == 2
    assert "Unknown settings [9]" in capsys.readouterr().err
    toml = tmp_path / "exp.toml"
    toml.write_text('preset = "tiny"\nwarmup = 3\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"Unknown config keys \['warmup'\]"):
        load_config(config_file=toml)
    assert tiny_run(tmp_path / "missing", tmp_path / "c", "--langs", "hi") == 2
    assert "missing' does not exist" in capsys.readouterr().err
    assert tiny_run(data_dir, tmp_path / "d", "--langs", "xx") == 2
    assert "train-xx.tsv" in capsys.readouterr().err


@pytest.mark.parametrize("number", [2, 3])
def test_cached_features_give_the_same_logits(data_dir, number):
    config = load_config("tiny", overrides={"data_dir": str(data_dir)})
    train = load_wikiann("hi", "train", data_dir)
    backbone = Backbone(config, tiny_words=(w for s in train["tokens"] for w in s))
    tagger, _ = backbone.build(SETTINGS[number], seed=0)
    with torch.no_grad():  # a non-trivial adapter, so an adapter skipped by the cache would show
        for name, param in tagger.named_parameters():
            if "top_adapter" in name:
                param.normal_(0, 0.5)
    tagger.eval()
    encoded = encode_ner(train.select(range(4)), backbone.tokenizer, 32)
    rows = [{k: r[k] for k in ("input_ids", "attention_mask", "labels")} for r in encoded]
    batch = dict(make_collator(backbone.tokenizer)(rows))
    full = tagger(**{k: v for k, v in batch.items() if k != "labels"})
    cached = tagger(features=tagger.features(batch))
    torch.testing.assert_close(cached, full)


@pytest.mark.slow
def test_cpu_preset_on_one_language(tmp_path):
    """The real thing on one target and one seed: the offline e5 encoder and the WikiAnn files."""
    data = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikiann"
    if not data.is_dir():
        pytest.skip(f"{data} is absent")
    out = tmp_path / "cpu"
    assert cli("run", "--preset", "cpu", "--langs", "hi", "--seeds", "0", "--out", str(out)) == 0
    units = results(out)["units"]
    assert len(units) == 7
    assert all(u["f1"] > 0.2 for u in units)
