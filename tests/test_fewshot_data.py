"""LEOPARD and GLUE-meta loaders, the stratified subsample and the N-way k-shot sampler."""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest
from datasets import Dataset

from metakit.experiments.data.episodes import FewShotSampler, label_ids
from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR, GLUE_META_TASKS, load_glue_meta
from metakit.experiments.data.leopard import (
    DEFAULT_LEOPARD_DIR,
    LEOPARD_EPISODES,
    LEOPARD_SHOTS,
    LEOPARD_TASKS,
    EmptyEpisodeError,
    leopard_episodes,
    load_leopard_episode,
    load_leopard_test,
    stratified_subsample,
)

needs_leopard = pytest.mark.skipif(
    not Path(DEFAULT_LEOPARD_DIR).is_dir(), reason="../shared/data/leopard absent"
)
needs_pool = pytest.mark.skipif(
    not Path(DEFAULT_GLUE_META_DIR).is_dir(), reason="../shared/data/glue-meta absent"
)
PAIR_TASKS = {"conll", "restaurant", "scitail"}


@needs_leopard
@pytest.mark.parametrize("task", sorted(LEOPARD_TASKS))
def test_leopard_task_matches_readme(task, caplog):
    spec = LEOPARD_TASKS[task]
    test = load_leopard_test(task)
    labels = sorted(set(test["label"]))
    assert len(test) == spec.test_size  # the README's test size
    assert len(labels) == spec.n_classes  # and class count
    assert test.column_names == ["text_a", "text_b", "label"]
    assert all((b is not None) == (task in PAIR_TASKS) for b in test["text_b"])
    with caplog.at_level(logging.WARNING, logger="metakit.experiments.data.leopard"):
        for k in LEOPARD_SHOTS:
            episodes = leopard_episodes(task, k)
            empty = (task, k) == ("disaster", 16)
            assert sorted(episodes) == [e for e in range(LEOPARD_EPISODES) if not (empty and e == 0)]
            for data in episodes.values():
                # every episode shows every class exactly k times
                assert Counter(data["label"]) == dict.fromkeys(labels, k)
    skipped = [r.getMessage() for r in caplog.records]
    if task == "disaster":
        assert len(skipped) == 1 and "disaster_train_0_16.json is empty" in skipped[0]
    else:
        assert skipped == []


@needs_leopard
def test_empty_episode_raises_a_named_error():
    with pytest.raises(EmptyEpisodeError, match="disaster k=16 episode 0"):
        load_leopard_episode("disaster", 16, 0)


@needs_pool
@pytest.mark.parametrize("task", sorted(GLUE_META_TASKS))
def test_glue_meta_task_matches_readme(task):
    size, pair = GLUE_META_TASKS[task]
    train, dev = load_glue_meta(task, "train"), load_glue_meta(task, "dev")
    assert len(train) == size  # the README's train count
    assert 178 <= len(dev) <= 1000  # "dev sets of 178–1000 examples each"
    assert all(isinstance(label, str) for label in train["label"])
    assert all((b is not None) == pair for b in train["text_b"])
    assert set(dev["label"]) <= set(train["label"])


def test_bad_leopard_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_leopard_test("scitail", data_dir=tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"task folder .* is missing"):
        load_leopard_test("scitail", data_dir=tmp_path)
    with pytest.raises(ValueError, match="one of the five not in the public copy"):
        load_leopard_test("emotion", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"k in \[4, 8, 16\]"):
        load_leopard_episode("scitail", 5, 0, data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"episodes are numbered 0\.\.9"):
        load_leopard_episode("scitail", 4, 10, data_dir=tmp_path)


