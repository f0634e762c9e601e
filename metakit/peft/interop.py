"""Select the PE parameters of a model wrapped by the third-party ``peft`` library.

Example:
    >>> import peft, metakit as mk
    >>> from metakit.peft import backbone_spec, head_spec, peft_params
    >>> model = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", target_modules=["query", "value"]))  # doctest: +SKIP
    >>> lora, head = peft_params(model), head_spec(model)  # doctest: +SKIP
    >>> for name in backbone_spec(model).names(model):  # doctest: +SKIP
    ...     model.get_parameter(name).requires_grad_(True)  # priming meta-learns the backbone
    >>> learner = mk.recipes.priming(model, loss_fn, pe=lora, head=head, inner_lr=0.03, steps=5)  # doctest: +SKIP

``peft.get_peft_model`` sets ``requires_grad=False`` on the backbone, and a ``MetaLearner`` leaves
frozen parameters out of both sets: unfreeze the backbone as above for priming; leave it frozen to
meta-learn only LoRA + head (Meta-Adapters style).
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from metakit.peft._specs import exact_spec
from metakit.peft.kinds import PEKind
from metakit.spec import Spec

__all__ = ["PEFT_INSTALL", "PeftLibraryLoRA", "peft_params"]


class PeftLibraryLoRA(PEKind):
    """The ``peft`` library's LoRA/DoRA tensors (``...lora_A.default.weight``); peft runs them itself."""

    name = "peft_lora"
    param_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


PEFT_INSTALL = "pip install 'peft>=0.11'  (or: pip install 'metakit[peft]')"


def import_peft() -> ModuleType:
    """Import the third-party ``peft`` library, or raise an ``ImportError`` with the pip line."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"metakit.peft.peft_params needs the peft library: {PEFT_INSTALL}") from err
    return peft


def peft_params(model: nn.Module, adapter_name: str | None = None) -> Spec:
    """A spec over the tuner parameters (e.g. LoRA's ``lora_A``/``lora_B``) of a peft-wrapped model.

    Args:
        model: a model returned by ``peft.get_peft_model`` (or containing peft tuner layers).
        adapter_name: the adapter to select; ``None`` selects each layer's active adapters.

    Returns:
        A spec such as ``select('*.lora_A.default.*', '*.lora_B.default.*')``, exact for this model.
        The head's trained copy (``modules_to_save``) is not included: add `head_spec`.

    Raises:
        ValueError: the model has no peft tuner layer, or none with that adapter.
    """
    import_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    added: list[str] = []
    globs: set[str] = set()
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        wanted = [adapter_name] if adapter_name is not None else list(module.active_adapters)
        for layer_name in module.adapter_layer_names:
            container = getattr(module, layer_name, None)
            if container is None:
                continue
            for key in wanted:
                if key not in container:
                    continue
                prefix = f"{path}.{layer_name}.{key}"
                value = container[key]
                if isinstance(value, nn.Module):
                    names = [f"{prefix}.{n}" for n, _ in value.named_parameters()]
                    globs.add(f"*.{layer_name}.{key}.*")
                else:
                    names = [prefix]
                    globs.add(f"*.{layer_name}.{key}")
                added += names
    if not added:
        which = f"adapter {adapter_name!r}" if adapter_name is not None else "active adapters"
        raise ValueError(
            f"{type(model).__name__} has no peft tuner parameters ({which}); wrap the model with "
            "peft.get_peft_model(model, peft.LoraConfig(...)) first, or use metakit.peft.add_lora()."
        )
    return exact_spec(model, added, *sorted(globs))
