"""Command-line runs that never trap the user: each case below is one line, a non-zero exit, and
nothing left that blocks the next run."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from test_ner_pipeline import data_dir, tiny_run  # noqa: F401 - data_dir is a fixture

from metakit.cli import main
from metakit.experiments.folder import OutputFolderError, open_folder

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "benchmarks" / "results"


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# -- metakit ner run ------------------------------------------------------------------------------
def test_resume_of_a_folder_with_nothing_in_it_is_refused(data_dir, tmp_path, capsys):  # noqa: F811
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tiny_run(data_dir, empty, "--resume") == 2
    assert f"nothing to resume in {str(empty)!r}" in one_line(capsys)
    assert list(empty.iterdir()) == []  # nothing written: no lock, no config
    missing = tmp_path / "missing"
    assert tiny_run(data_dir, missing, "--resume") == 2
    assert "nothing to resume" in one_line(capsys) and not missing.exists()


def test_out_at_a_file_or_an_unwritable_path_is_one_line(data_dir, tmp_path, capsys):  # noqa: F811
    a_file = tmp_path / "file.txt"
    a_file.write_text("mine")
    assert tiny_run(data_dir, a_file, "--langs", "hi") == 2
    assert "is a file, not a folder" in one_line(capsys) and a_file.read_text() == "mine"
    below_a_file = a_file / "out"
    assert tiny_run(data_dir, below_a_file, "--langs", "hi") == 2
    assert "cannot be created or written" in one_line(capsys)


def test_the_other_experiments_folder_is_named_once(data_dir, tmp_path, capsys):  # noqa: F811
    fewshot = tmp_path / "fewshot"
    shutil.copytree(COMMITTED / "fewshot-cpu-quick", fewshot, ignore=shutil.ignore_patterns("runs"))
    before = sorted(p.name for p in fewshot.iterdir())
    assert tiny_run(data_dir, fewshot, "--langs", "hi") == 2
    assert "holds a `metakit fewshot` experiment, not a `metakit ner` one" in one_line(capsys)
    assert tiny_run(data_dir, fewshot, "--resume") == 2
    assert "holds a `metakit fewshot` experiment" in one_line(capsys)
    assert sorted(p.name for p in fewshot.iterdir()) == before


@pytest.mark.parametrize(
    "argv",
    [
        ["fewshot", "verify", str(COMMITTED / "priming-cpu")],
        ["fewshot", "table", str(COMMITTED / "priming-cpu")],
        [
            "fewshot",
            "merge",
            str(COMMITTED / "priming-cpu"),
            str(COMMITTED / "priming-cpu"),
            "--out",
            "never",
        ],
        ["ner", "verify", str(COMMITTED / "fewshot-cpu-quick")],
        ["ner", "table", str(COMMITTED / "fewshot-cpu-quick")],
    ],
    ids=["fewshot-verify", "fewshot-table", "fewshot-merge", "ner-verify", "ner-table"],
)
def test_folder_commands_on_the_other_experiment_say_so_in_one_line(argv, capsys):
    assert main(argv) == 2
    held = "ner" if argv[0] == "fewshot" else "fewshot"
    assert f"holds a `metakit {held}` experiment, not a `metakit {argv[0]}` one" in one_line(capsys)
    assert not Path("never").exists()


# -- the folder itself ----------------------------------------------------------------------------
def open_it(out: Path, config: dict, *, resume: bool = False):
    lock, results = open_folder(
        out,
        config,
        "fingerprint",
        differing=lambda saved: sorted(k for k in config if saved.get(k) != config[k]),
        resume=resume,
        empty={"units": []},
        experiment="ner",
    )
    lock.release()
    return results


def test_a_folder_whose_run_was_refused_before_any_unit_is_reused(tmp_path):
    out = tmp_path / "run"
    open_it(out, {"support_size": 1000})  # a run that a later check refused: config, no unit
    assert open_it(out, {"support_size": 10}) == {"units": []}  # no --resume needed
    assert json.loads((out / "config.json").read_text())["config"] == {"support_size": 10}
    assert open_it(out, {"support_size": 12}, resume=True) == {"units": []}  # nor a same config


def test_a_folder_with_finished_units_names_itself_to_delete(tmp_path):
    out = tmp_path / "run"
    open_it(out, {"support_size": 10})
    (out / "results.json").write_text(json.dumps({"units": [{"setting": 1}], "config": {}}), encoding="utf-8")
    with pytest.raises(FileExistsError, match=rf"pass --resume .* or delete '{out}' to start over"):
        open_it(out, {"support_size": 10})
    with pytest.raises(ValueError, match=rf"keys that differ: \['support_size'\].* or delete '{out}'"):
        open_it(out, {"support_size": 11}, resume=True)
    assert open_it(out, {"support_size": 10}, resume=True)["units"] == [{"setting": 1}]


def test_a_checkpoint_counts_as_progress(tmp_path):
    out = tmp_path / "run"
    open_it(out, {"prime_steps": 3})
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "priming-s4-seed0.pt").write_bytes(b"state")
    with pytest.raises(FileExistsError, match="pass --resume"):
        open_it(out, {"prime_steps": 3})
    with pytest.raises(OutputFolderError, match="nothing to resume"):
        open_it(tmp_path / "elsewhere", {"prime_steps": 3}, resume=True)


# -- metakit bench --------------------------------------------------------------------------------
def bench_args(out: Path, *extra: str) -> argparse.Namespace:
    from metakit.bench.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--workloads", "sine", "--strategies", "second-order", "first-order",
                              "--steps", "1", "--out", str(out), *extra])  # fmt: skip


def fake_record(config) -> dict:
    return {"status": "ok", "config": json.loads(config.to_json())}


def test_bench_out_at_a_file_is_one_line(tmp_path):
    from metakit.bench.cli import run

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file is a file, not a folder; choose another --out"):
        run(bench_args(a_file))
    with pytest.raises(SystemExit, match=r"--out .* cannot be written"):
        run(bench_args(a_file / "below"))


def test_bench_interrupted_keeps_what_it_measured_and_the_next_run_goes_on(tmp_path, monkeypatch, capsys):
    import metakit.bench.cli as bench_cli
    import metakit.bench.runner as bench_runner

    out, seen, written = tmp_path / "bench", [], {}

    def interrupted(configs, timeout_s, progress, checkpoint):
        seen.append([c.strategy for c in configs])
        with checkpoint.open("a") as stream:  # the first configuration finished, then Ctrl-C
            stream.write(json.dumps(fake_record(configs[0])) + "\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_runner, "run_configs", interrupted)
    assert bench_cli.run(bench_args(out)) == 130
    err = capsys.readouterr().err
    assert "interrupted: 1 of 2 configurations are measured and kept in" in err
    assert "run the same command again (same --out)" in err

    def finish(configs, timeout_s, progress, checkpoint):
        seen.append([c.strategy for c in configs])
        return [fake_record(c) for c in configs]

    monkeypatch.setattr(bench_runner, "run_configs", finish)
    monkeypatch.setattr(bench_cli, "_write_outputs", lambda records, environment, out: written.update(
        records=records, environment=environment))  # fmt: skip
    assert bench_cli.run(bench_args(out)) == 0
    assert "(1 already measured in" in capsys.readouterr().err
    assert seen == [["second-order", "first-order"], ["first-order"]]  # the kept one is not measured again
    assert [r["config"]["strategy"] for r in written["records"]] == ["second-order", "first-order"]
    assert written["environment"]["resumed_records"] == 1
    assert not (out / "records.partial.jsonl").exists()


def test_a_data_dependent_refusal_comes_before_any_unit_and_the_folder_is_reusable(
    data_dir,  # noqa: F811
    tmp_path,
    capsys,
):
    out = tmp_path / "run"
    for _ in range(2):  # the second run is refused for the same reason, not for the folder the first left
        assert tiny_run(data_dir, out, "--set", "support_size=1000") == 2
        assert "an episode needs support_size + query_size = 1004" in one_line(capsys)
    results = out / "results.json"
    assert not results.exists() or json.loads(results.read_text())["units"] == []


def test_fewshot_refuses_impossible_meta_training_episodes_before_creating_anything(tmp_path, capsys):
    from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR
    from metakit.experiments.data.leopard import DEFAULT_LEOPARD_DIR

    if not (Path(DEFAULT_LEOPARD_DIR).is_dir() and Path(DEFAULT_GLUE_META_DIR).is_dir()):
        pytest.skip(
            "the tiny preset reads LEOPARD and the GLUE-style pool, absent from this clone's ../shared/data"
        )
    out = tmp_path / "run"
    assert main(["fewshot", "run", "--preset", "tiny", "--set", "k_shot=500", "--out", str(out)]) == 2
    assert "(k_shot + q_query)" in one_line(capsys) and not out.exists()
