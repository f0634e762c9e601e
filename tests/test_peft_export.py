"""export_peft: meta-learned LoRA round-trips through peft.PeftModel.from_pretrained with equal outputs."""

import json

import peft
import pytest
import torch
from transformers import BertConfig, BertForTokenClassification

import metakit as mk
from metakit.peft import add_houlsby_adapters, add_lora, add_top_adapter, head_spec
from metakit.peft.export import export_peft

CONFIG = BertConfig(
    vocab_size=60,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    num_labels=3,
    attn_implementation="eager",
)


def _base(state=None):
    torch.manual_seed(0)
    model = BertForTokenClassification(CONFIG)
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def _inputs():
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": torch.randint(0, 60, (2, 7), generator=generator),
        "attention_mask": torch.ones(2, 7, dtype=torch.long),
    }


def _perturb(model, spec, scale=0.2, seed=1):
    """Move the selected tensors away from their init, as meta-learning would (B = 0 hides bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in spec.names(model):
            param = model.get_parameter(name)
            param.add_(scale * torch.randn(param.shape, generator=generator))


def _logits(model, **kwargs):
    with torch.no_grad():
        return model(**_inputs(), **kwargs).logits


def test_metakit_lora_and_head_round_trip_with_equal_outputs(tmp_path):
    model = _base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, rank=4, alpha=8)
    head = head_spec(model)
    _perturb(model, lora | head)
    expected = _logits(model.eval())

    export_peft(model, tmp_path, head=head, task_type="TOKEN_CLS")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["modules_to_save"] == ["classifier"] and config["rank_pattern"] == {}

    loaded = peft.PeftModel.from_pretrained(_base(original), tmp_path).eval()
    assert isinstance(loaded, peft.PeftModelForTokenClassification)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
    # The adapter matters: without it the outputs differ.
    assert (_logits(_base(original)) - expected).abs().max() > 1e-2


def test_layers_with_different_ranks_and_scales_use_peft_patterns(tmp_path):
    model = _base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, targets="*.query", rank=2, alpha=4) | add_lora(
        model, targets="*.value", rank=4, alpha=16
    )
    lora = lora | add_lora(model, targets="*.layer.1.output.dense", rank=4, alpha=3)
    _perturb(model, lora)
    expected = _logits(model.eval())

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16 and config["task_type"] is None
    assert set(config["rank_pattern"].values()) == {2} and len(config["rank_pattern"]) == 2
    assert sorted(config["alpha_pattern"].values()) == [3, 4, 4]

    loaded = peft.PeftModel.from_pretrained(_base(original), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)


def test_adapted_params_are_exported_instead_of_the_modules_own(tmp_path):
    model = _base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, rank=4, alpha=8)
    _perturb(model, lora)
    adapted = {name: model.get_parameter(name).detach() + 0.1 for name in lora.names(model)}
    with torch.no_grad():
        expected = mk.bind(model.eval(), adapted)(**_inputs()).logits

    export_peft(model, tmp_path, params=adapted)
    loaded = peft.PeftModel.from_pretrained(_base(original), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
    with pytest.raises(KeyError, match="not parameters"):
        export_peft(model, tmp_path, params={"nosuch.lora_A": torch.zeros(1)})


def test_primed_backbone_is_saved_as_the_base_beside_the_adapter(tmp_path):
    model = _base()
    lora = add_lora(model, rank=4, alpha=8)
    _perturb(model, lora | mk.select("bert.encoder.*.dense.weight"))  # priming meta-learns the backbone
    expected = _logits(model.eval())

    export_peft(model, tmp_path / "adapter", base_dir=tmp_path / "base", task_type="TOKEN_CLS")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    base = BertForTokenClassification.from_pretrained(tmp_path / "base")
    assert not any("lora" in name for name in base.state_dict())
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)


def test_peft_wrapped_model_exports_meta_learned_values(tmp_path):
    model = _base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    wrapped = peft.get_peft_model(
        model, peft.LoraConfig(task_type="TOKEN_CLS", target_modules=["query", "value"], r=4, lora_alpha=8)
    )
    lora = mk.peft.peft_params(wrapped)
    _perturb(wrapped, lora | head_spec(wrapped))
    adapted = {name: wrapped.get_parameter(name).detach() * 1.5 for name in lora.names(wrapped)}
    with torch.no_grad():
        expected = mk.bind(wrapped.eval(), adapted)(**_inputs()).logits

    export_peft(wrapped, tmp_path, params=adapted)
    loaded = peft.PeftModel.from_pretrained(_base(original), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="keeps its own config"):
        export_peft(wrapped, tmp_path, task_type="TOKEN_CLS")


@pytest.mark.parametrize("insert", [add_houlsby_adapters, add_top_adapter])
def test_bottleneck_adapters_are_refused_with_a_clear_error(tmp_path, insert):
    model = _base()
    add_lora(model)
    insert(model, bottleneck=4)
    with pytest.raises(ValueError, match=r"bottleneck adapters .*peft has no tuner .*save_pe"):
        export_peft(model, tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_a_model_without_lora_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no LoRA layers; add them with metakit\.peft\.add_lora"):
        export_peft(_base(), tmp_path)


def test_a_scale_not_stored_as_a_number_is_measured_from_the_layer(tmp_path):
    model = _base()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora = add_lora(model, rank=4, alpha=8)
    _perturb(model, lora)
    for module in model.modules():
        if isinstance(module, mk.peft.PELinear) and module.lora_A is not None:
            module.lora_scale = torch.tensor(0.75)  # e.g. a refactored layer that keeps it as a tensor
    expected = _logits(model.eval())

    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == pytest.approx(3.0, abs=1e-5)
    assert config["alpha_pattern"] == {}
    loaded = peft.PeftModel.from_pretrained(_base(original), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)
