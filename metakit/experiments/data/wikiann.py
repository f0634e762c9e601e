"""WikiAnn NER (Rahimi et al., 2019 splits) as a ``datasets.Dataset``, from the hub or from local TSV files.

Local files use the Rahimi/XTREME (PAN-X) layout: ``{split}-{lang}.tsv`` with one ``token<TAB>tag`` per
line (XTREME) or ``lang:token<TAB>tag`` (Rahimi's tarballs), a blank line between sentences. Both give
the hub dataset's features: ``tokens`` (strings) and ``ner_tags`` (a ``ClassLabel`` over
`WIKIANN_LABELS`).

Example:
    >>> train = load_wikiann("hi", "train", data_dir="../shared/data/wikiann")  # doctest: +SKIP
    >>> train.features["ner_tags"].feature.names  # doctest: +SKIP
    ['O', 'B-PER', 'I-PER', 'B-ORG', 'I-ORG', 'B-LOC', 'I-LOC']
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Sequence, Value

from metakit.experiments.data.locate import locate

__all__ = [
    "WIKIANN_HUB_NAME",
    "WIKIANN_LABELS",
    "load_wikiann",
    "read_wikiann_tsv",
    "subsample",
    "wikiann_features",
    "wikiann_path",
]

WIKIANN_HUB_NAME = "unimelb-nlp/wikiann"
WIKIANN_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
# The hub calls the development split "validation"; the TSV files call it "dev".
_FILE_SPLIT = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}
_HUB_SPLIT = {"train": "train", "dev": "validation", "validation": "validation", "test": "test"}


def wikiann_features() -> Features:
    """The features of the hub's ``unimelb-nlp/wikiann`` that metakit uses: ``tokens`` and ``ner_tags``."""
    return Features(
        {
            "tokens": Sequence(Value("string")),
            "ner_tags": Sequence(ClassLabel(names=WIKIANN_LABELS)),
        }
    )


def _check_split(split: str) -> None:
    if split not in _FILE_SPLIT:
        raise ValueError(f"Unknown WikiAnn split {split!r}; expected one of {sorted(_FILE_SPLIT)}.")


def wikiann_path(data_dir: str | os.PathLike, lang: str, split: str) -> Path:
    """The file ``{data_dir}/{split}-{lang}.tsv``, checked to exist (the error lists what is there)."""
    _check_split(split)
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"WikiAnn data directory {str(root)!r} does not exist. Expected a folder with files named "
            f"'{{train,dev,test}}-{{lang}}.tsv' (e.g. 'train-{lang}.tsv', 'dev-{lang}.tsv', 'test-{lang}.tsv')."
        )
    path = root / f"{_FILE_SPLIT[split]}-{lang}.tsv"
    if not path.is_file():
        available = sorted({p.stem.split("-", 1)[1] for p in root.glob("*-*.tsv")})
        raise FileNotFoundError(
            f"No WikiAnn file {str(path)!r} for language {lang!r}, split {split!r}. Languages with files in "
            f"{str(root)!r}: {available or 'none'}; expected names like '{_FILE_SPLIT[split]}-{{lang}}.tsv'."
        )
    return path


def read_wikiann_tsv(path: str | os.PathLike, lang: str | None = None) -> Iterator[dict[str, list]]:
    """Yield ``{"tokens": [...], "ner_tags": [label ids]}`` per sentence of a Rahimi/XTREME TSV file.

    When ``lang`` is given and the file's first token starts with ``lang:`` (Rahimi's layout), that
    prefix is stripped from every token; XTREME files are read as they are. Tags outside
    `WIKIANN_LABELS` raise a ``ValueError`` naming the file and line.
    """
    label_id = {name: i for i, name in enumerate(WIKIANN_LABELS)}
    prefix = f"{lang}:" if lang else None
    rahimi: bool | None = None  # decided on the first token, so an XTREME token like "hi:x" stays intact
    tokens: list[str] = []
    tags: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if not line.strip():
                if tokens:
                    yield {"tokens": tokens, "ner_tags": tags}
                    tokens, tags = [], []
                continue
            token, sep, tag = line.rpartition("\t")
            if not sep:
                raise ValueError(f"{path}:{line_no}: expected 'token<TAB>tag', got {line!r}.")
            if tag not in label_id:
                raise ValueError(
                    f"{path}:{line_no}: tag {tag!r} is not a WikiAnn label; expected one of {WIKIANN_LABELS}."
                )
            if rahimi is None:
                rahimi = bool(prefix) and token.startswith(prefix)
            if rahimi:
                if not token.startswith(prefix):
                    raise ValueError(
                        f"{path}:{line_no}: token {token!r} lacks the {prefix!r} prefix of this file."
                    )
                token = token[len(prefix) :]
            tokens.append(token)
            tags.append(label_id[tag])
    if tokens:
        yield {"tokens": tokens, "ner_tags": tags}


def subsample(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """``n`` sentences drawn without replacement with ``seed``, kept in file order; all if ``n`` is None."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"subsample needs n >= 1 (or None for all), got {n}.")
    indices = sorted(random.Random(seed).sample(range(len(dataset)), n))
    return dataset.select(indices)


def wikiann_files(lang: str) -> str:
    """What a WikiAnn folder holds, for messages."""
    return (
        "a folder with files named '{train,dev,test}-{lang}.tsv' "
        f"(e.g. 'train-{lang}.tsv', 'dev-{lang}.tsv', 'test-{lang}.tsv')"
    )


def load_wikiann(
    lang: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    max_sentences: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load one language and split of WikiAnn as a ``datasets.Dataset`` with `wikiann_features`.

    Args:
        lang: language code (``"en"``, ``"hi"``, ...), the hub's config name.
        split: ``"train"``, ``"dev"`` (alias ``"validation"``) or ``"test"``.
        data_dir: folder of ``{split}-{lang}.tsv`` files; ``None`` looks in ``$METAKIT_DATA/wikiann``,
            then loads ``unimelb-nlp/wikiann`` from the hub, then the development folder
            (`locate`).
        max_sentences: keep a seeded random subset of this many sentences (``None``: all).
        seed: seed of that subset.
    """
    _check_split(split)

    def from_hub() -> Dataset:
        from datasets import load_dataset

        dataset = load_dataset(WIKIANN_HUB_NAME, lang, split=_HUB_SPLIT[split])
        return dataset.select_columns(["tokens", "ner_tags"]).cast(wikiann_features())

    found = locate(
        "wikiann",
        data_dir,
        hub=from_hub,
        hub_name=WIKIANN_HUB_NAME,
        label="WikiAnn",
        expected=wikiann_files(lang),
        how="metakit ner: --data DIR; in code: data_dir=",
    )
    if isinstance(found, Path):
        rows = list(read_wikiann_tsv(wikiann_path(found, lang, split), lang))
        columns = {"tokens": [r["tokens"] for r in rows], "ner_tags": [r["ner_tags"] for r in rows]}
        dataset = Dataset.from_dict(columns, features=wikiann_features())
    else:
        dataset = found
    return subsample(dataset, max_sentences, seed)
