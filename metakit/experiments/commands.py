"""Command-line pieces shared by ``metakit ner`` and ``metakit fewshot``: list flags, ``--set``, clean stops.

Example:
    >>> parse_sets(["ft_steps=8", "tasks=[\\"scitail\\"]"])
    {'ft_steps': 8, 'tasks': ['scitail']}
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Terminated", "int_list", "parse_sets", "run_guarded", "str_list", "verify_command"]


def int_list(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]`` (an argparse type)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """``"hi, af"`` → ``["hi", "af"]`` (an argparse type)."""
    return [x.strip() for x in text.split(",") if x.strip()]


def _value(text: str) -> Any:
    """``--set key=value`` values: JSON if it parses (numbers, lists, null, true), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: list[str]) -> dict[str, Any]:
    """The ``--set KEY=VALUE`` flags as config keys; a flag without ``=`` raises ``ValueError``."""
    keys = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        keys[key.strip()] = _value(value)
    return keys


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so the same clean-up and message apply."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def run_guarded(
    start: Callable[[], Any],
    *,
    errors: tuple[type[BaseException], ...],
    resume_hint: str,
    quiet: Callable[[BaseException], bool] | None = None,
    prefix: str = "",
) -> int:
    """Run an experiment with clean stops: ``start()`` returns the experiment, which it has run.

    ``start`` gets no experiment back on an interruption, so it should store the experiment it built
    on itself as ``start.experiment`` (for ``progress()`` and ``close()``) before running it.

    Args:
        quiet: errors (or interrupts) not to print, e.g. on a ``torchrun`` rank whose error only
            reports another rank's; the exit status is the same.
        prefix: put before the message of a printed error (e.g. ``"rank 1: "``).

    Returns:
        0 when it finished; 130 on Ctrl-C, 143 on SIGTERM (a line saying where it stopped and how to
        resume); 2 with one ``error:`` line for any of ``errors``.
    """
    quiet = quiet or (lambda error: False)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        start()
    except KeyboardInterrupt as interrupt:
        experiment = getattr(start, "experiment", None)
        where = experiment.progress() if experiment is not None else "starting"
        if not quiet(interrupt):
            print(f"interrupted after {where}; continue with `{resume_hint}`", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    except errors as error:
        if not quiet(error):
            print(f"error: {prefix}{error}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
        experiment = getattr(start, "experiment", None)
        if experiment is not None:
            experiment.close()
    return 0


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The ``run`` options every experiment shares: ``--threads``, ``--set``, ``--out``, ``--resume``."""
    parser.add_argument("--threads", type=int, help="torch threads (0: torch's default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue a folder with its saved config (no need to repeat --preset or flags); finished "
        "units are skipped",
    )


def add_folder_commands(commands: Any, *, table_help: str, verify_help: str) -> None:
    """The ``table``, ``verify`` and ``presets`` subcommands every experiment shares."""
    table_parser = commands.add_parser("table", help=table_help)
    table_parser.add_argument("out")
    table_parser.add_argument("--write", action="store_true", help="also rewrite OUT/table.md")
    verify_parser = commands.add_parser("verify", help=verify_help)
    verify_parser.add_argument("out")
    commands.add_parser("presets", help="list the presets")


def verify_command(out: str, verify: Callable[[str], list[str]], checked: str) -> int:
    """``metakit ... verify OUT``: print ``verify(out)``'s mismatches; 0 if none, 1 if any, 2 if unreadable.

    Args:
        verify: one line per unit whose reported scores its predictions contradict.
        checked: what every unit was checked against, for the success line (e.g. "seqeval's F1").
    """
    from pathlib import Path

    from metakit.experiments.report import ResultsFileError, read_results

    try:
        problems = verify(out)
        units = len(read_results(Path(out) / "results.json")["units"])
    except ResultsFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {out}", file=sys.stderr)
        return 1
    print(f"verify: all {units} units of {out} match {checked} of their predictions")
    return 0


def run_and_show_table(
    start: Callable[[], None], out: str, errors: tuple[type[BaseException], ...], resume_hint: str
) -> int:
    """`run_guarded`, then print the folder's ``table.md``; the exit status."""
    from pathlib import Path

    status = run_guarded(start, errors=errors, resume_hint=resume_hint)
    if status:
        return status
    print((Path(out) / "table.md").read_text(encoding="utf-8"))
    return 0


def config_for_run(
    args: argparse.Namespace, overrides: dict[str, Any], config_class: type, load: Callable[..., Any]
):
    """The run's config: ``load(preset, config file, overrides)``, or, for ``--resume`` without
    ``--preset``/``--config``, the folder's saved config with the overrides on top (unknown keys refused)."""
    from metakit.experiments.folder import saved_config

    saved = saved_config(args.out) if args.resume and not (args.preset or args.config) else None
    if saved is None:
        return load(args.preset, args.config, overrides)
    known = set(config_class.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"Unknown config keys {unknown} in the command-line overrides; known keys: {sorted(known)}."
        )
    return config_class(**{**{k: v for k, v in saved.items() if k in known}, **overrides})
