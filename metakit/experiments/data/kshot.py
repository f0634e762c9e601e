"""Seeded, stratified k-shot episodes and held-out test splits for tasks without official ones.

LEOPARD ships its episodes; a user's own task does not. An episode here is ``k`` examples of every
class, drawn without replacement from the task's training rows by a generator seeded with the seed,
the task's name, ``k`` and the episode number, so the same data and seed give the same episodes on
any machine and Python version (``random.Random`` seeded with a string), and every episode is a pure
function of those, not of which other episodes a run draws. A held-out test split keeps a share of
every class (at least one example each) out of the training rows, seeded the same way.

Example:
    >>> labels = ["a", "b", "a", "b", "a", "b", "a", "b"]
    >>> train, test = held_out_split(labels, test_size=0.5, seed=0, task="demo")
    >>> len(train), len(test)
    (4, 4)
    >>> rows = kshot_episode([labels[i] for i in train], k=2, episode=0, seed=0, task="demo")
    >>> len(rows)
    4
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence

__all__ = ["held_out_counts", "held_out_split", "kshot_episode", "kshot_shortfall", "rows_by_label"]


def rows_by_label(labels: Sequence[str]) -> dict[str, list[int]]:
    """Row indices of each label, labels sorted, rows in order."""
    rows: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        rows[label].append(index)
    return {label: rows[label] for label in sorted(rows)}


def held_out_counts(counts: dict[str, int], test_size: float) -> dict[str, int]:
    """How many examples of each label a held-out test split takes: ``round(n × test_size)``, at least 1."""
    if not 0 < test_size < 1:
        raise ValueError(
            f"test_size is the share of each class held out for the test, in (0, 1); got {test_size}."
        )
    return {label: max(1, round(n * test_size)) for label, n in counts.items()}


def held_out_split(
    labels: Sequence[str], test_size: float, seed: int, task: str = ""
) -> tuple[list[int], list[int]]:
    """``(train rows, test rows)``, both sorted: a seeded share ``test_size`` of every class held out."""
    by_label = rows_by_label(labels)
    take = held_out_counts({label: len(rows) for label, rows in by_label.items()}, test_size)
    rng = random.Random(f"held-out/{seed}/{task}")
    test = sorted(i for label, rows in by_label.items() for i in rng.sample(rows, take[label]))
    chosen = set(test)
    return [i for i in range(len(labels)) if i not in chosen], test


def kshot_episode(labels: Sequence[str], k: int, episode: int, seed: int, task: str = "") -> list[int]:
    """Rows of a k-shot episode (sorted): ``k`` of every label, seeded by ``(seed, task, k, episode)``.

    Raises:
        ValueError: a label has fewer than ``k`` rows (see `kshot_shortfall` for the message a user needs).
    """
    if k < 1 or episode < 0:
        raise ValueError(f"k must be >= 1 and episode >= 0, got k={k}, episode={episode}.")
    rng = random.Random(f"episode/{seed}/{task}/k{k}/{episode}")
    rows = []
    for label, candidates in rows_by_label(labels).items():
        if len(candidates) < k:
            raise ValueError(f"Label {label!r} has {len(candidates)} examples, fewer than k={k}.")
        rows += rng.sample(candidates, k)
    return sorted(rows)


def kshot_shortfall(
    labels: Sequence[str], k: int, test_size: float | None = None
) -> tuple[str, int, int, int] | None:
    """The label that cannot give ``k`` examples per episode, or ``None`` if every label can.

    Args:
        labels: the task's labels (all of its data when ``test_size`` holds some out, else its training rows).
        test_size: the share held out for the test (``None``: the test split is given separately).

    Returns:
        ``(label, its count, the count it would need, the largest k every label allows)`` for the label
        with the fewest usable examples.
    """
    counts = Counter(labels)
    held = held_out_counts(counts, test_size) if test_size is not None else dict.fromkeys(counts, 0)
    usable = {label: n - held[label] for label, n in counts.items()}
    label = min(sorted(usable), key=lambda lab: usable[lab])
    if usable[label] >= k:
        return None
    return label, counts[label], k + held[label], max(usable[label], 0)
