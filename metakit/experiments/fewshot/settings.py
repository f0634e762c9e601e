"""The few-shot settings (a)–(g): what is meta-trained on the pool first, what each episode tunes.

(a)–(f) are issue 14's; (g1) TARP and (g2) TARP+TAMS are issue 15's, meta-trained with the same budget
as Meta-Adapters (the config's ``meta_steps``, ``meta_batch``, ``inner_steps``, ``outer_lr``, ``meta_strategy``).
"""

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
        pe: the parameter-efficient modules the model carries: ``"houlsby"``, ``"lora"``, ``"tarp"``
            (`metakit.peft.add_tarp`), ``"tams"`` (`metakit.peft.add_tams`: a TAMS controller
            over frozen / TARP / adapter sublayers, discretized before fine-tuning) or ``None``.
        meta: what runs on the meta-training pool first: ``"meta_adapters"`` (the PE modules meta-learned
            with the backbone frozen), ``"priming"`` (Algorithm 1: backbone and PE modules primed) or ``None``.
        tune: what each episode fine-tunes (always with the prototype head): ``"full"`` (encoder),
            ``"head"`` (nothing else) or ``"pe"`` (the PE modules).
    """

    key: str
    letter: str
    label: str
    pe: Literal["houlsby", "lora", "tarp", "tams"] | None
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
        # Issue 15 item 5: "Meta-Learning the Difference" (Hou et al., 2022), the same meta-training budget.
        FewShotSetting("meta_tarp", "g1", "Meta-learned TARP", "tarp", "meta_adapters", "pe"),
        FewShotSetting("meta_tams", "g2", "Meta-learned TARP+TAMS", "tams", "meta_adapters", "pe"),
    )
}
