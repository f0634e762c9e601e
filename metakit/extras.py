"""Optional dependencies: the core needs torch and torchopt only; the rest comes with an extra.

`require` imports a package that an extra provides, or raises `MissingExtraError` with
one line naming the ``pip install`` that brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: The extras by name and the packages each brings (``pyproject.toml`` is the source of truth).
EXTRAS = {
    "hf": ("transformers", "safetensors", "peft"),
    "tensorboard": ("tensorboard",),
    "experiments": ("datasets", "seqeval", "sklearn", "scipy", "tqdm", "yaml", "matplotlib", "tensorboard"),
    "bench": ("matplotlib", "psutil", "tqdm", "transformers"),
}


class MissingExtraError(ImportError):
    """A part of metakit needs a package that the core install does not bring."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or one line naming the extra that installs it.

    Args:
        module: the package to import (e.g. ``"safetensors.torch"``).
        extra: the metakit extra that brings it (e.g. ``"hf"``).
        what: the part of metakit that needs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = module.split(".")[0]
        raise MissingExtraError(
            f"{what} needs {missing}, which the core install does not include: pip install 'metakit[{extra}]'"
        ) from error
