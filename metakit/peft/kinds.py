"""PE kinds: each parameter-efficient modification declares the parameter names it adds, once.

A kind is a small class, like peft's tuner layers with their ``adapter_layer_names``: it names the
attributes it adds to the layer it modifies (``param_names``) and says how it changes that layer's
output (`PEKind.apply`). Declaring a subclass registers it, and every spec that must tell PE
parameters from the backbone (`pe_spec`, `metakit.peft.backbone_spec`) is built from the
registry, so a new PE kind is one new module and cannot be silently counted as backbone.

Example:
    >>> from metakit.peft import pe_kinds
    >>> pe_kinds()["lora"].param_names
    ('lora_A', 'lora_B')
    >>> pe_kinds()["lora"].globs()
    ('*.lora_A', '*.lora_A.*', '*.lora_B', '*.lora_B.*')

A new kind (see CONTRIBUTING, "Add a parameter-efficient module")::

    class Scale(PEKind):
        '''Multiply a linear layer's output by a learned per-feature gain.'''
        name = "scale"
        param_names = ("gain",)

        @staticmethod
        def apply(layer, x, y):
            return y * layer.gain
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from metakit.spec import Spec, select

__all__ = [
    "MIX",
    "OUTPUT",
    "REPARAMETERIZE",
    "PEKind",
    "pe_globs",
    "pe_kind",
    "pe_kinds",
    "pe_names",
    "pe_spec",
]

#: Stages order the kinds on one layer: reparameterizations of ``W x`` first, then a TAMS mixture,
#: then transforms of the layer's output (the pre-refactor ``PELinear``: LoRA inside the adapter).
REPARAMETERIZE, MIX, OUTPUT = 0, 1, 2

_REGISTRY: dict[str, type[PEKind]] = {}


class PEKind:
    """A parameter-efficient modification; subclasses declare ``name`` and ``param_names``.

    Attributes:
        name: short identifier (``"lora"``, ``"houlsby"``, ``"tarp"``, ...), unique in the registry.
        param_names: attribute names this kind adds to the module it modifies: parameters (LoRA's
            ``lora_A``) or submodules (the Houlsby ``adapter``). Every parameter whose dotted name has
            one of them as a segment is a PE parameter, never backbone or head.
        stage: where `PELinear` applies it (``REPARAMETERIZE``, ``MIX``,
            ``OUTPUT``); only kinds hosted by ``PELinear`` use it.
    """

    name: ClassVar[str]
    param_names: ClassVar[tuple[str, ...]]
    stage: ClassVar[int] = OUTPUT

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        names = cls.__dict__.get("param_names")
        if not isinstance(name, str) or not name:
            raise TypeError(f"PE kind {cls.__qualname__} must declare a non-empty str `name`.")
        if (
            not isinstance(names, tuple)
            or not names
            or not all(isinstance(n, str) and n and "." not in n and "*" not in n for n in names)
        ):
            raise TypeError(
                f"PE kind {cls.__qualname__} must declare `param_names`, a non-empty tuple of attribute "
                f"names without dots or wildcards (e.g. ('lora_A', 'lora_B')), got {names!r}; without "
                "it its parameters would be counted as backbone."
            )
        _REGISTRY[name] = cls

    @classmethod
    def globs(cls) -> tuple[str, ...]:
        """Globs over dotted parameter names that match what this kind adds (``*.n`` and ``*.n.*``)."""
        return tuple(glob for n in cls.param_names for glob in (f"*.{n}", f"*.{n}.*"))

    @classmethod
    def spec(cls) -> Spec:
        """The spec of every parameter of this kind, in any model."""
        return select(*cls.globs())

    @classmethod
    def describe(cls, layer: nn.Module) -> str:
        """A short description of this kind on ``layer`` for the layer's ``repr``."""
        return cls.name

    @staticmethod
    def apply(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output after this kind, given its input ``x`` and the output so far ``y``."""
        raise NotImplementedError


def pe_kinds() -> dict[str, type[PEKind]]:
    """Every registered PE kind, by name (a copy)."""
    return dict(_REGISTRY)


def pe_kind(name: str) -> type[PEKind]:
    """The registered kind called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no PE kind {name!r} is registered; known: {sorted(_REGISTRY)}.") from None


def pe_names() -> frozenset[str]:
    """Every attribute name a registered kind adds (e.g. ``lora_A``, ``adapter``, ``tarp``)."""
    return frozenset(n for kind in _REGISTRY.values() for n in kind.param_names)


def pe_globs() -> tuple[str, ...]:
    """Globs matching every parameter any registered PE kind adds, sorted (replaces ``PE_GLOBS``)."""
    return tuple(sorted({glob for kind in _REGISTRY.values() for glob in kind.globs()}))


def pe_spec() -> Spec:
    """The spec of every parameter any registered PE kind adds."""
    return select(*pe_globs())


def inside_pe_module(module_name: str) -> bool:
    """Whether a dotted module name lies inside something a PE kind added (e.g. ``....adapter.down``)."""
    names = pe_names()
    return any(part in names for part in module_name.split("."))
