"""``metakit ner run`` under ``torchrun``: 2 gloo processes give the 1-process results; only rank 0 writes.

Under torchrun each meta-priming task draws its dropout from its own stream (seed, step, task), so a
run's results do not depend on the number of processes. The reference is the same command as one
``torchrun`` process (run in-process here, with torchrun's environment, which is faster).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_ner_pipeline import cli, fixture_file

from metakit.experiments.settings import SETTINGS

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--preset", "tiny", "--seeds", "0", "--settings", "4,5", "--langs", "hi,af")
# 16 meta steps with checkpoints every 5: room to stop a run mid-priming (as in test_ner_resume).
KEYS = ("--set", "prime_steps=16", "--set", "checkpoint_every=5")
#: 2 processes sum the same per-task meta-gradients in another order: equal to float32 rounding
#: (measured: bit-identical with 2 tasks per meta-batch).
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wikiann")
    for i, lang in enumerate(["en", "es", "hi", "af"]):
        for j, split in enumerate(["train", "test"]):
            fixture_file(folder / f"{split}-{lang}.tsv", 40, seed=10 * i + j)
    return folder


def torchrun(*argv: str, nproc: int = 2) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=N -m metakit.cli ner run ARGV`` in the background."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen(
        [*command, "-m", "metakit.cli", "ner", "run", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[str, str]:
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-4000:]
    return out, err


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def primed(out: Path, key: str) -> dict[str, torch.Tensor]:
    return torch.load(out / f"checkpoints/prime-{key}/primed.pt", weights_only=True)


@pytest.fixture(scope="module")
def two_processes(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 2-process run: its folder and its standard output."""
    out = tmp_path_factory.mktemp("two") / "run"
    stdout, _ = finish(torchrun(*FLAGS, *KEYS, "--data", str(data_dir), "--out", str(out)))
    return out, stdout


@pytest.fixture(scope="module")
def one_process(data_dir, tmp_path_factory) -> Path:
    """The same command as one torchrun process (in this process, with torchrun's environment)."""
    out = tmp_path_factory.mktemp("one") / "run"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        assert cli("run", *FLAGS, *KEYS, "--data", str(data_dir), "--out", str(out)) == 0
    assert not torch.distributed.is_initialized()  # the command left the group it joined
    return out


def assert_same_results(got: Path, want: Path, **tolerance) -> None:
    """Units (F1, fine-tuning loss), priming measurements and primed weights agree."""
    units = {(u["setting"], u["lang"]): u for u in results(want)["units"]}
    got_units = {(u["setting"], u["lang"]): u for u in results(got)["units"]}
    assert got_units.keys() == units.keys() == {(s, lang) for s in (4, 5) for lang in ("hi", "af")}
    for key, unit in units.items():
        assert got_units[key]["f1"] == unit["f1"], key
        torch.testing.assert_close(got_units[key]["ft_final_loss"], unit["ft_final_loss"], **tolerance)
    for key, info in results(want)["priming"].items():
        for metric in ("final_loss", "pre_query_loss", "post_query_loss"):
            if metric in info:
                torch.testing.assert_close(results(got)["priming"][key][metric], info[metric], **tolerance)
        reference = primed(want, key)
        assert primed(got, key).keys() == reference.keys()
        for name, value in reference.items():
            torch.testing.assert_close(primed(got, key)[name], value, **tolerance, msg=f"{key} {name}")


def test_two_processes_give_the_one_process_results(two_processes, one_process):
    out, _ = two_processes
    assert results(out)["invocations"][-1]["processes"] == 2
    assert results(out)["priming"]["s4-seed0"]["processes"] == 2
    assert_same_results(out, one_process, **TOLERANCE)


def test_only_rank_0_writes(two_processes):
    out, stdout = two_processes
    assert stdout.count("### F1 on the target test sets") == 1  # the table, printed by rank 0 alone
    writer = int((out / ".lock").read_text(encoding="utf-8"))
    # TensorBoard names each event file after the process that wrote it: rank 0 wrote every one,
    # including those of the units rank 1 ran (it sent their scalars to rank 0).
    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert {path.parent.name for path in events} >= {
        f"ft-{SETTINGS[s].slug}-{lang}-seed0" for s in (4, 5) for lang in ("hi", "af")
    }
    assert {int(path.name.split(".")[-2]) for path in events} == {writer}  # ...{host}.{pid}.{n}
    assert len(list((out / "runs").rglob("predictions-*.jsonl.gz"))) == 4
    assert cli("verify", str(out)) == 0  # every unit's F1 is its predictions' F1


