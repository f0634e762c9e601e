"""``metakit fewshot`` end to end on the ``tiny`` preset: run, verify, exact resume after SIGTERM, bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metakit.cli import main
from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR
from metakit.experiments.data.leopard import DEFAULT_LEOPARD_DIR
from metakit.experiments.report import load_predictions, write_json

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_LEOPARD_DIR).is_dir() and Path(DEFAULT_GLUE_META_DIR).is_dir()),
    reason="the tiny preset reads LEOPARD and the GLUE-style pool, absent from this clone's ../shared/data",
)

SETTINGS = "head,meta_adapters,adapters"
# 40 meta-steps: a window of seconds in which the SIGTERM lands during meta-training.
SLOW_META = ("--set", "meta_steps=40")
TIMING_KEYS = {"seconds", "meta_seconds", "predictions"}


def cli(*argv: str) -> int:
    return main(["fewshot", *argv])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted tiny run of three settings (head, Meta-Adapters, adapters)."""
    out = tmp_path_factory.mktemp("fewshot") / "reference"
    assert cli("run", "--preset", "tiny", "--settings", SETTINGS, *SLOW_META, "--out", str(out)) == 0
    return out


def _units(out: Path) -> dict[tuple, dict]:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {
        (u["setting"], u["task"], u["k"], u["episode"]): {k: v for k, v in u.items() if k not in TIMING_KEYS}
        for u in results["units"]
    }


