"""``metakit fewshot``: Meta-Adapters and its baselines on LEOPARD, or on your own tasks, from the command line.

Usage::

    metakit fewshot run --preset tiny --task-config examples/own-tasks/tasks.toml --out runs/own  # your tasks
    metakit fewshot run --preset cpu-quick --out runs/quick                       # a few minutes
    metakit fewshot run --preset cpu --settings adapters,meta_adapters --out runs/x
    metakit fewshot run --config exp.toml --tasks scitail --shots 8 --set ft_steps=16 --out runs/y
    metakit fewshot run --out runs/x --resume                                     # continue with its config
    metakit fewshot verify runs/x                                                 # recompute every score
    metakit fewshot table runs/x --write                                          # re-render the table
    metakit fewshot merge runs/a runs/b --out runs/x                              # join side-by-side runs
    metakit fewshot presets                                                       # list presets and keys
    metakit fewshot budget run --preset cpu --setting meta_adapters --baseline adapters \
        --budgets 30,100,300 --rates 3e-4,1e-3 --shots 8 --episodes 0,1 --out runs/budget     # budget study
    metakit fewshot budget plot runs/budget-a runs/budget-b --out budget.png      # gain against meta-steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from metakit.experiments.commands import (
    add_folder_commands,
    add_run_options,
    config_for_run,
    int_list,
    parse_sets,
    run_and_show_table,
    str_list,
    verify_command,
)
from metakit.experiments.fewshot.config import FEWSHOT_PRESETS, FewShotConfig, load_fewshot_config

__all__ = ["add_arguments", "run"]

#: Bad input a run reports in one ``error:`` line (with the folder lock's and results file's errors).
_RUN_ERRORS = (ValueError, FileNotFoundError, FileExistsError, ImportError)

PRESET_PURPOSE = {
    "paper": "every task, k in {4, 8, 16}, 10 episodes, full test sets, exact meta-gradients: a GPU",
    "cpu": "all twelve tasks at k = 8, 16, episodes 0-1, 100 test examples per task, every setting: two "
    "1-thread halves side by side, ~75 min each on 2 cores, joined by `metakit fewshot merge`",
    "cpu-quick": "three tasks, k = 8, episode 0, 100 test examples: ~9 min for all nine settings, 1 CPU thread",
    "tiny": "a random tiny BERT; plumbing checks for tests, seconds",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``run``, ``verify``, ``table`` and ``presets`` under ``metakit fewshot``."""
    commands = parser.add_subparsers(dest="fewshot_command", required=True, metavar="ACTION")
    run_parser = commands.add_parser("run", help="run (or resume) settings × tasks × k × episodes")
    run_parser.add_argument(
        "--preset", choices=sorted(FEWSHOT_PRESETS), help="starting point (default: the file's, else cpu)"
    )
    run_parser.add_argument(
        "--config", help="a .toml or .yaml file of config keys (optionally 'preset = ...')"
    )
    run_parser.add_argument("--settings", type=str_list, help="e.g. adapters,meta_adapters (default: all)")
    run_parser.add_argument(
        "--task-config",
        metavar="FILE",
        help="a .toml or .yaml file of your own [[pool]] and [[targets]] tasks, instead of LEOPARD's",
    )
    run_parser.add_argument(
        "--tasks",
        type=str_list,
        help="targets, e.g. scitail,airline (default: all of LEOPARD's or the task file's)",
    )
    run_parser.add_argument(
        "--shots", type=int_list, help="k per class: 4,8,16 for LEOPARD, any with --task-config"
    )
    run_parser.add_argument("--episodes", type=int_list, help="episode numbers, e.g. 0,1")
    run_parser.add_argument("--model", help="'e5' (offline), 'tiny', or a local path / hub name")
    add_run_options(run_parser)
    add_folder_commands(
        commands,
        table_help="render the markdown report of an output folder",
        verify_help="recompute every accuracy and macro-F1 from its predictions; exit 1 on a mismatch",
    )
    merge_parser = commands.add_parser(
        "merge", help="join folders of one config that ran different settings or tasks side by side"
    )
    merge_parser.add_argument("sources", nargs="+", help="two or more `fewshot run` output folders")
    merge_parser.add_argument("--out", required=True, help="the new, merged folder")
    _add_budget_arguments(commands)


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_budget_arguments(commands: Any) -> None:
    budget = commands.add_parser(
        "budget", help="a meta-training budget study: accuracy gain against meta-steps, rates chosen on dev"
    )
    actions = budget.add_subparsers(dest="budget_command", required=True, metavar="ACTION")
    run_parser = actions.add_parser(
        "run", help="sweep rates, choose each budget's on the pool's dev, evaluate"
    )
    run_parser.add_argument("--preset", choices=sorted(FEWSHOT_PRESETS), help="base config (default: cpu)")
    run_parser.add_argument("--config", help="a .toml or .yaml file of base config keys")
    run_parser.add_argument(
        "--setting", help="the meta-trained setting, e.g. meta_adapters (required unless --resume)"
    )
    run_parser.add_argument("--baseline", help="the from-scratch setting to compare with, e.g. adapters")
    run_parser.add_argument(
        "--baseline-from", metavar="FOLDER", help="take the baseline's units from this fewshot run folder"
    )
    run_parser.add_argument(
        "--budgets", type=int_list, default=[30, 100, 300], help="meta-steps (30,100,300)"
    )
    run_parser.add_argument("--rates", type=_float_list, default=[3e-4, 1e-3], help="outer rates (3e-4,1e-3)")
    run_parser.add_argument(
        "--inner-rates", type=_float_list, help="choose the inner rate among these first, on dev, at step 0"
    )
    run_parser.add_argument("--dev-every", type=int, default=10, help="dev episodes every N steps (10)")
    run_parser.add_argument("--tasks", type=str_list, help="targets (default: all)")
    run_parser.add_argument("--shots", type=int_list, help="k per class, e.g. 8")
    run_parser.add_argument("--episodes", type=int_list, help="episode numbers, e.g. 0,1")
    run_parser.add_argument("--model", help="'e5' (offline), 'tiny', or a local path / hub name")
    add_run_options(run_parser)
    table_parser = actions.add_parser("table", help="print (and with --write rewrite) a study's budget.md")
    table_parser.add_argument("out")
    table_parser.add_argument("--write", action="store_true")
    plot_parser = actions.add_parser(
        "plot", help="accuracy gain and dev loss against meta-steps, for studies"
    )
    plot_parser.add_argument("studies", nargs="+", help="budget study folders")
    plot_parser.add_argument("--out", required=True, help="the PNG to write")


