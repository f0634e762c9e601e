"""``metakit ner``: the priming experiment from the command line.

Usage::

    metakit ner run --preset cpu --out benchmarks/results/priming-cpu            # all 7 settings × 6 targets × 3 seeds
    metakit ner run --preset cpu-quick --settings 1,3,4 --out runs/quick         # a few minutes
    metakit ner run --config exp.yaml --langs hi,af --seeds 0 --out runs/x --resume
    metakit ner run --out runs/x --resume                                        # continue: reads runs/x/config.json
    torchrun --standalone --nproc_per_node=2 -m metakit.cli ner run --preset cpu --out runs/x   # 2 processes
    metakit ner verify runs/x                                                    # recompute every F1 from predictions
    metakit ner table runs/x --write                                             # re-render a folder's table
    metakit ner presets                                                          # list presets and their keys
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from metakit.experiments.commands import (
    add_folder_commands,
    add_run_options,
    config_for_run,
    int_list,
    parse_sets,
    run_and_show_table,
    run_guarded,
    str_list,
)
from metakit.experiments.config import PRESET_INFO, PRESETS, ExperimentConfig, _check_keys, load_config

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``run``, ``table`` and ``presets`` under ``metakit ner``."""
    commands = parser.add_subparsers(dest="ner_command", required=True, metavar="ACTION")
    run_parser = commands.add_parser("run", help="run (or resume) settings × targets × seeds")
    run_parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="starting point (default: the file's, else cpu)"
    )
    run_parser.add_argument(
        "--config", help="a .toml or .yaml file of config keys (optionally 'preset = ...')"
    )
    run_parser.add_argument("--settings", type=int_list, help="e.g. 1,3,4 (default: all seven)")
    run_parser.add_argument("--langs", type=str_list, help="target languages, e.g. hi,af")
    run_parser.add_argument("--sources", type=str_list, help="source languages for priming (default en,es)")
    run_parser.add_argument("--seeds", type=int_list, help="e.g. 0,1,2")
    run_parser.add_argument("--model", help="hub name or local path; 'e5' (offline) or 'tiny'")
    run_parser.add_argument(
        "--data", help="folder of {split}-{lang}.tsv files; 'hub' for unimelb-nlp/wikiann"
    )
    add_run_options(run_parser)
    run_parser.add_argument(
        "--timeout",
        type=float,
        help="under torchrun: seconds a process waits for the others before it stops with an error "
        "(default 1800; a rank may wait for another's longest unit)",
    )
    add_folder_commands(
        commands,
        table_help="render the markdown table of an output folder",
        verify_help="recompute every reported F1 from its predictions; exit 1 on a mismatch",
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "settings": args.settings,
        "targets": args.langs,
        "sources": args.sources,
        "seeds": args.seeds,
        "model": args.model,
        "threads": args.threads,
    }
    keys = {k: v for k, v in flags.items() if v is not None}
    if args.data is not None:
        keys["data_dir"] = None if args.data == "hub" else args.data
    keys.update(parse_sets(args.set))
    return keys


def _config(args: argparse.Namespace) -> ExperimentConfig:
    """The run's config; ``--resume`` without ``--preset``/``--config`` starts from the folder's saved one."""
    overrides = _overrides(args)
    _check_keys(overrides, "the command-line overrides")  # typed and ranged, naming the key
    return config_for_run(args, overrides, ExperimentConfig, load_config)


def _run_experiment(args: argparse.Namespace) -> int:
    from metakit.executors import DistributedError
    from metakit.experiments.lock import FolderLockedError
    from metakit.experiments.priming import CheckpointError
    from metakit.experiments.ranks import DEFAULT_TIMEOUT, Ranks
    from metakit.experiments.report import ResultsFileError
    from metakit.experiments.runner import Experiment

    if args.timeout is not None and not args.timeout > 0:
        print(f"error: --timeout must be a positive number of seconds, got {args.timeout}", file=sys.stderr)
        return 2
    errors = (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ImportError,
        FolderLockedError,
        CheckpointError,
        ResultsFileError,
    )
    hint = f"metakit ner run --out {args.out} --resume"
    ranks = Ranks.from_environment(timedelta(seconds=args.timeout) if args.timeout else DEFAULT_TIMEOUT)
    try:
        if ranks.launched:  # rank 0 writes and prints; every rank prints only its own errors
            return _run_ranked(args, ranks, (*errors, DistributedError), hint)

        def start() -> None:
            start.experiment = Experiment(_config(args), args.out, resume=args.resume)
            start.experiment.run()

        return run_and_show_table(start, args.out, errors=errors, resume_hint=hint)
    finally:
        ranks.close()


def _run_ranked(args: argparse.Namespace, ranks, errors: tuple, hint: str) -> int:
    """One ``torchrun`` process of ``ner run``; rank 0 prints the table."""
    from metakit.experiments.runner import Experiment

    def start() -> None:
        config = _config(args)
        start.configured = True
        start.experiment = Experiment(config, args.out, resume=args.resume, ranks=ranks)
        start.experiment.run()

    def quiet(error: BaseException) -> bool:
        # Every rank reads the same flags and files: a bad config is rank 0's to report.
        same_everywhere = not ranks.main and not getattr(start, "configured", False)
        quiet.used = same_everywhere or ranks.quiet(error)
        return quiet.used

    prefix = f"rank {ranks.rank}: " if ranks.world > 1 else ""
    status = run_guarded(start, errors=errors, resume_hint=hint, quiet=quiet, prefix=prefix)
    if status == 2 and getattr(quiet, "used", False):
        # torchrun stops every process once one exits: let the rank that reports the error print it.
        time.sleep(1.0)
    if status == 0 and ranks.main:
        print((Path(args.out) / "table.md").read_text(encoding="utf-8"))
    return status


def run(args: argparse.Namespace) -> int:
    """Dispatch ``metakit ner ACTION``; returns the exit status."""
    if args.ner_command == "presets":
        for name, keys in PRESETS.items():
            info = PRESET_INFO[name]
            print(
                f"{name}\n  purpose: {info['purpose']}\n  size:    {info['size']}\n  time:    {info['time']}"
            )
            print("  keys:    " + ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "\n")
        print("Use one with `metakit ner run --preset NAME --out DIR`; override keys with --set KEY=VALUE.")
        return 0
    if args.ner_command in ("verify", "table"):
        from metakit.experiments.folder import wrong_experiment

        if (other := wrong_experiment(args.out, "ner")) is not None:
            print(f"error: {other}", file=sys.stderr)
            return 2
    if args.ner_command == "verify":
        from metakit.experiments.commands import verify_command
        from metakit.experiments.verify import verify_folder

        return verify_command(args.out, verify_folder, "seqeval's F1")
    if args.ner_command == "table":
        from metakit.experiments.report import ResultsFileError, read_results, render_report

        try:
            report = render_report(read_results(Path(args.out) / "results.json"))
        except ResultsFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.write:
            (Path(args.out) / "table.md").write_text(report, encoding="utf-8")
        print(report)
        return 0
    return _run_experiment(args)
