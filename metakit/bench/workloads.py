"""The benchmark workloads: a model, a loss, a fixed meta-batch and which parameters adapt.

Every builder seeds its own generator, so two processes that build the same workload get the same
initial weights and the same meta-batch; that is what lets the fidelity of one strategy's
meta-gradient be compared with SecondOrder's computed in another process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from metakit.spec import Spec, everything
from metakit.task import LossFn, Task
from metakit.tasks.sine import SineTasks, mse_loss, sine_mlp

__all__ = ["WORKLOADS", "BuiltWorkload", "Workload", "token_classification_loss"]


@dataclass
class BuiltWorkload:
    """A workload made concrete on a device.

    Attributes:
        model: the module (its parameters are the initial meta-parameters).
        loss_fn: ``loss_fn(forward, batch) -> scalar``.
        tasks: the fixed meta-batch every configuration of this workload is measured on.
        inner: spec of the parameters adapted in the inner loop.
        outer: spec of the meta-learned parameters.
        inner_lr: SGD learning rate of the inner loop.
        priming: build the learner with ``metakit.recipes.priming`` (``pe`` and ``head`` are set).
        sample_tasks: ``sample_tasks(n, seed)`` for meta-training (outcome), if the workload has one.
        info: sizes and settings written into the record.
    """

    model: nn.Module
    loss_fn: LossFn
    tasks: list[Task]
    inner: Spec
    outer: Spec
    inner_lr: float
    priming: bool = False
    pe: Spec | None = None
    head: Spec | None = None
    sample_tasks: Callable[[int, int], list[Task]] | None = None
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """A named, buildable workload; ``build(device)`` returns a `BuiltWorkload`.

    Attributes:
        compared: which strategies of `metakit.bench.strategies.STRATEGIES` it is compared under
            by default: ``"all"``, ``"core"`` (the entries marked core: the exact modes and
            FirstOrder), ``"sweep"`` (those marked sweep) or ``"implicit"`` (SecondOrder() and the
            proximal entries).
        proximal_reference: Implicit's fidelity reference (the proximal inner problem solved to
            convergence, hand-written) is affordable here; on the BERT workloads it would take
            thousands of Hessian-vector products per task.
    """

    name: str
    description: str
    build: Callable[[torch.device], BuiltWorkload]
    compared: str = "all"
    proximal_reference: bool = False


def _to(tasks: list[Task], device: torch.device) -> list[Task]:
    def move(batch):
        if isinstance(batch, torch.Tensor):
            return batch.to(device)
        if isinstance(batch, dict):
            return {k: move(v) for k, v in batch.items()}
        if isinstance(batch, tuple | list):
            return type(batch)(move(v) for v in batch)
        return batch

    return [Task(move(t.support), move(t.query), t.loss_fn) for t in tasks]


def _count(model: nn.Module, spec: Spec) -> int:
    names = set(spec.names(model))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


# -- (a) sine regression ------------------------------------------------------------------------
def build_sine(
    device: torch.device, n_tasks: int = 25, k_shot: int = 10, smooth: bool = False
) -> BuiltWorkload:
    """MAML's sinusoid: MLP 1-40-40-1, 25 tasks per meta-batch, K=10 support and query points.

    Args:
        smooth: tanh instead of ReLU. A ReLU network's kinks stop gradient descent short of a
            stationary point of Implicit's proximal inner problem (the optimality residual stalls
            near 0.1 for λ = 1 to 30), so only the smooth variant has a converged proximal reference.
    """
    torch.manual_seed(0)
    model = sine_mlp().to(device)
    if smooth:
        model = nn.Sequential(*(nn.Tanh() if isinstance(m, nn.ReLU) else m for m in model))
    tasks = _to(SineTasks(k_shot=k_shot, k_query=k_shot, seed=0).sample(n_tasks), device)

    def sample_tasks(n: int, seed: int) -> list[Task]:
        return _to(SineTasks(k_shot=k_shot, k_query=k_shot, seed=seed).sample(n), device)

    return BuiltWorkload(
        model=model,
        loss_fn=mse_loss,
        tasks=tasks,
        inner=everything(),
        outer=everything(),
        inner_lr=0.01,
        sample_tasks=sample_tasks,
        info={"params": _count(model, everything()), "n_tasks": n_tasks, "k_shot": k_shot},
    )


# -- (b), (c), (d) token classification on a small BERT ----------------------------------------
NUM_LABELS = 9  # BIO tags of four entity types, as in WikiAnn-style NER


def token_classification_loss(forward: Callable, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-level cross-entropy of a ``*ForTokenClassification`` model on ``{input_ids, labels, ...}``."""
    logits = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