def _budget(args: argparse.Namespace) -> int:
    from metakit.experiments.fewshot.budget import (
        BudgetStudy,
        budget_report,
        run_budget_study,
        study_from_folder,
    )
    from metakit.experiments.folder import saved_config
    from metakit.experiments.lock import FolderLockedError
    from metakit.experiments.report import ResultsFileError, read_results

    try:
        if args.budget_command == "plot":
            from metakit.experiments.fewshot.budget_plot import plot_budget_studies

            plot_budget_studies(args.studies, args.out)
            print(f"wrote {args.out}")
            return 0
        if args.budget_command == "table":
            report = budget_report(study_from_folder(args.out), read_results(Path(args.out) / "results.json"))
            if args.write:
                (Path(args.out) / "budget.md").write_text(report, encoding="utf-8")
            print(report)
            return 0
        if args.resume and not (args.preset or args.config or args.setting) and saved_config(args.out):
            study = study_from_folder(args.out)
        else:
            if not args.setting:
                raise ValueError(
                    "--setting is required (the meta-trained setting to study, e.g. meta_adapters)."
                )
            overrides = {"tasks": args.tasks, "shots": args.shots, "episodes": args.episodes,
                         "model": args.model, "threads": args.threads}  # fmt: skip
            overrides = {k: v for k, v in overrides.items() if v is not None}
            overrides.update(parse_sets(args.set))
            base = load_fewshot_config(args.preset, args.config, overrides)
            study = BudgetStudy(
                base, args.setting, baseline=args.baseline, budgets=args.budgets, rates=args.rates,
                inner_rates=args.inner_rates, dev_every=args.dev_every, baseline_from=(
                    os.path.relpath(args.baseline_from, args.out) if args.baseline_from else None
                ),
            )  # fmt: skip
        run_budget_study(study, args.out, resume=args.resume)
    except (*_RUN_ERRORS, FolderLockedError, ResultsFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\ninterrupted; continue with: metakit fewshot budget run --out {args.out} --resume",
            file=sys.stderr,
        )
        return 130
    print((Path(args.out) / "budget.md").read_text(encoding="utf-8"))
    return 0


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "settings": args.settings,
        "tasks": args.tasks,
        "shots": args.shots,
        "episodes": args.episodes,
        "model": args.model,
        "threads": args.threads,
    }
    keys = {k: v for k, v in flags.items() if v is not None}
    keys.update(parse_sets(args.set))
    return keys


