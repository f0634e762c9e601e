"""TARP (g1) and TARP+TAMS (g2) as few-shot settings (issue 15 item 5), on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metakit.experiments.data.episodes import label_ids
from metakit.experiments.data.glue_meta import DEFAULT_GLUE_META_DIR
from metakit.experiments.data.leopard import DEFAULT_LEOPARD_DIR
from metakit.experiments.fewshot.config import load_fewshot_config
from metakit.experiments.fewshot.data import episode_batch
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS
from metakit.experiments.fewshot.tune import finetune_episode
from metakit.experiments.fewshot.unit import FewShotResources, run_unit

pytestmark = pytest.mark.skipif(
    not (Path(DEFAULT_LEOPARD_DIR).is_dir() and Path(DEFAULT_GLUE_META_DIR).is_dir()),
    reason="../shared/data/leopard or glue-meta absent",
)

TARP, TAMS = FEWSHOT_SETTINGS["meta_tarp"], FEWSHOT_SETTINGS["meta_tams"]


@pytest.fixture(scope="module")
def tiny():
    config = load_fewshot_config("tiny", overrides={"settings": ["meta_tarp", "meta_tams"]})
    return config, FewShotResources(config)


def _changed_by_finetuning(config, resources, setting, state):
    """Names of the parameters one episode's fine-tuning changes, and the tuned spec's names."""
    model, groups = resources.backbone.build(setting, config.seed, state)
    if groups.controller is not None:
        groups.controller.discretize()
        groups.pe = groups.controller.inner
    train = resources.episode("scitail", 4, 0)
    classes = sorted(set(train["label"]))
    support = episode_batch(
        resources.backbone.tokenizer, label_ids(train, classes), config.max_length, config.text_prefix
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = groups.tuned(setting)
    finetune_episode(
        model, tuned, support, steps=5, batch_size=8, lr=1e-2, seed=0, head_only=False,
        eval_batch_size=config.eval_batch_size,
    )  # fmt: skip
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return model, groups, changed, set(tuned.names(model))


def test_tarp_meta_trains_its_factors_and_tunes_only_task_factors(tiny):
    config, resources = tiny
    fresh = dict(resources.backbone.build(TARP, config.seed)[0].named_parameters())
    state = resources.meta_state(TARP)
    # meta-training learns every TARP tensor (task factors' start, shared factors, generator), nothing else
    assert state and all(".tarp." in name for name in state)
    assert any(".tarp.task_" in n for n in state) and any(".tarp.shared_" in n for n in state)
    assert any(not torch.equal(value, fresh[name]) for name, value in state.items())
    _, _, changed, tuned = _changed_by_finetuning(config, resources, TARP, state)
    assert tuned and all(".tarp.task_" in n or n.startswith("head.") for n in tuned)
    assert changed and changed <= tuned  # the shared factors and the generator stay as meta-learned
    assert any(".tarp.task_" in n for n in changed)


def test_tams_discretizes_the_meta_learned_structure_before_fine_tuning(tiny):
    config, resources = tiny
    state = resources.meta_state(TAMS)
    alphas = {n: v for n, v in state.items() if n.endswith("tams_alpha")}
    assert alphas and any(v.abs().sum() > 0 for v in alphas.values())  # meta-gradients reached them
    structure = resources.meta_logs["meta_tams"]["structure"]
    expected = {
        n.removesuffix(".tams_alpha"): config.tams_candidates[int(torch.argmax(v))] for n, v in alphas.items()
    }
    assert structure == expected
    model, _, changed, tuned = _changed_by_finetuning(config, resources, TAMS, state)
    assert not any("tams_alpha" in n for n, _ in model.named_parameters())
    for layer, choice in structure.items():
        names = [n for n, _ in model.named_parameters() if n.startswith(layer + ".")]
        if choice != "adapter":
            assert not any(".adapter." in n for n in names)
        if choice != "tarp":
            assert not any(".tarp." in n for n in names)
    assert changed and changed <= tuned
    assert all(n.startswith("head.") or ".adapter." in n or ".tarp.task_" in n for n in tuned)


def test_tarp_settings_run_under_the_meta_adapters_budget(tiny):
    config, resources = tiny
    for setting in ("meta_tarp", "meta_tams"):
        result = run_unit(config, setting, "political_message", 4, 0, resources=resources)
        assert 0.0 <= result["accuracy"] <= 1.0 and 0 < result["tuned_fraction"] < 1
        assert len(resources.meta_logs[setting]["query_loss"]) == config.meta_steps


def test_bad_tams_candidates_are_refused():
    with pytest.raises(ValueError, match="tams_candidates must name at least one of"):
        load_fewshot_config("tiny", overrides={"tams_candidates": ["frozen", "lstm"]})
    with pytest.raises(ValueError, match="tarp_rank must be >= 1"):
        load_fewshot_config("tiny", overrides={"tarp_rank": 0})


def test_arch_lr_gives_the_architecture_weights_their_own_rate(tiny):
    """AdamW moves each weight by about its rate per step, so 20x the rate moves α about 20x as far."""
    import dataclasses

    config, _ = tiny
    moved = {}
    for arch_lr in (None, 20 * config.outer_lr):
        faster = dataclasses.replace(config, arch_lr=arch_lr)
        state = FewShotResources(faster).meta_state(TAMS)
        moved[arch_lr] = max(float(v.abs().max()) for n, v in state.items() if n.endswith("tams_alpha"))
    assert moved[None] > 0 and moved[20 * config.outer_lr] > 5 * moved[None]
    with pytest.raises(ValueError, match="arch_lr must be > 0"):
        load_fewshot_config("tiny", overrides={"arch_lr": 0.0})
