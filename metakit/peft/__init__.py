"""Parameter-efficient modules for meta-learning Hugging Face encoders.

Each insertion modifies the model in place and returns the `Spec` that selects
exactly what it added, so inner/outer groups are written as spec algebra:

Example:
    >>> from transformers import BertConfig, BertForTokenClassification
    >>> from metakit.peft import add_top_adapter, head_spec, backbone_spec
    >>> model = BertForTokenClassification(BertConfig(num_hidden_layers=2, hidden_size=32,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3))
    >>> adapter = add_top_adapter(model, bottleneck=8)
    >>> adapter
    select('*.top_adapter.*')
    >>> head_spec(model)
    select('classifier.*')

Models wrapped by the ``peft`` library: `peft_params`. Persisting a task's PE parameters and
head: `save_pe` / `load_pe`. "Meta-Learning the Difference" (Hou et al., 2022): TARP
(`add_tarp`, a dynamic low-rank reparameterization) and TAMS (`add_tams`, a DARTS-style
controller over candidate sublayer structures; `metakit.recipes.tams` wires both).

Every PE kind declares the parameter names it adds (`PEKind`); `pe_spec` /
`pe_globs` and `backbone_spec` are built from those declarations.
"""

from metakit.peft.adapters import HoulsbyAdapter, add_houlsby_adapters, add_top_adapter
from metakit.peft.cuts import feature_cut
from metakit.peft.export import export_peft
from metakit.peft.interop import peft_params
from metakit.peft.io import load_pe, save_pe
from metakit.peft.kinds import PEKind, pe_globs, pe_kinds, pe_spec
from metakit.peft.layout import EncoderLayout, backbone_spec, find_layout, head_spec
from metakit.peft.lora import DEFAULT_LORA_TARGETS, LoRA, add_lora
from metakit.peft.modules import AdaptedLayerNorm, BottleneckAdapter, PELinear, TopAdapter
from metakit.peft.tams import DEFAULT_TAMS_CANDIDATES, TAMS, TamsController, add_tams
from metakit.peft.tarp import DEFAULT_TARP_TARGETS, TARP, TarpFactors, TarpSpecs, add_tarp

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_TAMS_CANDIDATES",
    "DEFAULT_TARP_TARGETS",
    "TAMS",
    "TARP",
    "AdaptedLayerNorm",
    "BottleneckAdapter",
    "EncoderLayout",
    "HoulsbyAdapter",
    "LoRA",
    "PEKind",
    "PELinear",
    "TamsController",
    "TarpFactors",
    "TarpSpecs",
    "TopAdapter",
    "add_houlsby_adapters",
    "add_lora",
    "add_tams",
    "add_tarp",
    "add_top_adapter",
    "backbone_spec",
    "export_peft",
    "feature_cut",
    "find_layout",
    "head_spec",
    "load_pe",
    "pe_globs",
    "pe_kinds",
    "pe_spec",
    "peft_params",
    "save_pe",
]