def _token_tasks(n_tasks: int, batch: int, length: int, vocab: int, seed: int) -> list[Task]:
    """Synthetic tagging tasks: each task labels a token by its own affine rule modulo the tag count."""
    generator = torch.Generator().manual_seed(seed)

    def draw(scale: int, shift: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(1, vocab, (batch, length), generator=generator)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": (ids * scale + shift) % NUM_LABELS,
        }

    tasks = []
    for _ in range(n_tasks):
        scale, shift = (int(v) for v in torch.randint(1, NUM_LABELS, (2,), generator=generator))
        tasks.append(Task(support=draw(scale, shift), query=draw(scale, shift)))
    return tasks


def small_bert(
    hidden: int = 256, layers: int = 4, vocab: int = 8000, seed: int = 0, max_length: int = 64
) -> nn.Module:
    """``BertForTokenClassification`` from ``BertConfig`` (heads = hidden/64, FFN = 4×hidden, no dropout).

    Dropout is off so that a meta-step is a deterministic function of weights and batch, which
    the fidelity comparison between processes needs.
    """
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
        max_position_embeddings=max_length,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return BertForTokenClassification(config)


def build_bert(
    device: torch.device,
    hidden: int = 256,
    layers: int = 4,
    n_tasks: int = 4,
    batch: int = 8,
    length: int = 32,
) -> BuiltWorkload:
    """Token classification, all parameters adapted in the inner loop and meta-learned."""
    model = small_bert(hidden, layers, max_length=max(64, length)).to(device)
    tasks = _to(_token_tasks(n_tasks, batch, length, model.config.vocab_size, seed=0), device)
    return BuiltWorkload(
        model=model,
        loss_fn=token_classification_loss,
        tasks=tasks,
        inner=everything(),
        outer=everything(),
        inner_lr=0.01,
        info={
            "params": _count(model, everything()),
            "hidden": hidden,
            "layers": layers,
            "n_tasks": n_tasks,
            "batch": f"{batch}x{length}",
        },
    )


def build_priming(device: torch.device, bottleneck: int = 64, **bert: int) -> BuiltWorkload:
    """Priming (Gheini et al., Algorithm 1): inner = top adapter + head, outer = backbone + adapter.

    Args:
        bert: `build_bert`'s sizes (``n_tasks``, ``batch``, ``length``...).
    """
    from metakit.peft import add_top_adapter, head_spec

    built = build_bert(torch.device("cpu"), **bert)
    model = built.model
    adapter = add_top_adapter(model, bottleneck=bottleneck)
    model.to(device)
    head = head_spec(model)
    built.model, built.tasks = model, _to(built.tasks, device)
    # recipes.priming's outer set: the backbone (everything but adapter and head) plus the adapter.
    built.inner, built.outer = adapter | head, everything() - head
    built.priming, built.pe, built.head = True, adapter, head
    built.info.update(
        params=_count(model, everything()),
        inner_params=_count(model, built.inner),
        outer_params=_count(model, built.outer),
        bottleneck=bottleneck,
    )
    return built


#: Users' runs: 16 sentences of 128 tokens per task, where activations outweigh parameters about 10 to 1
#: (BERT-base at this batch holds about 1.5 GB of activations against 0.44 GB of parameters).
LONG = {"n_tasks": 1, "batch": 16, "length": 128}


def _sweep(hidden: int) -> Workload:
    return Workload(
        name=f"bert-h{hidden}",
        description=f"(d) size sweep: the BERT workload with hidden {hidden}, {max(1, hidden // 64)} heads",
        build=functools.partial(build_bert, hidden=hidden),
        compared="sweep",
    )


#: Every workload by name; ``sweep`` in the CLI expands to the ``bert-h*`` entries plus ``bert``.
WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(
            "sine", "(a) sine regression, MLP 1-40-40-1, 25 tasks, K=10", build_sine, proximal_reference=True
        ),
        Workload(
            "bert",
            "(b) token classification, BERT h256 L4 A4 FFN1024, 4 tasks of 8x32 tokens, all params inner",
            build_bert,
        ),
        Workload(
            "priming",
            "(c) (b) with inner = top adapter + head, outer = backbone + adapter (priming)",
            build_priming,
            compared="core",
        ),
        Workload(
            "bert-long",
            "(e) (b) at 16x128 tokens, 1 task: activations dominate, every parameter adapts",
            functools.partial(build_bert, **LONG),
            compared="core",
        ),
        Workload(
            "priming-long",
            "(f) (c) at 16x128 tokens, 1 task: activations dominate, priming partition",
            functools.partial(build_priming, **LONG),
            compared="core",
        ),
        _sweep(128),
        _sweep(512),
        Workload(
            "sine-tanh",
            "(a') (a) with tanh: a smooth inner problem, for Implicit's fidelity to its proximal reference",
            functools.partial(build_sine, smooth=True),
            compared="implicit",
            proximal_reference=True,
        ),
    )
}
