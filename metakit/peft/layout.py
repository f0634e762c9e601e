"""Find the transformer layers, the backbone and the task head of a Hugging Face encoder.

Works by structure, not by class name, so BERT, RoBERTa, XLM-R, ELECTRA-style encoders, the e5
``BertModel``, their ``*For…`` task models and the same models wrapped by ``peft`` all resolve the
same way: an ``nn.ModuleList`` called ``<prefix>encoder.layer`` whose layers each have
``attention.output.dense``, ``attention.output.LayerNorm``, ``output.dense`` and ``output.LayerNorm``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from torch import nn

from metakit.peft.kinds import pe_globs
from metakit.spec import Spec, select

__all__ = ["EncoderLayout", "backbone_spec", "find_layout", "head_spec"]

#: Submodules every recognised transformer layer has (BERT's layout, shared by RoBERTa and XLM-R).
LAYER_PARTS = ("attention.output.dense", "attention.output.LayerNorm", "output.dense", "output.LayerNorm")


@dataclass(frozen=True)
class EncoderLayout:
    """Where the parts of a BERT-family encoder live, as dotted module paths.

    Args:
        backbone: the module holding ``embeddings`` and ``encoder`` (``""`` for a bare ``BertModel``).
        layers: the transformer layers, in order.
        task_model: the module holding the backbone and the task head, or ``None`` when the backbone is
            the whole model (no head).
    """

    backbone: str
    layers: tuple[str, ...]
    task_model: str | None

    def attention_output(self, index: int) -> str:
        """Path of layer ``index``'s attention output projection (``attention.output.dense``)."""
        return f"{self.layers[index]}.attention.output.dense"

    def ffn_output(self, index: int) -> str:
        """Path of layer ``index``'s feed-forward output projection (``output.dense``)."""
        return f"{self.layers[index]}.output.dense"

    def output_norm(self, index: int) -> str:
        """Path of layer ``index``'s last LayerNorm, whose output is the layer's output."""
        return f"{self.layers[index]}.output.LayerNorm"


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def find_layout(model: nn.Module) -> EncoderLayout:
    """Locate the encoder layers, backbone and task model of a BERT-family model.

    Raises:
        ValueError: the model has no (or more than one) recognisable encoder; the message says what
            was looked for and lists the module lists the model does have.
    """
    candidates = []
    module_lists = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        module_lists.append(name)
        if not (name == "encoder.layer" or name.endswith(".encoder.layer")) or len(module) == 0:
            continue
        if all(_has(layer, part) for layer in module for part in LAYER_PARTS):
            candidates.append(name)
    if len(candidates) != 1:
        found = "several: " + ", ".join(candidates) if candidates else "none"
        raise ValueError(
            f"metakit.peft cannot find the encoder layers of {type(model).__name__} (found {found}). It "
            "looks for one nn.ModuleList named '<prefix>encoder.layer' whose layers each have "
            f"{', '.join(LAYER_PARTS)} (the BERT / RoBERTa / XLM-R layout). Module lists in this model: "
            f"{module_lists[:8] or 'none'}. Use add_lora(model, targets=...) with explicit module "
            "patterns for other architectures."
        )
    layers_path = candidates[0]
    backbone = layers_path[: -len("encoder.layer")].rstrip(".")
    if not _has(model, _join(backbone, "embeddings")):
        raise ValueError(
            f"{type(model).__name__} has encoder layers at {layers_path!r} but no "
            f"{_join(backbone, 'embeddings')!r} beside them; metakit.peft expects the BERT layout "
            "(embeddings + encoder under one backbone module)."
        )
    n_layers = len(model.get_submodule(layers_path))
    layers = tuple(f"{layers_path}.{i}" for i in range(n_layers))
    task_model = backbone.rpartition(".")[0] if backbone else None
    return EncoderLayout(backbone=backbone, layers=layers, task_model=task_model)


def head_spec(model: nn.Module) -> Spec:
    """The task head: parameters of the task model outside the backbone (e.g. ``classifier.*``).

    For a model wrapped by ``peft`` with ``modules_to_save`` (its default for token and sequence
    classification), the trained copy is selected and the frozen ``original_module`` is not.

    Raises:
        ValueError: the model is a bare encoder (e.g. ``BertModel``) with no head.
    """
    layout = find_layout(model)
    if layout.task_model is None:
        raise ValueError(
            f"{type(model).__name__} is a bare encoder with no task head; use a *ForTokenClassification "
            "(or *ForSequenceClassification) model, or select your own head's parameters with metakit.select()."
        )
    task = model.get_submodule(layout.task_model)
    backbone_child = layout.backbone.rpartition(".")[2]
    globs = [
        f"{_join(layout.task_model, child)}.*"
        for child, module in task.named_children()
        if child != backbone_child and any(True for _ in module.parameters())
    ]
    if not globs:
        raise ValueError(
            f"{type(model).__name__} has no parameters outside its backbone {layout.backbone!r}, so it has "
            "no task head to select."
        )
    spec = select(*globs)
    if any(".original_module." in name for name in spec.names(model)):
        spec = spec - select("*.original_module.*")
    return spec


def backbone_spec(model: nn.Module) -> Spec:
    """The pretrained backbone: parameters under the backbone module that no PE kind added.

    What a PE kind adds is read from the kinds' own declarations (`metakit.peft.pe_globs`).
    """
    layout = find_layout(model)
    inside = select(f"{layout.backbone}.*") if layout.backbone else select("*")
    return inside - select(*pe_globs())


def __getattr__(name: str):
    if name == "PE_GLOBS":
        warnings.warn(
            "metakit.peft.layout.PE_GLOBS is deprecated: PE kinds declare their own parameter names; "
            "use metakit.peft.pe_globs() (or pe_spec()).",
            DeprecationWarning,
            stacklevel=2,
        )
        return pe_globs()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
