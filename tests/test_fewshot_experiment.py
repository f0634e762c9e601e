"""The few-shot experiment core on the tiny model: every setting through run_unit, presets, bad input."""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import pytest
import torch

from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR
from metakit.experiments.data.leopard import DEFAULT_LEOPARD_DIR, EmptyEpisodeError
from metakit.experiments.fewshot.config import FEWSHOT_PRESETS, load_fewshot_config
from metakit.experiments.fewshot.hparams import choose_finetune_lrs
from metakit.experiments.fewshot.report import fewshot_table, paired_comparison
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.fewshot.unit import FewShotResources, fewshot_units, run_unit, score

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_LEOPARD_DIR).is_dir() and Path(DEFAULT_GLUE_META_DIR).is_dir()),
    reason="../shared/data/leopard or glue-meta absent",
)


@pytest.fixture(scope="module")
def tiny():
    config = load_fewshot_config("tiny")
    return config, FewShotResources(config)


@pytest.mark.parametrize("setting", list(FEWSHOT_SETTINGS))
def test_every_setting_runs_end_to_end(tiny, setting):
    config, resources = tiny
    for task in config.tasks:
        result = run_unit(config, setting, task, 4, 0, resources=resources)
        test = resources.test(task)
        assert (result["setting"], result["task"], result["k"], result["episode"]) == (setting, task, 4, 0)
        assert result["n_test"] == len(test) == result["n_scored"] == len(result["predictions"])
        assert result["unseen_test_labels"] == {}
        assert set(result["predictions"]) <= set(result["classes"]) == set(test["label"])
        assert result["gold"] == list(test["label"])
        hits = sum(p == g for p, g in zip(result["predictions"], result["gold"], strict=True))
        assert result["accuracy"] == pytest.approx(hits / len(test))
        assert 0.0 <= result["macro_f1"] <= 1.0
        assert math.isfinite(result["ft_final_loss"]) and result["ft_steps"] == config.ft_steps
        assert 0.0 < result["tuned_fraction"] <= 1.0


def test_tuned_fractions_follow_the_settings(tiny):
    config, resources = tiny
    share = {
        s: run_unit(config, s, "scitail", 4, 0, resources=resources)["tuned_fraction"]
        for s in FEWSHOT_SETTINGS
    }
    assert share["head"] < share["lora"] < share["adapters"] < share["full"]
    assert (
        share["adapters"] == share["meta_adapters"] == share["priming"]
        and share["lora"] == share["meta_lora"]
    )


def test_meta_training_changes_only_what_the_setting_learns(tiny):
    config, resources = tiny
    fresh = {
        s: resources.backbone.build(FEWSHOT_SETTINGS[s], config.seed)[0] for s in ("meta_adapters", "priming")
    }
    adapters = resources.meta_state(FEWSHOT_SETTINGS["meta_adapters"])
    assert adapters and all(".adapter." in name for name in adapters)
    before = dict(fresh["meta_adapters"].named_parameters())
    assert any(not torch.equal(value, before[name]) for name, value in adapters.items())
    primed = resources.meta_state(FEWSHOT_SETTINGS["priming"])
    assert any(".adapter." in n for n in primed) and any(
        n.startswith("encoder.encoder.layer") for n in primed
    )
    assert not any(n.startswith("head.") or "word_embeddings" in n for n in primed)
    lora = resources.meta_state(FEWSHOT_SETTINGS["meta_lora"])
    assert lora and all(n.endswith(("lora_A", "lora_B")) for n in lora)
    log = resources.meta_logs["meta_adapters"]
    assert len(log["query_loss"]) == config.meta_steps and all(math.isfinite(v) for v in log["query_loss"])
    assert all(math.isfinite(v) for v in log["inner_loss_first"] + log["inner_loss_last"])
    assert math.isfinite(log["dev_query_loss_before"]) and math.isfinite(log["dev_query_loss_after"])


def test_fine_tuning_fits_the_support_set(tiny):
    config, resources = tiny
    # the random tiny encoder's sentence encodings are close together: full batches, high rates
    longer = dataclasses.replace(
        config, ft_steps=100, ft_batch_size=64, ft_lr_head=0.1, ft_lr_pe=1e-2, ft_lr_full=1e-3
    )
    for setting, bound in (("head", 0.5), ("adapters", 0.9), ("full", 0.8)):  # seen: 0.3, 0.74, 0.57
        result = run_unit(longer, setting, "political_message", 4, 0, resources=resources)
        assert result["ft_final_loss"] < bound * result["ft_initial_loss"], setting


