"""Meta-Adapters and priming (Gheini et al., Algorithm 1) on a tiny BERT token classifier.

Run (about 2 minutes of CPU time on 2 cores, no data or downloads):

    python examples/priming_minimal.py

Each synthetic task is a "language": tokens 0..VOCAB-1, and a token's label is ``tag[token]`` for a
tag table shared by every task, but every language spells tokens with its own vocabulary shift. A
backbone that learns the shared tagging structure adapts to a new language in a few steps; that
is what priming meta-learns. For each recipe the script prints the meta-training query loss and,
before and after, how well a few inner steps on an unseen language's support set tag its query set.
Swap in a real encoder (``metakit.experiments.pretrained.multilingual_e5_small()``) and WikiAnn tasks
(``metakit.tasks``) for the paper's setting.
"""

from __future__ import annotations

import copy
import time

import torch
from transformers import BertConfig, BertForTokenClassification

import metakit as mk
from metakit import recipes
from metakit.peft import add_houlsby_adapters, add_top_adapter, backbone_spec, head_spec

VOCAB, LABELS, SEQ, BATCH = 64, 5, 12, 16
META_STEPS, TASKS_PER_STEP, INNER_STEPS, INNER_LR, OUTER_LR = 40, 3, 5, 0.5, 5e-3

torch.manual_seed(0)
torch.set_num_threads(2)
TAGS = torch.randint(0, LABELS, (VOCAB,))  # the structure every language shares


def loss_fn(forward, batch) -> torch.Tensor:
    """Token-classification cross-entropy computed by the Hugging Face model itself."""
    return forward(**batch).loss


def language_batch(shift: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A batch of one language: labels from the shared tag table, token ids shifted by the language."""
    meaning = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return {"input_ids": (meaning + shift) % VOCAB, "labels": TAGS[meaning]}


def language_task(shift: int, generator: torch.Generator) -> mk.Task:
    return mk.Task(support=language_batch(shift, generator), query=language_batch(shift, generator))


def accuracy_after_adapting(learner: mk.MetaLearner, model: torch.nn.Module, task: mk.Task) -> float:
    """Query accuracy after the learner's inner loop on the support set (the model is not changed)."""
    adapted = learner.adapt(task)
    with torch.no_grad():
        logits = mk.bind(model, adapted)(input_ids=task.query["input_ids"]).logits
    return (logits.argmax(-1) == task.query["labels"]).float().mean().item()


def tiny_bert() -> BertForTokenClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
        num_labels=LABELS,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForTokenClassification(config)


def run(name: str, model: torch.nn.Module, learner: mk.MetaLearner) -> None:
    generator = torch.Generator().manual_seed(1)
    held_out = [language_task(shift, generator) for shift in (61, 62, 63)]  # never meta-trained on
    before = sum(accuracy_after_adapting(learner, copy.deepcopy(model), t) for t in held_out) / len(held_out)
    optimizer = torch.optim.Adam(learner.outer_parameters(), lr=OUTER_LR)
    start = time.perf_counter()
    for step in range(META_STEPS):
        shifts = torch.randint(0, 60, (TASKS_PER_STEP,), generator=generator).tolist()
        report = step % 10 == 0 or step == META_STEPS - 1
        result = learner.meta_step([language_task(s, generator) for s in shifts], final_support_loss=report)
        optimizer.step()
        optimizer.zero_grad()
        if report:
            inner = result.inner_losses.mean(0)
            print(
                f"  [{name}] step {step:3d}  query loss {result.loss.item():.3f}  "
                f"inner loss {inner[0].item():.3f} -> {inner[-1].item():.3f}"
            )
    after = sum(accuracy_after_adapting(learner, model, t) for t in held_out) / len(held_out)
    print(
        f"  [{name}] unseen languages, accuracy after {INNER_STEPS} inner steps: {before:.3f} before "
        f"meta-training, {after:.3f} after ({time.perf_counter() - start:.0f} s)\n"
    )


def main() -> None:
    # Meta-Adapters: Houlsby adapters + head adapt per task; only the adapters are meta-learned.
    torch.manual_seed(0)
    model = tiny_bert()
    adapters, head = add_houlsby_adapters(model, bottleneck=16), head_spec(model)
    print(mk.explain(model, adapters=adapters, head=head, backbone=backbone_spec(model)), "\n")
    learner = recipes.meta_adapters(
        model,
        loss_fn,
        adapters=adapters,
        head=head,
        inner_lr=INNER_LR,
        steps=INNER_STEPS,
        strategy=mk.FirstOrder(),
    )
    run("meta_adapters", model, learner)

    # Priming: the top adapter + head adapt per task; the backbone and the adapter are meta-learned,
    # and the head is carried over from the first task of each meta-batch (Algorithm 1).
    torch.manual_seed(0)
    model = tiny_bert()
    adapter, head = add_top_adapter(model, bottleneck=16), head_spec(model)
    learner = recipes.priming(
        model, loss_fn, pe=adapter, head=head, inner_lr=INNER_LR, steps=INNER_STEPS, strategy=mk.FirstOrder()
    )
    print(learner)
    run("priming", model, learner)


if __name__ == "__main__":
    main()