@pytest.mark.slow
def test_an_interrupted_two_process_run_resumes_where_it_stopped(data_dir, two_processes, tmp_path):
    whole, _ = two_processes
    cut = tmp_path / "cut"
    process = torchrun(*FLAGS, *KEYS, "--data", str(data_dir), "--out", str(cut))
    checkpoint, deadline = cut / "checkpoints/prime-s4-seed0/last.pt", time.monotonic() + 300
    while not checkpoint.exists():
        assert process.poll() is None, f"the run ended before {checkpoint} appeared: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"{checkpoint} did not appear within 300 s"
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both processes
    _, err = process.communicate(timeout=300)
    assert process.returncode != 0
    stops = [line for line in err.splitlines() if line.startswith("interrupted after")]
    assert len(stops) == 1 and "during priming s4 seed 0" in stops[0], err[-3000:]

    # Both processes resume from the checkpoint rank 0 wrote; the saved config is read back.
    finish(torchrun("--out", str(cut), "--resume"))
    assert results(cut)["priming"]["s4-seed0"]["resumed_from"] > 0
    assert_same_results(cut, whole, rtol=0, atol=0)

    # A bad start on rank 0 stops both processes with one line, and no folder is written twice.
    process = torchrun(*FLAGS, "--data", str(data_dir), "--out", str(cut))
    _, err = process.communicate(timeout=300)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert process.returncode != 0 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: rank 0: ") and "already holds an experiment" in errors[0]


# -- the pieces: per-task random streams and the ranks' meeting points -----------------------------
def test_a_task_draws_the_same_dropout_alone_or_after_others():
    import torchopt
    from torch import nn

    import metakit as mk
    from metakit.experiments.ranks import TaskStreams
    from metakit.tasks import SineTasks, mse_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Dropout(0.5), nn.Linear(16, 1)).train()
    learner = mk.MetaLearner(
        model,
        mse_loss,
        inner=mk.InnerLoop(mk.everything(), torchopt.sgd(lr=0.1), steps=2),
        outer_params=mk.everything(),
        strategy=mk.FirstOrder(),
    )
    partition = learner._partition(dict(model.named_parameters()))
    problems = [learner._problem(t, i, partition, None) for i, t in enumerate(SineTasks(seed=1).sample(3))]
    streams = TaskStreams(seed=0)
    before = torch.get_rng_state()
    together = streams.run(learner.strategy, problems)
    assert torch.equal(torch.get_rng_state(), before)  # the process's own stream is left as it was
    alone = streams.run(learner.strategy, problems[2:])
    assert torch.equal(alone.query_losses, together.query_losses[2:])
    assert torch.equal(alone.inner_losses, together.inner_losses[2:])
    streams.step = 1  # another meta-step: other dropout masks
    assert not torch.equal(streams.run(learner.strategy, problems[2:]).inner_losses, alone.inner_losses)


def meeting_worker(rank: int, init_file: str, out: str) -> None:
    from datetime import timedelta

    from metakit.experiments.ranks import Ranks

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks = Ranks(rank, 2, timedelta(seconds=60), launched=True)
    saved: dict = {"mine": ranks.mine(["hi", "af", "az"])}
    saved["payloads"], saved["failures"] = ranks.meet(None, "a clean meeting", payload=f"from {rank}")
    error = ValueError("unit broke") if rank == 1 else None
    _, failures = ranks.meet(error, "a unit failed on rank 1")
    try:
        ranks.raise_failures(error, failures)
    except Exception as raised:
        saved["raised"] = (type(raised).__name__, str(raised), ranks.quiet(raised))
    torch.distributed.destroy_process_group()
    torch.save(saved, f"{out}/rank{rank}.pt")


def test_ranks_meet_and_a_failing_rank_stops_the_others_with_its_error(tmp_path):
    torch.multiprocessing.spawn(meeting_worker, args=(f"{tmp_path}/init", str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert rank0["mine"] == ["hi", "az"] and rank1["mine"] == ["af"]
    assert rank0["payloads"] == rank1["payloads"] == ["from 0", "from 1"] and rank0["failures"] == []
    kind, message, quiet = rank0["raised"]
    assert kind == "DistributedError" and "rank 1: ValueError: unit broke" in message
    assert quiet  # rank 1 prints its own error; rank 0 stays quiet
    assert rank1["raised"] == ("ValueError", "unit broke", False)