def _config(args: argparse.Namespace) -> FewShotConfig:
    """The run's config; ``--resume`` without ``--preset``/``--config`` starts from the folder's saved one
    (a ``--task-config`` given then must hold the saved tasks: it is compared, not adopted)."""
    from metakit.experiments.folder import saved_config

    overrides = _overrides(args)
    if args.task_config and args.resume and not (args.preset or args.config) and saved_config(args.out):
        from metakit.experiments.fewshot.task_config import read_task_config

        overrides["own_tasks"] = read_task_config(args.task_config).to_dict()

    def load(preset, config_file, keys):
        return load_fewshot_config(preset, config_file, keys, task_config=args.task_config)

    return config_for_run(args, overrides, FewShotConfig, load)


def _run_experiment(args: argparse.Namespace) -> int:
    from metakit.experiments.fewshot.runner import FewShotExperiment
    from metakit.experiments.lock import FolderLockedError
    from metakit.experiments.report import ResultsFileError

    def start() -> None:
        start.experiment = FewShotExperiment(_config(args), args.out, resume=args.resume)
        start.experiment.run()

    return run_and_show_table(
        start,
        args.out,
        errors=(*_RUN_ERRORS, FolderLockedError, ResultsFileError),
        resume_hint=f"metakit fewshot run --out {args.out} --resume",
    )


def run(args: argparse.Namespace) -> int:
    """Dispatch ``metakit fewshot ACTION``; returns the exit status."""
    if args.fewshot_command == "presets":
        for name, keys in FEWSHOT_PRESETS.items():
            print(f"{name}\n  purpose: {PRESET_PURPOSE[name]}")
            print("  keys:    " + ", ".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "\n")
        print(
            "Use one with `metakit fewshot run --preset NAME --out DIR`; override keys with --set KEY=VALUE."
        )
        return 0
    if args.fewshot_command == "budget":
        return _budget(args)
    from metakit.experiments.folder import wrong_experiment
    from metakit.experiments.report import ResultsFileError, read_results

    folders = args.sources if args.fewshot_command == "merge" else [args.out]
    if args.fewshot_command in ("verify", "table", "merge"):
        for folder in folders:
            if (other := wrong_experiment(folder, "fewshot")) is not None:
                print(f"error: {other}", file=sys.stderr)
                return 2
    if args.fewshot_command == "verify":
        from metakit.experiments.fewshot.verify import verify_fewshot_folder

        return verify_command(args.out, verify_fewshot_folder, "sklearn's accuracy and macro-F1")
    if args.fewshot_command == "merge":
        from metakit.experiments.fewshot.merge import merge_folders

        try:
            merged = merge_folders(args.sources, args.out)
        except (ValueError, ResultsFileError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"merged {len(merged['units'])} units from {len(args.sources)} folders into {args.out}")
        return 0
    if args.fewshot_command == "table":
        from metakit.experiments.fewshot.report import render_fewshot_report

        try:
            report = render_fewshot_report(read_results(Path(args.out) / "results.json"))
        except ResultsFileError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if args.write:
            (Path(args.out) / "table.md").write_text(report, encoding="utf-8")
        print(report)
        return 0
    return _run_experiment(args)
