"""An experiment's output folder, shared by ``metakit ner`` and ``metakit fewshot``: lock, config, results.

Every experiment folder holds ``config.json`` (the full config and its fingerprint), ``results.json``
(every finished unit) and a ``.lock`` held by its one writer. :func:`open_folder` takes the lock and
either starts a fresh folder or, with ``resume``, checks that every key that changes results matches
the saved config and returns the saved results.

Example:
    >>> lock, results = open_folder("runs/x", config.to_dict(), config.fingerprint(),
    ...     differing=lambda saved: [], resume=False, empty={"units": []})  # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metakit.experiments.lock import FolderLock
from metakit.experiments.report import ResultsFileError, read_results, write_json

__all__ = ["IGNORED", "open_folder", "saved_config"]

#: What an output folder keeps out of git: large checkpoints, logs, temporary files, the lock.
IGNORED = "checkpoints/\ntensorboard/\n*.tmp\n.lock\n"


def saved_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The config keys an output folder was run with (its ``config.json``), or ``None`` if it has none."""
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ResultsFileError(f"{str(path)!r} is not a readable experiment config ({error}).") from None


def open_folder(
    out_dir: str | Path,
    config: dict[str, Any],
    fingerprint: str,
    *,
    differing: Callable[[dict[str, Any]], list[str]],
    resume: bool,
    empty: dict[str, Any],
) -> tuple[FolderLock, dict[str, Any]]:
    """Lock ``out_dir`` and return ``(lock, results)``; the caller releases the lock when done.

    Args:
        config, fingerprint: the run's config (JSON-ready) and its hash, written to ``config.json``.
        differing: the result-changing keys in which a saved config differs from this one.
        resume: continue a folder that already holds an experiment (else such a folder is refused).
        empty: the results of a fresh folder.

    Raises:
        FileExistsError: the folder holds an experiment and ``resume`` is false.
        ValueError: ``resume`` with a config that differs in a result-changing key (named).
        FolderLockedError: another live process writes the folder.
    """
    out = Path(out_dir)
    lock = FolderLock(out)
    created = not out.exists()
    lock.acquire()
    try:
        config_path, results = out / "config.json", json.loads(json.dumps(empty))
        if config_path.is_file():
            if not resume:
                raise FileExistsError(
                    f"{str(out)!r} already holds an experiment; pass --resume to continue it or choose "
                    "another --out."
                )
            changed = differing(saved_config(out))
            if changed:
                raise ValueError(
                    f"Cannot resume {str(out)!r}: it was run with a different config (keys that differ: "
                    f"{changed}). Use the same preset, file and flags, or another --out."
                )
            if (out / "results.json").is_file():
                results = read_results(out / "results.json")
        (out / ".gitignore").write_text(IGNORED, encoding="utf-8")
        # The selection is the latest run's, so `--resume` alone continues it.
        write_json(config_path, {"fingerprint": fingerprint, "config": config})
    except BaseException:
        lock.release()
        if created:  # nothing of ours is in it but the lock file
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    return lock, results
