"""metakit as a library: a light core that imports no experiment, extras named when missing, data found
from a path, ``$METAKIT_DATA`` or the development folder, one curated public API."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import metakit as mk
from metakit.experiments.data.locate import DATA_ENV, DataNotFoundError, development_folder, locate

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "metakit"
NOT_CORE = ("experiments", "bench")
HEAVY = (
    "transformers",
    "datasets",
    "seqeval",
    "sklearn",
    "scipy",
    "matplotlib",
    "tensorboard",
    "safetensors",
    "peft",
)


def core_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in NOT_CORE]


def test_the_core_imports_nothing_from_the_experiments_or_the_benchmarks():
    offenders = []
    for path in core_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith(("metakit.experiments", "metakit.bench", "benchmarks")):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


BLOCKER = f"""
import sys, importlib.abc, importlib.machinery
class Missing(importlib.abc.Loader):  # as if the package were not installed
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise ModuleNotFoundError(f"No module named {{module.__name__!r}} (not in the core install)")
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r} or name == "torch.utils.tensorboard":
            return importlib.machinery.ModuleSpec(name, Missing())
        return None
sys.meta_path.insert(0, Blocked())
"""


def run_core(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_the_core_runs_maml_with_torch_and_torchopt_only():
    done = run_core(
        """
import torch, torchopt, metakit as mk
import metakit.peft, metakit.recipes, metakit.executors, metakit.preflight, metakit.logging
model = mk.tasks.sine_mlp()
learner = mk.recipes.maml(model, mk.tasks.mse_loss, inner_lr=0.1, steps=2)
result = learner.meta_step(mk.tasks.SineTasks().sample(4))
print(mk.check(model, learner, mk.tasks.SineTasks().sample(1)[0]).ok, float(result.loss) > 0)
"""
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


@pytest.mark.parametrize(
    "code, extra",
    [
        ("from metakit.logging import TensorBoardLogger; TensorBoardLogger('runs/x')", "tensorboard"),
        ("import metakit.experiments", "experiments"),
        ("import metakit.bench", "bench"),
        (
            "import metakit as mk; mk.peft.save_pe('x.safetensors', mk.tasks.sine_mlp(), mk.everything())",
            "hf",
        ),
    ],
    ids=["tensorboard", "experiments", "bench", "hf"],
)
def test_a_missing_extra_is_one_line_naming_it(code, extra):
    done = run_core(code)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "MissingExtraError" in last and f"pip install 'metakit[{extra}]'" in last, done.stderr


def test_the_command_line_names_a_missing_extra_in_one_line():
    done = run_core("import sys; from metakit.cli import main; sys.exit(main(['ner', 'run', '--help']))")
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "error: metakit.experiments (metakit ner, metakit fewshot) needs transformers, which the core install "
        "does not include: pip install 'metakit[experiments]'"
    )
    assert run_core("import sys; from metakit.cli import main; sys.exit(main(['--help']))").returncode == 0


def test_only_metakit_is_installed_as_a_top_level_package():
    from setuptools import find_packages

    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert 'include = ["metakit*"]' in text
    packages = find_packages(where=str(ROOT), include=["metakit*"])
    assert packages and all(p == "metakit" or p.startswith("metakit.") for p in packages)
    assert "metakit.bench" in packages and "metakit.experiments.data" in packages


def test_one_public_api():
    assert {"recipes", "peft", "executors", "tasks"} <= set(mk.__all__)
    assert mk.recipes.maml and mk.peft.add_lora and mk.executors.Vmap
    for internal in ("TaskProblem", "Partition", "TaskGradient", "PrototypeClassifier", "Finding"):
        assert internal not in mk.__all__
        with pytest.warns(DeprecationWarning, match=rf"metakit\.{internal} is no longer a top-level name"):
            assert getattr(mk, internal) is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in mk.__all__:
            getattr(mk, name)  # no public name warns


def test_moved_task_loaders_still_work_with_a_warning():
    from metakit.experiments.data import load_wikiann

    with pytest.warns(
        DeprecationWarning, match=r"metakit\.tasks\.load_wikiann moved to metakit\.experiments\.data"
    ):
        assert mk.tasks.load_wikiann is load_wikiann


# -- data from anywhere ---------------------------------------------------------------------------
def test_an_explicit_path_wins_and_a_missing_one_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    (tmp_path / "leopard").mkdir()
    mine = tmp_path / "mine"
    mine.mkdir()
    assert locate("leopard", mine) == mine
    with pytest.raises(
        DataNotFoundError, match=r"LEOPARD data folder .*typo.* does not exist \(the path given\)"
    ):
        locate("leopard", tmp_path / "typo", label="LEOPARD")


def test_the_environment_variable_comes_before_the_development_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    (tmp_path / "glue-meta").mkdir()
    assert locate("glue-meta") == tmp_path / "glue-meta"
    # The development folder's own path (the recorded default of older configs) counts as not given.
    assert locate("glue-meta", development_folder("glue-meta")) == tmp_path / "glue-meta"


def test_the_hub_comes_before_the_development_folder_unless_offline(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert locate("wikiann", hub=lambda: "from the hub", hub_name="unimelb-nlp/wikiann") == "from the hub"


def test_a_data_set_found_nowhere_lists_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def unreachable():
        raise ConnectionError("no route to huggingface.co")

    with pytest.raises(DataNotFoundError) as raised:
        locate("nothing-here", hub=unreachable, hub_name="someone/nothing")
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    for tried in (
        f"${DATA_ENV}/nothing-here",
        "the hub's someone/nothing (ConnectionError",
        "development folder",
    ):
        assert tried in message