def test_units_skip_the_empty_episode(tiny, caplog):
    _, resources = tiny
    config = load_fewshot_config("tiny", overrides={"tasks": ["disaster"], "shots": [16], "episodes": [0, 1]})
    fresh = FewShotResources(config)
    with caplog.at_level(logging.WARNING, logger="metakit.experiments.fewshot.unit"):
        units = list(fewshot_units(config, fresh))
    assert {(t, k, e) for _, t, k, e in units} == {("disaster", 16, 1)}
    assert fresh.skipped == [("disaster", 16, 0)]
    assert [r.getMessage() for r in caplog.records] == [
        "Skipping LEOPARD disaster k=16 episode 0: its file is empty upstream."
    ]
    with pytest.raises(EmptyEpisodeError, match=r"disaster_train_0_16\.json is empty"):
        run_unit(config, "head", "disaster", 16, 0, resources=resources)


def test_unseen_test_labels_are_counted_not_scored():
    result = score(["a", "b", "z", "z", "y"], ["a", "a", "a", "b", "b"], ["a", "b"])
    assert result["unseen_test_labels"] == {"z": 2, "y": 1}
    assert result["n_scored"] == 2 and result["accuracy"] == 0.5
    assert result["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_learning_rates_are_chosen_on_the_pool_dev_sets(tiny):
    config, resources = tiny
    small = dataclasses.replace(config, hp_grid={"full": [1e-4], "head": [1e-3, 1e-2], "pe": [1e-3]})
    chosen = choose_finetune_lrs(
        small, resources, kinds=("head",), tasks=["SST-2"], k=2, episodes=1, dev_examples=20
    )
    assert chosen["lrs"]["ft_lr_head"] in (1e-3, 1e-2)
    assert set(chosen["accuracy"]["head"]) == {1e-3, 1e-2}
    assert all(0.0 <= v <= 1.0 for v in chosen["accuracy"]["head"].values())


def test_presets_and_bad_config():
    assert set(FEWSHOT_PRESETS) == {"paper", "cpu", "cpu-quick", "tiny"}
    cpu = load_fewshot_config("cpu")
    assert cpu.shots == [8, 16] and cpu.episodes == [0, 1] and cpu.max_length == 48 and len(cpu.tasks) == 12
    paper = load_fewshot_config("paper")
    assert paper.shots == [4, 8, 16] and len(paper.episodes) == 10 and paper.test_examples is None
    with pytest.raises(ValueError, match=r"shots \[5\] are not LEOPARD's"):
        load_fewshot_config("tiny", overrides={"shots": [5]})
    with pytest.raises(ValueError, match=r"Unknown tasks \['emotion'\]"):
        load_fewshot_config("tiny", overrides={"tasks": ["emotion"]})
    with pytest.raises(ValueError, match=r"Unknown config keys \['shot'\]"):
        load_fewshot_config("tiny", overrides={"shot": [4]})
    with pytest.raises(ValueError, match="Unknown few-shot setting"):
        run_unit(load_fewshot_config("tiny"), "maml", "scitail", 4, 0)


def test_missing_data_folder_is_named(tmp_path):
    config = load_fewshot_config("tiny", overrides={"leopard_dir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match=r"LEOPARD data folder .*nowhere.* does not exist"):
        run_unit(config, "head", "scitail", 4, 0)


def _unit(setting, task, k, episode, accuracy):
    return {"setting": setting, "task": task, "k": k, "episode": episode, "accuracy": accuracy}


def test_paired_comparison_by_hand():
    diffs = [0.1, 0.3, -0.1, 0.0]
    units = [_unit("adapters", "t", 8, e, 0.5) for e in range(4)]
    units += [_unit("meta_adapters", "t", 8, e, 0.5 + d) for e, d in enumerate(diffs)]
    units.append(_unit("meta_adapters", "t", 16, 0, 0.9))  # no partner: not a pair
    result = paired_comparison(units, "meta_adapters", "adapters")
    assert (result["pairs"], result["wins"], result["losses"], result["ties"]) == (4, 2, 1, 1)
    assert result["mean_difference"] == pytest.approx(0.075)
    sd = (sum((d - 0.075) ** 2 for d in diffs) / 3) ** 0.5
    half = 3.182446305284263 * sd / 2  # t(0.975, df=3) · sd / √4
    assert result["ci95"] == pytest.approx((0.075 - half, 0.075 + half))
    assert result["tasks"] == 1 and result["ci95_tasks"] is None  # one task: no interval over tasks
    # two tasks: the task-level interval is over the two per-task means (0.075 and 0.2)
    units += [_unit("adapters", "u", 8, e, 0.4) for e in range(2)]
    units += [_unit("meta_adapters", "u", 8, e, 0.4 + d) for e, d in enumerate([0.1, 0.3])]
    result = paired_comparison(units, "meta_adapters", "adapters")
    means = [0.075, 0.2]
    half = 12.706204736174698 * (abs(means[0] - means[1]) / 2**0.5) / 2**0.5  # t(0.975, df=1) · sd / √2
    assert result["tasks"] == 2 and result["ci95_tasks"] == pytest.approx((0.1375 - half, 0.1375 + half))


def test_fewshot_table_mean_and_std():
    units = [_unit("head", "scitail", 8, e, v) for e, v in enumerate([0.6, 0.8])]
    units += [_unit("full", "scitail", 8, 0, 0.7), _unit("full", "airline", 8, 0, float("nan"))]
    table = fewshot_table(units)
    assert "| (b) Prototype head only | – | 70.0 ± 14.1 | 70.0 |" in table
    assert "| (a) Full fine-tuning | – | 70.0 | 70.0 |" in table
    assert "1 unit(s) had no scorable test example" in table


def test_meta_training_is_checkpointed_and_reused(tmp_path):
    config = load_fewshot_config("tiny", overrides={"settings": ["meta_lora"], "tasks": ["scitail"]})
    setting = FEWSHOT_SETTINGS["meta_lora"]
    first = FewShotResources(config, checkpoint_dir=tmp_path)
    state = first.meta_state(setting)
    assert (tmp_path / "meta-meta_lora.pt").is_file() and "meta_lora" in first.meta_logs
    again = FewShotResources(config, checkpoint_dir=tmp_path)
    reloaded = again.meta_state(setting)
    assert again.meta_logs == {}  # loaded, not trained again
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[n], state[n]) for n in state)


def test_pool_dev_loss_scores_the_model_as_it_is_now(tiny):
    """The dev episodes' prototypes are recomputed at every evaluation, never cached from an older model."""
    import torchopt

    from metakit import recipes
    from metakit.experiments.data.episodes import FewShotSampler
    from metakit.experiments.fewshot.meta import DEV_EPISODE_SEED, pool_dev_loss, pool_task
    from metakit.prototype import prototype_loss
    from metakit.strategies import FirstOrder

    config, resources = tiny
    model, groups = resources.backbone.build(FEWSHOT_SETTINGS["meta_adapters"], config.seed)
    learner = recipes.meta_adapters(
        model, prototype_loss, adapters=groups.pe, head=groups.head, steps=2, strategy=FirstOrder(),
        optimizer=torchopt.sgd(lr=0.01),
    )  # fmt: skip

    def episodes():
        sampler = FewShotSampler(
            resources.pool_dev(), config.n_way, config.k_shot, config.q_query, seed=DEV_EPISODE_SEED
        )
        tokenizer = resources.backbone.tokenizer
        return [
            pool_task(tokenizer, sampler.sample(), config.max_length, config.text_prefix) for _ in range(2)
        ]

    fixed = episodes()
    before = pool_dev_loss(learner, fixed)
    assert math.isfinite(before) and before == pytest.approx(pool_dev_loss(learner, episodes()), rel=1e-6)
    names = set(groups.pe.names(model))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, value in model.named_parameters():
            if name in names:
                value.add_(0.5 * torch.randn(value.shape, generator=generator))
    after = pool_dev_loss(learner, fixed)
    assert abs(after - before) > 1e-4
    assert after == pytest.approx(pool_dev_loss(learner, episodes()), rel=1e-6)
