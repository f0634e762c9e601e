"""Your own few-shot tasks (issue 24): loading every format, seeded stratified episodes, a tiny run end
to end with verify, table, resume and merge, and every bad input as one ``error:`` line."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from metakit.cli import main
from metakit.experiments.data.kshot import held_out_split, kshot_episode, kshot_shortfall
from metakit.experiments.data.text_tasks import TaskDataError, content_digest, load_text_classification
from metakit.experiments.fewshot.config import load_fewshot_config
from metakit.experiments.fewshot.sources import OwnTaskData
from metakit.experiments.fewshot.task_config import read_task_config

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "own_tasks"
TASKS = FIXTURES / "tasks.toml"
SETTINGS = "head,adapters,meta_adapters"
RUN = ("run", "--preset", "tiny", "--settings", SETTINGS, "--shots", "4", "--episodes", "0,1")
TIMING_KEYS = {"seconds", "meta_seconds"}


def cli(*argv: str) -> int:
    return main(["fewshot", *argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- loading -------------------------------------------------------------------------------------------


def test_every_file_format_gives_the_same_task():
    reviews = {
        suffix: load_text_classification(FIXTURES / f"reviews.{suffix}", text="review", label="stars")
        for suffix in ("json", "parquet", "tsv")
    }
    for data in reviews.values():
        assert data.column_names == ["text_a", "text_b", "label"]
        assert sorted(set(data["label"])) == ["1", "5"]  # integer labels become strings
    assert len({content_digest(data) for data in reviews.values()}) == 1
    csv = load_text_classification(FIXTURES / "intents.csv", label="intent")
    jsonl = load_text_classification(FIXTURES / "topics.jsonl", text="headline", label="topic")
    assert (len(csv), len(jsonl)) == (24, 24)
    assert csv[0] == {"text_a": "Turn off the kitchen lights", "text_b": None, "label": "lights"}


def test_a_folder_has_splits_and_a_pair_task_has_two_texts():
    train = load_text_classification(FIXTURES / "tickets", text="message", label="team")
    test = load_text_classification(FIXTURES / "tickets", text="message", label="team", split="test")
    assert (len(train), len(test)) == (40, 16)
    assert Counter(train["label"]) == dict.fromkeys(["account", "billing", "shipping", "technical"], 10)
    pairs = load_text_classification(FIXTURES / "pairs.csv", text=["question1", "question2"])
    assert pairs[0]["text_b"] == "What is the way to reset my password?" and pairs[0]["label"] == "same"


def test_class_labels_become_their_names(tmp_path):
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    Dataset.from_dict({"sentence": ["bad", "good"], "label": [0, 1]}, features=features).to_parquet(
        tmp_path / "labelled.parquet"
    )
    data = load_text_classification(tmp_path / "labelled.parquet", text="sentence")
    assert data["label"] == ["neg", "pos"]


def test_the_task_file_reads_the_same_as_toml_and_yaml():
    toml, yaml = read_task_config(TASKS), read_task_config(FIXTURES / "tasks.yaml")
    assert toml == yaml
    assert toml.names == {"pool": ["intents", "topics", "reviews"], "targets": ["tickets", "pairs"]}
    assert toml.target("tickets").path == str(FIXTURES / "tickets")  # relative to the task file
    assert toml.target("pairs").held_out == 0.5 and toml.target("tickets").held_out is None


def test_a_task_file_makes_the_config_select_its_tasks():
    config = load_fewshot_config("cpu", task_config=TASKS)
    assert config.tasks == ["tickets", "pairs"] and config.pool_tasks == ["intents", "topics", "reviews"]
    assert config.hp_tasks is None and config.own_tasks["targets"][1]["text"] == ["question1", "question2"]
    chosen = load_fewshot_config("tiny", overrides={"tasks": ["pairs"], "shots": [3]}, task_config=TASKS)
    assert chosen.tasks == ["pairs"] and chosen.shots == [3]  # any k, not only LEOPARD's
    other = load_fewshot_config("tiny", task_config=FIXTURES / "tasks.yaml")
    assert other.fingerprint() == load_fewshot_config("tiny", task_config=TASKS).fingerprint()


# -- episodes ------------------------------------------------------------------------------------------


def test_episodes_are_stratified_and_reproducible_from_the_seed():
    labels = ["a"] * 10 + ["b"] * 7 + ["c"] * 5
    first = kshot_episode(labels, k=4, episode=0, seed=0, task="t")
    assert Counter(labels[i] for i in first) == {"a": 4, "b": 4, "c": 4} and len(set(first)) == 12
    assert first == kshot_episode(labels, k=4, episode=0, seed=0, task="t")
    assert first != kshot_episode(labels, k=4, episode=1, seed=0, task="t")
    assert first != kshot_episode(labels, k=4, episode=0, seed=1, task="t")
    train, test = held_out_split(labels, test_size=0.3, seed=0, task="t")
    assert not set(train) & set(test) and sorted(train + test) == list(range(len(labels)))
    assert Counter(labels[i] for i in test) == {"a": 3, "b": 2, "c": 2}
    assert (train, test) == held_out_split(labels, test_size=0.3, seed=0, task="t")
    assert kshot_shortfall(labels, 4, test_size=0.3) == ("c", 5, 6, 3)  # 2 held out + 4 > 5; k <= 3 works


def test_a_targets_episodes_come_from_its_training_rows_only():
    data = OwnTaskData(load_fewshot_config("tiny", overrides={"shots": [4]}, task_config=TASKS))
    pairs = data.target("pairs")
    assert len(pairs.test) == 8 and set(pairs.test_rows).isdisjoint(pairs.train_rows)
    for episode in range(5):
        rows = data.episode_rows("pairs", 4, episode)
        assert set(rows) <= set(pairs.train_rows)
        assert Counter(data.episode("pairs", 4, episode)["label"]) == {"same": 4, "different": 4}
    assert len(data.test("tickets")) == 16  # the folder's test split, given


# -- a run on the tiny model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("own") / "run"
    assert cli(*RUN, "--task-config", str(TASKS), "--out", str(out)) == 0
    return out


def _units(out: Path) -> dict[tuple, dict]:
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    return {
        (u["setting"], u["task"], u["k"], u["episode"]): {k: v for k, v in u.items() if k not in TIMING_KEYS}
        for u in results["units"]
    }


def test_a_tiny_run_writes_units_episodes_and_verifies(run, capsys):
    units = _units(run)
    assert len(units) == 3 * 2 * 2  # settings x targets x episodes
    assert {unit["n_test"] for key, unit in units.items() if key[1] == "tickets"} == {16}
    assert units[("head", "pairs", 4, 0)]["classes"] == ["different", "same"]
    record = json.loads((run / "episodes/pairs.json").read_text(encoding="utf-8"))
    assert record["test"]["held_out"] == 0.5 and len(record["test"]["rows"]) == 8
    assert Counter(record["episodes"]["4"]["1"]["labels"]) == {"different": 4, "same": 4}
    saved = json.loads((run / "config.json").read_text(encoding="utf-8"))["config"]
    assert [t["name"] for t in saved["own_tasks"]["targets"]] == ["tickets", "pairs"]
    capsys.readouterr()
    assert cli("verify", str(run)) == 0
    assert "all 12 units" in capsys.readouterr().out
    assert cli("table", str(run)) == 0
    table = capsys.readouterr().out
    assert "your own tasks" in table and "| setting | pairs | tickets | mean |" in table


def test_the_same_config_repeats_the_run(run, tmp_path):
    again = tmp_path / "again"
    assert cli(*RUN, "--task-config", str(TASKS), "--out", str(again)) == 0
    assert _units(again) == _units(run)
    for task in ("tickets", "pairs"):
        assert (again / f"episodes/{task}.json").read_text() == (run / f"episodes/{task}.json").read_text()


def test_resume_continues_and_extends_the_record(run, tmp_path, capsys):
    out = tmp_path / "resumed"
    shutil.copytree(run, out)
    assert cli("run", "--out", str(out), "--resume") == 0  # nothing left to do
    assert _units(out) == _units(run)
    assert cli("run", "--out", str(out), "--resume", "--episodes", "0,1,2", "--tasks", "pairs") == 0
    assert len(_units(out)) == 12 + 3
    record = json.loads((out / "episodes/pairs.json").read_text(encoding="utf-8"))
    assert sorted(record["episodes"]["4"]) == ["0", "1", "2"]
    capsys.readouterr()
    assert cli("verify", str(out)) == 0


def test_resume_with_other_tasks_or_changed_data_is_refused(run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run, out)
    other = tmp_path / "tasks.toml"
    other.write_text(TASKS.read_text().replace("test_size = 0.5", "test_size = 0.25"))
    shutil.copy(FIXTURES / "pairs.csv", tmp_path / "pairs.csv")
    for name in ("intents.csv", "topics.jsonl", "reviews.parquet"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    shutil.copytree(FIXTURES / "tickets", tmp_path / "tickets")
    capsys.readouterr()
    assert cli("run", "--out", str(out), "--resume", "--task-config", str(other)) == 2
    line = one_error_line(capsys)
    assert "own_tasks.targets.pairs.test_size" in line and "own_tasks.targets.pairs.path" in line
    # the same task file over changed data: the episode record says so
    record = out / "episodes/pairs.json"
    saved = json.loads(record.read_text(encoding="utf-8"))
    record.write_text(json.dumps({**saved, "sha256": "0" * 64}), encoding="utf-8")
    assert cli("run", "--out", str(out), "--resume") == 2
    assert "Task 'pairs''s examples changed since the run began" in one_error_line(capsys)


def test_verify_checks_the_episode_record(run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    record = out / "episodes/tickets.json"
    saved = json.loads(record.read_text(encoding="utf-8"))
    saved["episodes"]["4"]["0"]["labels"][0] = "billing"
    saved["episodes"]["4"]["0"]["labels"][-1] = "billing"
    record.write_text(json.dumps(saved), encoding="utf-8")
    capsys.readouterr()
    assert cli("verify", str(out)) == 1
    assert "not 4 examples of each" in capsys.readouterr().err


def test_merge_joins_two_halves_of_an_own_task_run(run, tmp_path, capsys):
    halves = [tmp_path / "a", tmp_path / "b"]
    for half, settings in zip(halves, ("head", "adapters,meta_adapters"), strict=True):
        argv = [*RUN[:3], "--settings", settings, *RUN[5:], "--task-config", str(TASKS), "--out", str(half)]
        assert cli(*argv) == 0
    merged = tmp_path / "merged"
    assert cli("merge", *map(str, halves), "--out", str(merged)) == 0
    assert _units(merged).keys() == _units(run).keys()
    saved = json.loads((merged / "config.json").read_text(encoding="utf-8"))["config"]
    assert saved["tasks"] == ["tickets", "pairs"] and saved["shots"] == [4]
    assert (merged / "episodes/pairs.json").read_text() == (run / "episodes/pairs.json").read_text()
    capsys.readouterr()
    assert cli("verify", str(merged)) == 0


# -- bad input: one line each ----------------------------------------------------------------------------


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def _tasks(folder: Path, targets: str, pool: str = "") -> Path:
    pool = pool or '[[pool]]\npath = "intents.csv"\nlabel = "intent"\n'
    shutil.copy(FIXTURES / "intents.csv", folder / "intents.csv")
    return _write(folder, "tasks.toml", pool + "\n" + targets)


def _bad_run(tmp_path: Path, tasks: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli(*RUN, "--task-config", str(tasks), "--out", str(out), *extra) == 2
    assert not out.exists()  # refused before anything is written
    return one_error_line(capsys)


def _tickets(folder: Path, counts: dict[str, int]) -> None:
    rows = [f"message {label} {i},{label}" for label, n in counts.items() for i in range(n)]
    _write(folder, "own.csv", "message,team\n" + "\n".join(rows) + "\n")


OWN = '[[targets]]\npath = "own.csv"\ntext = "message"\nlabel = "team"\n'


def test_a_missing_text_column_lists_the_columns(tmp_path, capsys):
    _tickets(tmp_path, {"a": 10, "b": 10})
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN.replace('"message"', '"body"')), capsys)
    assert "'body' not in" in line and "its columns are ['message', 'team']" in line


def test_a_missing_label_column_lists_the_columns(tmp_path, capsys):
    _tickets(tmp_path, {"a": 10, "b": 10})
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN.replace('"team"', '"queue"')), capsys)
    assert "label column 'queue' not in" in line and "['message', 'team']" in line


def test_a_label_with_fewer_examples_than_k(tmp_path, capsys):
    _tickets(tmp_path, {"a": 10, "b": 3})
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN + "test_size = 0.5\n"), capsys)
    assert (
        "label 'b' has 3 examples, fewer than the 6 that k=4 needs (4 for the episodes + 2 held out" in line
    )
    assert "k <= 1 works" in line
    _write(tmp_path, "test.csv", "message,team\nx,a\ny,b\n")
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN + 'test = "test.csv"\n'), capsys)
    assert "label 'b' has 3 examples, fewer than k=4; k <= 3 works with this data (--shots 3)" in line


def test_a_pool_label_with_too_few_examples(tmp_path, capsys):
    _tickets(tmp_path, {"a": 10, "b": 10})
    _write(tmp_path, "small.csv", "text,label\n" + "".join(f"t{i},{'xy'[i % 2]}\n" for i in range(5)))
    pool = '[[pool]]\npath = "small.csv"\n'
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN, pool), capsys, "--set", "k_shot=2", "--set", "q_query=2")
    assert "Pool task 'small': label 'y' has 2 examples, fewer than the k_shot + q_query = 4" in line


def test_a_task_with_one_class(tmp_path, capsys):
    _tickets(tmp_path, {"only": 12})
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN), capsys)
    assert "has one class ('only') in label column 'team'" in line


def test_a_duplicate_task_name(tmp_path, capsys):
    _tickets(tmp_path, {"a": 10, "b": 10})
    line = _bad_run(tmp_path, _tasks(tmp_path, OWN + "\n" + OWN), capsys)
    assert "Task name 'own' is used twice (targets #1 and targets #2)" in line


def test_an_empty_file(tmp_path, capsys):
    _write(tmp_path, "own.csv", "")
    assert "own.csv' is empty" in _bad_run(tmp_path, _tasks(tmp_path, OWN), capsys)
    _write(tmp_path, "own.csv", "message,team\n")
    assert "holds no examples" in _bad_run(tmp_path, _tasks(tmp_path, OWN), capsys)


def test_a_hub_data_set_that_cannot_be_reached_offline(tmp_path, capsys):
    hub = '[[targets]]\nhub = "someone/no-such-dataset"\n'
    line = _bad_run(tmp_path, _tasks(tmp_path, hub), capsys)
    assert "hub data set someone/no-such-dataset split 'train' could not be loaded" in line
    assert "HF_HUB_OFFLINE is set" in line


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('[[targets]]\npath = "missing.csv"\n', "does not exist"),
        ('[[targets]]\npath = "own.csv"\nhub = "x/y"\n', "exactly one of path"),
        ('[[targets]]\npath = "own.csv"\ncolumn = "x"\n', "unknown keys ['column']"),
        ('[[targets]]\npath = "own.csv"\ntest = "a.csv"\ntest_size = 0.2\n', "cannot go with test"),
        ('[[targets]]\npath = "own.csv"\ntest = "a.csv"\ntest_split = "test"\n', "not both"),
        ('[[targets]]\npath = "own.csv"\ntest_size = 2\n', "in (0, 1)"),
        ('[[targets]]\nname = "my task"\npath = "own.csv"\n', "must be letters"),
        ("[[pool]]\npath = 'own.csv'\n", "names no targets"),
    ],
)
def test_a_bad_task_entry_is_one_line(tmp_path, capsys, entry, expected):
    _tickets(tmp_path, {"a": 10, "b": 10})
    tasks = _write(tmp_path, "tasks.toml", entry)
    assert expected in _bad_run(tmp_path, tasks, capsys)


def test_the_loader_names_a_missing_column_directly():
    with pytest.raises(
        TaskDataError, match=r"column 'text' not in .* its columns are \['headline', 'topic'\]"
    ):
        load_text_classification(FIXTURES / "topics.jsonl", label="topic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_classification(FIXTURES / "missing.csv", from_hub=False)
