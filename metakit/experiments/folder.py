"""An experiment's output folder, shared by ``metakit ner`` and ``metakit fewshot``: lock, config, results.

Every experiment folder holds ``config.json`` (the full config and its fingerprint), ``results.json``
(every finished unit) and a ``.lock`` held by its one writer. `open_folder` takes the lock and
either starts a fresh folder or, with ``resume``, checks that every key that changes results matches
the saved config and returns the saved results.

Example:
    >>> lock, results = open_folder("runs/x", config.to_dict(), config.fingerprint(),
    ...     differing=lambda saved: [], resume=False, empty={"units": []})  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metakit.experiments.lock import FolderLock
from metakit.experiments.report import ResultsFileError, read_results, write_json

__all__ = [
    "IGNORED",
    "OutputFolderError",
    "check_output_folder",
    "experiment_of",
    "open_folder",
    "saved_config",
    "wrong_experiment",
]

#: What an output folder keeps out of git: large checkpoints, logs, temporary files, the lock.
IGNORED = "checkpoints/\ntensorboard/\n*.tmp\n*.pt\n.lock\n"


class OutputFolderError(ValueError):
    """An output folder that cannot be used as asked: a file, unwritable, another experiment's, or
    nothing to resume."""


def experiment_of(out_dir: str | Path) -> str | None:
    """Which experiment a folder holds (``"ner"``, ``"fewshot"``), from its ``config.json``; ``None`` if none.

    Folders written before ``config.json`` named its experiment are told apart by their keys.
    """
    path = Path(out_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(saved, dict):
        return None
    if isinstance(saved.get("experiment"), str):
        return saved["experiment"]
    keys = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    if "leopard_dir" in keys:
        return "fewshot"
    if "sources" in keys and "targets" in keys:
        return "ner"
    return None


def wrong_experiment(out_dir: str | Path, experiment: str) -> str | None:
    """One line saying that ``out_dir`` holds the other experiment, or ``None``."""
    held = experiment_of(out_dir)
    if held is None or held == experiment:
        return None
    return (
        f"{str(out_dir)!r} holds a `metakit {held}` experiment, not a `metakit {experiment}` one; use "
        f"`metakit {held} ...` on it."
    )


def check_output_folder(out_dir: str | Path, experiment: str | None = None) -> None:
    """Refuse, in one line and before anything is created, an ``--out`` that cannot hold this run.

    Args:
        experiment: the experiment about to use the folder; a folder of another one is refused.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {str(out)!r} is a file, not a folder; choose another --out.")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"--out {str(out)!r} cannot be created or written ({str(existing)!r} is not writable); "
            "choose another --out."
        )
    other = wrong_experiment(out, experiment) if experiment is not None else None
    if other is not None:
        raise OutputFolderError(f"{other[:-1]}, or choose another --out.")


def _has_progress(out: Path, results: dict[str, Any]) -> bool:
    """Whether a folder holds anything a fresh run would lose: finished units or checkpoints."""
    checkpoints = out / "checkpoints"
    finished = any(results.get(key) for key in ("units", "priming", "meta", "skipped", "sweep"))
    return finished or (checkpoints.is_dir() and any(checkpoints.iterdir()))


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
    experiment: str | None = None,
) -> tuple[FolderLock, dict[str, Any]]:
    """Lock ``out_dir`` and return ``(lock, results)``; the caller releases the lock when done.

    Args:
        config, fingerprint: the run's config (JSON-ready) and its hash, written to ``config.json``.
        differing: the result-changing keys in which a saved config differs from this one.
        resume: continue a folder that already holds an experiment (else such a folder is refused).
        empty: the results of a fresh folder.
        experiment: ``"ner"`` or ``"fewshot"``: recorded in ``config.json``; a folder of the other is refused.

    A folder that holds a config but no finished unit and no checkpoint (a run refused by a check after
    it created the folder) is reused as if it were empty.

    Raises:
        OutputFolderError: ``out_dir`` is a file, cannot be written, holds the other experiment, or
            ``resume`` finds nothing to resume.
        FileExistsError: the folder holds an experiment and ``resume`` is false.
        ValueError: ``resume`` with a config that differs in a result-changing key (named).
        FolderLockedError: another live process writes the folder.
    """
    out = Path(out_dir)
    check_output_folder(out, experiment)
    if resume and not (out / "config.json").is_file():
        raise OutputFolderError(
            f"nothing to resume in {str(out)!r}: it holds no experiment (no config.json); run without "
            "--resume to start one there."
        )
    lock = FolderLock(out)
    created = not out.exists()
    try:
        lock.acquire()
    except OSError as error:  # e.g. a path the process may not create (a read-only file system)
        raise OutputFolderError(
            f"--out {str(out)!r} cannot be created ({error.strerror or error}); choose another --out."
        ) from None
    try:
        config_path, results = out / "config.json", json.loads(json.dumps(empty))
        if config_path.is_file():
            saved = read_results(out / "results.json") if (out / "results.json").is_file() else results
            if not _has_progress(out, saved):
                pass  # a folder with no finished unit and no checkpoint (e.g. a run refused early): reused
            elif not resume:
                raise FileExistsError(
                    f"{str(out)!r} already holds an experiment; pass --resume to continue it, choose another "
                    f"--out, or delete {str(out)!r} to start over."
                )
            else:
                changed = differing(saved_config(out))
                if changed:
                    raise ValueError(
                        f"Cannot resume {str(out)!r}: it was run with a different config (keys that differ: "
                        f"{changed}). Use the same preset, file and flags, another --out, or delete "
                        f"{str(out)!r} to start over."
                    )
                results = saved
        (out / ".gitignore").write_text(IGNORED, encoding="utf-8")
        # The selection is the latest run's, so `--resume` alone continues it.
        record = {"fingerprint": fingerprint, "config": config}
        if experiment is not None:
            record["experiment"] = experiment
        write_json(config_path, record)
    except BaseException:
        lock.release()
        if created:  # nothing of ours is in it but the lock file
            (out / ".lock").unlink(missing_ok=True)
            out.rmdir()
        raise
    return lock, results
