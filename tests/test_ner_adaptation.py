"""Does the inner loop adapt? Meta priming measures the query loss before and after adaptation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_ner_pipeline import data_dir  # noqa: F401 - a fixture

from metakit.experiments.config import load_config
from metakit.experiments.data import encode_ner, load_wikiann
from metakit.experiments.model import Backbone
from metakit.experiments.priming import _MetaPriming
from metakit.experiments.settings import SETTINGS
from metakit.experiments.tagger import token_loss


def meta_priming(data_dir: Path, log_dir: Path, inner_lr: float) -> _MetaPriming:  # noqa: F811
    config = load_config("tiny", overrides={"data_dir": str(data_dir), "inner_lr": inner_lr})
    sources = {lang: load_wikiann(lang, "train", data_dir) for lang in config.sources}
    backbone = Backbone(config, tiny_words=(w for ds in sources.values() for s in ds["tokens"] for w in s))
    encoded = {lang: encode_ner(ds, backbone.tokenizer, config.max_length) for lang, ds in sources.items()}
    tagger, groups = backbone.build(SETTINGS[4], seed=0)
    tagger.eval()  # no dropout: before and after differ only by what the inner loop did
    return _MetaPriming(tagger, groups, SETTINGS[4], config, encoded, backbone.tokenizer, 0, log_dir)


def test_pre_adaptation_loss_is_the_query_loss_of_the_unadapted_model(data_dir, tmp_path):  # noqa: F811
    loop = meta_priming(data_dir, tmp_path / "tb", inner_lr=1e-12)
    tasks = loop.sampler.sample()
    loop.sampler.load_state_dict({"random": random.Random(0).getstate()})  # the same tasks again
    with torch.no_grad():
        expected = torch.stack([token_loss(loop.tagger, t.query) for t in tasks]).mean()
    post = loop.step(0)
    summary = loop.summary()
    assert summary["pre_query_loss"] == pytest.approx(float(expected), rel=1e-6)
    # inner_lr ~ 0: the inner loop changes nothing, so there is nothing to gain
    assert summary["post_query_loss"] == post == pytest.approx(summary["pre_query_loss"], rel=1e-6)
    assert summary["adaptation_gain"] == pytest.approx(0.0, abs=1e-6)
    loop.close()


def test_a_working_inner_loop_shows_a_gain_in_results_and_tensorboard(data_dir, tmp_path):  # noqa: F811
    loop = meta_priming(data_dir, tmp_path / "tb", inner_lr=0.5)
    for step in range(3):
        loop.step(step)
    summary = loop.summary()
    # The fixture's support and query sentences share names and places: adapting on one helps the other.
    assert summary["adaptation_gain"] > 0.05
    assert summary["relative_adaptation_gain"] == pytest.approx(
        summary["adaptation_gain"] / summary["pre_query_loss"]
    )
    loop.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"adaptation/query_loss_before", "meta/query_loss", "adaptation/gain"} <= tags
    assert "adaptation/query_loss_after" not in tags  # it would repeat meta/query_loss
    gains = [e.value for e in events.Scalars("adaptation/gain")]
    assert len(gains) == 3 and sum(gains) / 3 == pytest.approx(summary["adaptation_gain"], rel=1e-5)
