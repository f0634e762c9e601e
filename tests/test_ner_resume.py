"""Exact resume: a run stopped by real signals during priming, then resumed, equals an uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ner_pipeline import cli, fixture_file

SETTINGS = "4,5"  # meta priming (episode sampler) and fine-tuning priming (shuffled epochs)
FLAGS = ("--seeds", "0", "--langs", "hi", "--settings", SETTINGS)
# 16 meta steps, 32 fine-tuning steps; checkpoints that fall mid-epoch (10 batches per epoch).
KEYS = ("--set", "prime_steps=16", "--set", "checkpoint_every=5")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wikiann")
    for i, lang in enumerate(["en", "es", "hi"]):
        for j, split in enumerate(["train", "test"]):
            fixture_file(folder / f"{split}-{lang}.tsv", 40, seed=10 * i + j)
    return folder


def start(*argv: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen(
        [sys.executable, "-m", "metakit.cli", "ner", "run", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # A job started in the background by a non-interactive shell inherits SIGINT ignored, and
        # Python then installs no Ctrl-C handler: restore the default so the test's SIGINT arrives.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.default_int_handler),
    )


def stop_when(process: subprocess.Popen, path: Path, signum: int) -> tuple[int, str]:
    """Send ``signum`` as soon as ``path`` exists (a priming checkpoint: priming is under way)."""
    deadline = time.monotonic() + 120
    while not path.exists():
        assert process.poll() is None, f"the run ended before {path} appeared: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within 120 s"
        time.sleep(0.005)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def finish(process: subprocess.Popen) -> None:
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def test_interrupted_and_resumed_run_is_bit_identical(data_dir, tmp_path):
    common = ("--preset", "tiny", "--data", str(data_dir), *FLAGS, *KEYS)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli("run", *common, "--out", str(whole)) == 0  # the reference, uninterrupted (in-process: faster)

    # SIGTERM during meta priming (setting 4).
    code, err = stop_when(
        start(*common, "--out", str(cut)), cut / "checkpoints/prime-s4-seed0/last.pt", signal.SIGTERM
    )
    lines = err.strip().splitlines()
    assert code == 143, err
    assert "Traceback" not in err
    assert lines[-1].startswith("interrupted after 0 of 2 units, during priming s4 seed 0")
    assert lines[-1].endswith(f"continue with `metakit ner run --out {cut} --resume`")

    # Ctrl-C during fine-tuning priming (setting 5); the resume reads the saved config (no --preset/flags).
    code, err = stop_when(
        start("--out", str(cut), "--resume"), cut / "checkpoints/prime-s5-seed0/last.pt", signal.SIGINT
    )
    assert code == 130, err
    assert "Traceback" not in err and "during priming s5 seed 0" in err.strip().splitlines()[-1]
    finish(start("--out", str(cut), "--resume"))

    expected = json.loads((whole / "results.json").read_text(encoding="utf-8"))
    resumed = json.loads((cut / "results.json").read_text(encoding="utf-8"))
    for key in ("s4-seed0", "s5-seed0"):
        assert resumed["priming"][key]["resumed_from"] > 0  # the signals did land mid-priming
        for metric, value in expected["priming"][key].items():
            if metric not in ("seconds", "resumed_from"):
                assert resumed["priming"][key][metric] == value, (key, metric)
        primed = torch.load(cut / f"checkpoints/prime-{key}/primed.pt", weights_only=True)
        reference = torch.load(whole / f"checkpoints/prime-{key}/primed.pt", weights_only=True)
        assert primed.keys() == reference.keys()
        for name, tensor in reference.items():
            assert torch.equal(primed[name], tensor), (key, name)
    f1 = {(u["setting"], u["lang"]): (u["f1"], u["ft_final_loss"]) for u in expected["units"]}
    assert {(u["setting"], u["lang"]): (u["f1"], u["ft_final_loss"]) for u in resumed["units"]} == f1
    assert "pre_query_loss" in expected["priming"]["s4-seed0"]