def test_tiny_run_writes_every_unit_and_verifies(reference, capsys):
    units = _units(reference)
    assert sorted({key[0] for key in units}) == sorted(SETTINGS.split(","))
    assert len(units) == 3 * 2  # 3 settings x 2 tasks x k=4 x episode 0
    for unit in units.values():
        assert 0.0 <= unit["accuracy"] <= 1.0 and 0.0 <= unit["macro_f1"] <= 1.0
    path = reference / "runs/meta_adapters/scitail-k4-ep0.jsonl.gz"
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    head = json.loads(lines[0])["result"]
    gold, predicted = load_predictions(path)
    assert len(gold) == head["n_test"] == 24 and len(predicted) == 24
    assert head["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, predicted, strict=True)) / 24)
    assert (reference / "checkpoints/meta-meta_adapters.pt").is_file()
    assert any((reference / "tensorboard/meta-meta_adapters").iterdir())
    assert "Paired comparisons" in (reference / "table.md").read_text(encoding="utf-8")
    results = json.loads((reference / "results.json").read_text(encoding="utf-8"))
    wall = sum(call["wall_seconds"] for call in results["invocations"])
    assert 0 < results["elapsed_seconds"] <= wall  # meta-training is counted once, inside its unit
    assert set(results["meta"]) == {"meta_adapters"} and results["meta"]["meta_adapters"]["steps"] == 40
    capsys.readouterr()
    assert cli("verify", str(reference)) == 0
    assert "all 6 units" in capsys.readouterr().out


def test_verify_fails_loudly_on_a_changed_score(reference, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results["units"][1]["macro_f1"] = 0.123
    write_json(out / "results.json", results)
    assert cli("verify", str(out)) == 1
    err = capsys.readouterr().err
    assert "reported macro_f1 0.1230 but sklearn on runs/" in err
    assert "was written with macro_f1" in err


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    argv = ["fewshot", "run", "--preset", "tiny", "--settings", SETTINGS, *SLOW_META, "--out", str(out)]
    return subprocess.Popen(
        [sys.executable, "-m", "metakit.cli", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigterm_then_resume_gives_identical_results(reference, tmp_path):
    out = tmp_path / "interrupted"
    process = _start(out)
    deadline = time.monotonic() + 300
    # Stop it while Meta-Adapters meta-trains (its TensorBoard folder appears when that starts and the
    # 40 meta-steps take a while), not after some unit count: a fast machine may finish the units
    # between two polls.
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "tensorboard" / "meta-meta_adapters").is_dir():
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "interrupted after" in err and f"metakit fewshot run --out {out} --resume" in err
    interrupted_units = len(_units(out))
    assert interrupted_units < 6
    assert cli("run", "--out", str(out), "--resume") == 0
    assert _units(out) == _units(reference)
    # The interrupted invocation counts in the report when it finished units.
    calls = json.loads((out / "results.json").read_text(encoding="utf-8"))["invocations"]
    assert len(calls) == (2 if interrupted_units else 1)
    assert f"over {len(calls)} invocation(s)" in (out / "table.md").read_text(encoding="utf-8")
    for unit in _units(reference).values():
        relative = f"runs/{unit['setting']}/{unit['task']}-k{unit['k']}-ep{unit['episode']}.jsonl.gz"
        assert load_predictions(out / relative) == load_predictions(reference / relative)


def test_resume_refuses_a_different_config_and_a_second_run(reference, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    assert cli("run", "--preset", "tiny", "--settings", "head", "--out", str(out)) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli("run", "--out", str(out), "--resume", "--set", "ft_steps=7") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keys that differ: ['ft_steps']" in err
    assert cli("run", "--out", str(out), "--resume") == 0  # everything is finished: nothing reruns
    assert _units(out) == _units(reference)


def _one_error(capsys, *argv: str) -> str:
    assert cli("run", "--preset", "tiny", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_bad_input_is_one_line(tmp_path, capsys):
    out = str(tmp_path / "never")
    err = _one_error(capsys, "--set", f"leopard_dir={tmp_path / 'nowhere'}", "--out", out)
    assert "LEOPARD data folder" in err and "nowhere" in err and "does not exist" in err
    assert "Unknown tasks ['sarcasm']" in _one_error(capsys, "--tasks", "sarcasm", "--out", out)
    assert "k in [4, 8, 16]" in _one_error(capsys, "--shots", "5", "--out", out)
    err = _one_error(capsys, "--settings", "meta_adapters", "--set", "n_way=3", "--out", out)
    assert "n_way=3 is larger than pool task 'SST-2'" in err
    assert "Unknown config keys ['nope']" in _one_error(capsys, "--set", "nope=1", "--out", out)
    assert not Path(out).exists()  # a refused start writes nothing


def test_corrupted_json_names_the_file(tmp_path, capsys):
    data = tmp_path / "leopard"
    data.mkdir()
    for task in Path(DEFAULT_LEOPARD_DIR).iterdir():
        if task.is_dir() and task.name != "scitail":
            (data / task.name).symlink_to(task)
    shutil.copytree(Path(DEFAULT_LEOPARD_DIR) / "scitail", data / "scitail")
    broken = data / "scitail" / "scitail_train_0_4.json"
    broken.write_text('[{"sentence1": "a", ', encoding="utf-8")
    err = _one_error(
        capsys, "--settings", "head", "--set", f"leopard_dir={data}", "--out", str(tmp_path / "x")
    )
    assert str(broken) in err


@pytest.mark.parametrize(
    "folder",
    [
        "fewshot-cpu-quick",
        "fewshot-cpu",
        "fewshot-cpu-episodes-2-4",
        "fewshot-cpu-sensitivity/tams-arch-lr-0.03",
        "fewshot-cpu-sensitivity/meta-adapters-120-steps",
    ],
)
def test_committed_fewshot_results_verify(folder):
    """Every committed few-shot unit's accuracy and macro-F1 equal sklearn's on its own predictions."""
    from metakit.cli import main

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / folder
    assert main(["fewshot", "verify", str(path)]) == 0


def test_merge_joins_side_by_side_runs_into_the_reference(reference, tmp_path, capsys):
    """Two folders of one config, different settings, merge into the units of one uninterrupted run."""
    half_a, half_b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "merged"
    assert cli("run", "--preset", "tiny", "--settings", "head", *SLOW_META, "--out", str(half_a)) == 0
    assert (
        cli(
            "run",
            "--preset",
            "tiny",
            "--settings",
            "meta_adapters,adapters",
            *SLOW_META,
            "--out",
            str(half_b),
        )
        == 0
    )
    capsys.readouterr()
    assert cli("merge", str(half_a), str(half_b), "--out", str(merged)) == 0
    assert "merged 6 units from 2 folders" in capsys.readouterr().out
    assert _units(merged) == _units(reference)
    config = json.loads((merged / "config.json").read_text(encoding="utf-8"))["config"]
    assert config["settings"] == ["head", "adapters", "meta_adapters"]  # the settings' own order
    assert (merged / "checkpoints/meta-meta_adapters.pt").is_file()
    table = (merged / "table.md").read_text(encoding="utf-8")
    assert "Merged from folders that ran side by side" in table and "(d) Meta-Adapters" in table
    assert cli("verify", str(merged)) == 0

    # a unit in two folders, an existing --out and a differing config are refused in one line
    capsys.readouterr()
    assert cli("merge", str(half_a), str(merged), "--out", str(tmp_path / "twice")) == 2
    assert "is in both" in capsys.readouterr().err and not (tmp_path / "twice").exists()
    assert cli("merge", str(half_a), str(half_b), "--out", str(merged)) == 2
    assert "already exists" in capsys.readouterr().err
    other = tmp_path / "other"
    assert (
        cli("run", "--preset", "tiny", "--settings", "head", "--set", "ft_steps=4", "--out", str(other)) == 0
    )
    capsys.readouterr()
    assert cli("merge", str(other), str(half_b), "--out", str(tmp_path / "mixed")) == 2
    assert "ft_steps" in capsys.readouterr().err
