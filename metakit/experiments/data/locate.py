"""Where a data set is found: an explicit path, ``$METAKIT_DATA``, the Hugging Face hub, the development folder.

In that order. The development folder is ``../shared/data/<name>`` beside the repository, which
exists only in metakit's own development layout; a user points metakit at their copy with a flag or
an argument, or once with ``METAKIT_DATA=/path/to/folder`` (a folder holding ``wikiann/``,
``leopard/``, ``glue-meta/``). The hub is asked only for the data sets it serves (WikiAnn) and not
when ``HF_HUB_OFFLINE=1``. A data set found nowhere raises `DataNotFoundError`, one line
listing what was tried.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DATA_ENV", "DataNotFoundError", "development_folder", "locate"]

#: The environment variable naming a folder that holds the data sets, one sub-folder each.
DATA_ENV = "METAKIT_DATA"


class DataNotFoundError(FileNotFoundError):
    """A data set is neither at the given path, under ``$METAKIT_DATA``, on the hub nor in the
    development folder."""


def development_folder(name: str) -> Path:
    """``../shared/data/<name>`` beside the repository (metakit's development layout)."""
    return Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ) not in ("", "0")


def locate(
    name: str,
    explicit: str | os.PathLike | None = None,
    *,
    hub: Callable[[], Any] | None = None,
    hub_name: str | None = None,
    label: str | None = None,
    expected: str = "",
    how: str = "data_dir=",
) -> Path | Any:
    """The folder of data set ``name``, or what ``hub()`` loaded.

    Args:
        name: the data set's folder name (``"wikiann"``, ``"leopard"``, ``"glue-meta"``).
        explicit: a path the user gave (a flag or an argument); used alone when given, so a typo is
            an error rather than a silent fall-back. The development folder's own path counts as not
            given (it is the recorded default of older configs).
        hub: loads the data set from the Hugging Face hub (``datasets.load_dataset``), if it is there.
        hub_name: the hub's name of the data set, for the message.
        label: the data set's name in messages (default ``name``).
        expected: what the folder holds, for the messages.
        how: how a user passes the folder (a flag, a config key), for the messages.
    """
    label = label or name
    expected = f" Expected {expected}." if expected else ""
    development = development_folder(name)
    if explicit is not None and _resolved(explicit) != _resolved(development):
        path = Path(explicit)
        if path.is_dir():
            return path
        raise DataNotFoundError(
            f"{label} data folder {str(path)!r} does not exist (the path given).{expected}"
        )
    tried = []
    root = os.environ.get(DATA_ENV)
    if root:
        path = Path(root) / name
        if path.is_dir():
            return path
        tried.append(f"${DATA_ENV}/{name} ({path})")
    else:
        tried.append(f"${DATA_ENV} (not set)")
    if hub is not None and not _offline():
        try:
            return hub()
        except Exception as error:  # unreachable hub, missing config: fall through and say so
            tried.append(f"the hub's {hub_name} ({type(error).__name__}: {str(error).splitlines()[0][:80]})")
    elif hub is not None:
        tried.append(f"the hub's {hub_name} (HF_HUB_OFFLINE is set)")
    if development.is_dir():
        return development
    tried.append(f"the development folder {development}")
    raise DataNotFoundError(
        f"{label} data was not found; tried: {'; '.join(tried)}. Pass its folder ({how}) or set "
        f"{DATA_ENV} to a folder holding {name}/.{expected}"
    )


def _resolved(path: str | os.PathLike) -> str:
    return str(Path(path).resolve())
