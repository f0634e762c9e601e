"""Results that match their predictions: `ner verify`, the output-folder lock, corrupted files as one clear line."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_ner_pipeline import cli, data_dir, tiny_run  # noqa: F401 - data_dir is a fixture

from metakit.experiments.data import entity_f1
from metakit.experiments.lock import FolderLock, FolderLockedError
from metakit.experiments.report import load_predictions, load_unit_result, save_predictions, write_json
from metakit.experiments.verify import verify_folder

COMMITTED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "priming-cpu"

GOLD = [["B-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG"], ["B-LOC", "O"]]
PREDICTED = [["B-PER", "O", "O"], ["O", "B-ORG", "I-ORG"], ["B-LOC", "O"]]


def test_committed_results_match_their_predictions(capsys):
    assert verify_folder(COMMITTED) == []
    assert cli("verify", str(COMMITTED)) == 0
    assert "all 180 units" in capsys.readouterr().out
    assert not list(COMMITTED.glob("runs/*/*.jsonl"))  # stored compressed


def small_folder(out: Path, f1: float | None = None) -> Path:
    """An output folder with one unit whose predictions give F1 6/7 (seqeval), reported as ``f1``."""
    true_f1 = entity_f1(GOLD, PREDICTED)
    unit = {"setting": 5, "lang": "lt", "seed": 1, "f1": true_f1 if f1 is None else f1, "test_sentences": 3}
    unit["predictions"] = "runs/s5-seed1/predictions-lt.jsonl.gz"
    save_predictions(out / unit["predictions"], [["w"] * len(g) for g in GOLD], GOLD, PREDICTED, result=unit)
    write_json(out / "results.json", {"units": [unit], "priming": {}, "config": {"targets": ["lt"]}})
    return out


def test_predictions_file_holds_its_result_and_is_gzip(tmp_path):
    out = small_folder(tmp_path)
    path = out / "runs/s5-seed1/predictions-lt.jsonl.gz"
    assert load_predictions(path) == (GOLD, PREDICTED)
    assert load_unit_result(path)["f1"] == pytest.approx(6 / 7)  # 3 of 4 gold entities found, no false one
    assert json.loads(gzip.decompress(path.read_bytes()).decode().splitlines()[1])["gold"] == GOLD[0]
    assert verify_folder(out) == []


def test_verify_fails_loudly_on_a_mismatch(tmp_path, capsys):
    out = small_folder(tmp_path)
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    results["units"][0]["f1"] = 0.4485  # what a second process wrote beside other predictions
    write_json(out / "results.json", results)
    assert cli("verify", str(out)) == 1
    err = capsys.readouterr().err
    assert (
        "setting 5 lt seed 1: reported F1 0.4485 but seqeval on runs/s5-seed1/predictions-lt.jsonl.gz gives 0.8571"
        in err
    )
    assert "was written with F1 0.857" in err


@pytest.mark.parametrize("command", ["verify", "table"])
def test_corrupted_results_json_is_one_line(tmp_path, capsys, command):
    out = small_folder(tmp_path)
    (out / "results.json").write_text('{"units": [', encoding="utf-8")
    assert cli(command, str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "results.json" in err and "not readable JSON" in err


def test_corrupted_predictions_name_the_file(tmp_path, capsys):
    out = small_folder(tmp_path)
    path = out / "runs/s5-seed1/predictions-lt.jsonl.gz"
    path.write_bytes(path.read_bytes()[:30])  # truncated
    assert cli("verify", str(out)) == 1
    assert "predictions-lt.jsonl.gz' is corrupted" in capsys.readouterr().err


def test_a_live_lock_names_its_process_and_a_dead_ones_is_taken_over(tmp_path, capsys, data_dir):  # noqa: F811
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from metakit.experiments.lock import FolderLock; lock = FolderLock({str(out)!r}).acquire(); "
            "print('locked', flush=True); import time; time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLockedError, match=f"process {holder.pid}"):
            FolderLock(out).acquire()
        assert tiny_run(data_dir, out, "--settings", "2", "--langs", "hi", "--seeds", "0") == 2
        assert f"being written by another run (process {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The lock file still names the dead process, but the kernel released its lock: taken over.
    assert (out / ".lock").read_text().strip() == str(holder.pid)
    with FolderLock(out) as lock:
        assert lock.path.read_text().strip() == str(os.getpid())


def test_corrupted_checkpoints_name_the_file_and_the_fix(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert tiny_run(data_dir, out, "--settings", "2", "--langs", "hi", "--seeds", "0") == 0
    capsys.readouterr()
    folder = out / "checkpoints" / "prime-s4-seed0"
    folder.mkdir(parents=True)
    for name in ("last.pt", "primed.pt"):  # primed.pt is read first when both exist
        (folder / name).write_bytes(b"not a checkpoint")
        assert cli("run", "--out", str(out), "--resume", "--settings", "4") == 2
        err = capsys.readouterr().err.strip()
        last = err.splitlines()[-1]  # after the progress bar
        assert "Traceback" not in err and last.startswith("error: Checkpoint")
        assert f"{folder / name}' is corrupted" in last
        assert last.endswith("delete it to restart priming s4 seed 0 from the start.")


def test_a_failed_start_leaves_nothing_behind(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "new"
    assert tiny_run(data_dir, out, "--langs", "xx") == 2
    assert "train-xx.tsv" in capsys.readouterr().err
    assert not out.exists()
    # the same --out now starts cleanly (no "already holds an experiment")
    assert tiny_run(data_dir, out, "--langs", "hi", "--settings", "2", "--seeds", "0") == 0
