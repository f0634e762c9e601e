"""The few-shot settings (a)–(f): what is meta-trained on the pool first, what each episode tunes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["FEWSHOT_SETTINGS", "FewShotSetting"]


@dataclass(frozen=True)
class FewShotSetting:
    """One row of the few-shot table.

    Attributes:
        key: the name used in configs, results and on the command line.
        letter: the issue's label, (a)–(f).
        label: a readable name.
        pe: the parameter-efficient modules the model carries: ``"houlsby"``, ``"lora"`` or ``None``.
        meta: what runs on the meta-training pool first: ``"meta_adapters"`` (the PE modules meta-learned
            with the backbone frozen), ``"priming"`` (Algorithm 1: backbone and PE modules primed) or ``None``.
        tune: what each episode fine-tunes (always with the prototype head): ``"full"`` (encoder),
            ``"head"`` (nothing else) or ``"pe"`` (the PE modules).
    """

    key: str
    letter: str
    label: str
    pe: Literal["houlsby", "lora"] | None
    meta: Literal["meta_adapters", "priming"] | None
    tune: Literal["full", "head", "pe"]


FEWSHOT_SETTINGS: dict[str, FewShotSetting] = {
    s.key: s
    for s in (
        FewShotSetting("full", "a", "Full fine-tuning", None, None, "full"),
        FewShotSetting("head", "b", "Prototype head only", None, None, "head"),
        FewShotSetting("adapters", "c", "Houlsby adapters from scratch", "houlsby", None, "pe"),
        FewShotSetting("meta_adapters", "d", "Meta-Adapters", "houlsby", "meta_adapters", "pe"),
        FewShotSetting("priming", "e", "Priming → adapter tuning", "houlsby", "priming", "pe"),
        FewShotSetting("lora", "f1", "LoRA from scratch", "lora", None, "pe"),
        FewShotSetting("meta_lora", "f2", "Meta-learned LoRA", "lora", "meta_adapters", "pe"),
    )
}
