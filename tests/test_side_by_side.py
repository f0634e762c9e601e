"""`python -m metakit.bench.side_by_side`: strategies timed alternately in one process."""

import json

import pytest

from metakit.bench import side_by_side


def test_compares_strategies_on_one_workload(tmp_path):
    out = tmp_path / "pair.md"
    code = side_by_side.main(
        [
            "--workload", "sine", "--steps", "2", "--strategies", "SecondOrder", "FirstOrder",
            "--repeats", "2", "--no-memory", "--out", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    (record,) = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    second, first = record["rows"]
    assert [len(second["cpu_s"]), len(first["cpu_s"])] == [2, 2]
    assert second["cpu_ratio"] == 1.0 and second["flop_ratio"] == 1.0
    # First order skips the double backward: fewer FLOPs than exact second order, never more.
    assert 0 < first["flop_ratio"] < 0.8
    table = out.read_text()
    assert "| 1 | sine | 2 | SecondOrder |" in table and "| 1 | sine | 2 | FirstOrder |" in table


def test_unknown_strategy_is_named(capsys):
    with pytest.raises(SystemExit):
        side_by_side.main(["--workload", "sine", "--steps", "1", "--strategies", "SecondOrdr"])
    assert "unknown strategy 'SecondOrdr'" in capsys.readouterr().err
