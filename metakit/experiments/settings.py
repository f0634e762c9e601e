"""The seven settings of the priming paper's Table 1: what priming runs first, what fine-tuning updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["SETTINGS", "Setting"]


@dataclass(frozen=True)
class Setting:
    """One row of Table 1.

    Attributes:
        number: the row number (1–7).
        name: the row's label.
        priming: ``None``, ``"meta"`` (Algorithm 1), ``"finetune"`` (θp ∪ θa ∪ θh on the sources) or
            ``"maml_loop"`` (Algorithm 1 whose inner loop also updates θp).
        inner_steps: inner steps of meta priming (``None``: the config's ``inner_steps``).
        tune: what target fine-tuning updates: ``"full"`` (θp ∪ θh), ``"head"`` (θh), ``"adapter"`` (θa ∪ θh).
    """

    number: int
    name: str
    priming: Literal["meta", "finetune", "maml_loop"] | None
    tune: Literal["full", "head", "adapter"]
    inner_steps: int | None = None

    @property
    def slug(self) -> str:
        """A short name for run folders, e.g. ``"s4-meta-priming"`` (TensorBoard lists runs by it)."""
        return f"s{self.number}-{_SLUGS.get(self.number, 'setting')}"

    @property
    def has_adapter(self) -> bool:
        """Whether the model carries the top adapter (everything but full and head tuning)."""
        return self.tune == "adapter"


_SLUGS = {
    1: "full-ft",
    2: "head",
    3: "adapter",
    4: "meta-priming",
    5: "ft-priming",
    6: "maml-loop-priming",
    7: "meta-priming-1-step",
}

SETTINGS: dict[int, Setting] = {
    1: Setting(1, "Full fine-tuning", None, "full"),
    2: Setting(2, "Head tuning", None, "head"),
    3: Setting(3, "Adapter tuning", None, "adapter"),
    4: Setting(4, "Meta priming → adapter tuning", "meta", "adapter"),
    5: Setting(5, "Fine-tuning priming → adapter tuning", "finetune", "adapter"),
    6: Setting(6, "Priming with MAML loop → adapter tuning", "maml_loop", "adapter"),
    7: Setting(7, "Priming with 1 inner step → adapter tuning", "meta", "adapter", inner_steps=1),
}