@needs_leopard
def test_corrupted_json_names_the_file_in_one_line(tmp_path):
    folder = tmp_path / "scitail"
    shutil.copytree(Path(DEFAULT_LEOPARD_DIR) / "scitail", folder)
    broken = folder / "scitail_train_3_8.json"
    broken.chmod(0o644)
    broken.write_text(broken.read_text()[:500], encoding="utf-8")
    with pytest.raises(ValueError) as error:
        load_leopard_episode("scitail", 8, 3, data_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(broken) in message and "not valid JSON" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_bad_pool_input(tmp_path):
    with pytest.raises(ValueError, match="Unknown meta-training task"):
        load_glue_meta("WNLI", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_glue_meta("RTE", data_dir=tmp_path / "nowhere")
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.json").write_text('{"0": {"text_a": "x", "label": "1"', encoding="utf-8")
    with pytest.raises(ValueError, match=r"train.json is not valid JSON"):
        load_glue_meta("RTE", data_dir=tmp_path)


def _toy(counts: dict[str, int]) -> Dataset:
    rows = [
        {"text_a": f"{label} {i}", "text_b": None, "label": label}
        for label, n in counts.items()
        for i in range(n)
    ]
    return Dataset.from_list(rows)


def test_stratified_subsample_keeps_shares():
    data = _toy({"a": 600, "b": 300, "c": 100})
    sub = stratified_subsample(data, 100, seed=3)
    assert Counter(sub["label"]) == {"a": 60, "b": 30, "c": 10}
    assert stratified_subsample(data, 100, seed=3)["text_a"] == sub["text_a"]  # seeded
    assert stratified_subsample(data, 100, seed=4)["text_a"] != sub["text_a"]
    odd = stratified_subsample(_toy({"a": 5, "b": 5, "c": 5}), 7)
    assert len(odd) == 7 and sorted(Counter(odd["label"]).values()) == [2, 2, 3]
    assert len(stratified_subsample(data, 5000)) == len(data)


def test_sampler_counts_and_seed():
    pool = {"three": _toy({"x": 30, "y": 30, "z": 30}), "two": _toy({"p": 20, "q": 20})}
    sampler = FewShotSampler(pool, n_way=2, k_shot=4, q_query=3, seed=7)
    seen = set()
    for _ in range(20):
        episode = sampler.sample()
        seen.add(episode.task)
        assert episode.n_way == 2 and len(set(episode.classes)) == 2
        assert set(episode.classes) <= set(pool[episode.task]["label"])
        assert Counter(episode.support["label_id"]) == {0: 4, 1: 4}
        assert Counter(episode.query["label_id"]) == {0: 3, 1: 3}
        for part in (episode.support, episode.query):  # ids follow the class order
            assert all(
                episode.classes[i] == lab for i, lab in zip(part["label_id"], part["label"], strict=True)
            )
        assert not set(episode.support["text_a"]) & set(episode.query["text_a"])  # disjoint
    assert seen == {"three", "two"}
    a, b = FewShotSampler(pool, 2, 4, 3, seed=1).sample(), FewShotSampler(pool, 2, 4, 3, seed=1).sample()
    assert (a.task, a.classes, a.support["text_a"]) == (b.task, b.classes, b.support["text_a"])
    every = FewShotSampler(pool, n_way=None, k_shot=2, q_query=2, seed=0).sample("three")
    assert sorted(every.classes) == ["x", "y", "z"] and len(every.support) == 6


def test_sampler_rejects_too_many_classes():
    pool = {"two": _toy({"p": 20, "q": 20})}
    with pytest.raises(ValueError, match=r"Task 'two' has 2 labels .* fewer than n_way=3"):
        FewShotSampler(pool, n_way=3, k_shot=4, q_query=4)
    with pytest.raises(ValueError, match="fewer than n_way=2"):
        FewShotSampler(pool, n_way=2, k_shot=15, q_query=6)  # 21 > 20 examples per class
    with pytest.raises(ValueError, match="not in the sampler's pool"):
        FewShotSampler(pool, 2, 2, 2).sample("three")


def test_label_ids_refuses_unknown_labels():
    with pytest.raises(ValueError, match=r"Labels \['r'\] are not among"):
        label_ids(_toy({"p": 1, "r": 1}), ["p", "q"])
