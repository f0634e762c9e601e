"""``metakit bench``: compare meta-gradient strategies on time, memory and fidelity.

Examples::

    metakit bench                                  # quick default, a few minutes on a CPU
    metakit bench --full --out benchmarks/results  # the committed grid
    metakit bench --workloads bert priming --strategies second-order first-order --steps 1 5
    metakit bench --from-records benchmarks/results/records.json --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from metakit.bench.grid import FULL, QUICK, canonical_workload, expand
from metakit.bench.strategies import canonical_strategy, names
from metakit.bench.workloads import WORKLOADS

__all__ = ["add_arguments", "run"]


def _names(canonical: Callable[[str], str | list[str]]) -> Callable[[str], list[str]]:
    """An argparse ``type`` that splits commas and turns unknown names into a usage error."""

    def parse(text: str) -> list[str]:
        names: list[str] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                found = canonical(part)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None
            names += found if isinstance(found, list) else [found]
        return names

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _reject_unknown_options(parser: argparse.ArgumentParser) -> None:
    """Report an unknown option with ``metakit bench``'s own usage.

    argparse hands a subcommand's unknown options back to the top-level parser, whose message shows
    ``metakit``'s usage and hides every ``bench`` option.
    """
    parse_known_args = parser.parse_known_args

    def strict(args=None, namespace=None):
        parsed, unknown = parse_known_args(args, namespace)
        if unknown:
            parser.error(
                f"unrecognized arguments: {' '.join(unknown)} (see `metakit bench --help` for the options)"
            )
        return parsed, unknown

    parser.parse_known_args = strict


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``metakit bench``'s options to ``parser``."""
    _reject_unknown_options(parser)
    parser.add_argument(
        "--full",
        action="store_true",
        help="the full grid (S=1,5,10,20, Vmap, priming reuse) instead of the quick one",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--workloads", type=_names(canonical_workload), nargs="+", action="extend", metavar="NAME",
        help=f"{', '.join(WORKLOADS)}, or sweep (comma or space separated)",
    )  # fmt: skip
    parser.add_argument(
        "--strategies", type=_names(canonical_strategy), nargs="+", action="extend", metavar="NAME",
        help=f"{', '.join(names())} (also SecondOrder, Truncated(1), ...)",
    )  # fmt: skip
    parser.add_argument(
        "--steps", type=_positive_int, nargs="+", metavar="S", help="inner steps, e.g. --steps 1 5 10"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("metakit-bench"), help="output folder (default ./metakit-bench)"
    )
    parser.add_argument(
        "--repeats", type=_positive_int, default=3, help="timed meta-steps per configuration (median)"
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads per configuration (default 1)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds before a configuration is abandoned"
    )
    parser.add_argument(
        "--memory-limit-gib", type=float, default=8.0,
        help="on CPU, a configuration that needs more than this much extra memory fails as 'oom' (0: no limit)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--from-records", type=Path, metavar="FILE",
        help="measure nothing: rebuild the table and plots in --out from a records.json "
        "(or the records.partial.jsonl an interrupted run leaves)",
    )  # fmt: skip


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "metakit bench: error: --device cuda was requested but no CUDA GPU is available "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False). Use --device cpu."
        )
    return requested


def _unique(groups: list[list[str]] | None) -> list[str] | None:
    """Flatten the parsed name lists (one per argument), dropping repeats."""
    return list(dict.fromkeys(name for group in groups for name in group)) if groups else None


def _load_records(path: Path) -> tuple[list[dict], dict]:
    """Records and environment from a ``records.json``, or records alone from a partial JSON-lines file.

    Raises:
        SystemExit: the file is missing, is not JSON, or does not hold ``metakit bench`` records.
    """
    if path.is_dir() and (path / "records.json").exists():
        path = path / "records.json"
    if not path.is_file():
        raise SystemExit(f"metakit bench: error: --from-records {path} does not exist (or is not a file)")

    def bad(reason: str) -> SystemExit:
        return SystemExit(
            f"metakit bench: error: --from-records {path} is not a records file of `metakit bench` ({reason}); "
            "pass the records.json or records.partial.jsonl that a run wrote"
        )

    text = path.read_text(errors="replace")
    try:
        if path.suffix == ".jsonl":
            records, environment = [json.loads(line) for line in text.splitlines() if line.strip()], {}
        else:
            data = json.loads(text)
            if not isinstance(data, dict) or "records" not in data:
                raise bad("no 'records' key at the top level")
            records, environment = data["records"], data.get("environment") or {}
    except json.JSONDecodeError as error:
        raise bad(f"not valid JSON: {error}") from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or not {"status", "config"} <= record.keys():
            raise bad(f"record {number} lacks 'status' or 'config'")
    return records, environment


def _write_outputs(records: list[dict], environment: dict, out: Path) -> None:
    from metakit.bench.plots import write_plots
    from metakit.bench.report import markdown_report, markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "records.json").write_text(json.dumps({"environment": environment, "records": records}, indent=1))
    (out / "results.md").write_text(markdown_report(records, environment))
    plots = write_plots(records, out, environment["device"])
    print(markdown_table(records))
    print(f"\nwrote {out / 'records.json'}, {out / 'results.md'} and {len(plots)} plots", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Run the grid, print the table, and write records, ``results.md`` and plots to ``--out``."""
    from metakit.bench.environment import describe_environment
    from metakit.bench.runner import run_configs

    if args.from_records is not None:
        records, environment = _load_records(args.from_records)
        if not environment:
            device = records[0]["config"]["device"] if records else "cpu"
            environment = describe_environment(device, records[0].get("threads", 1) if records else 1)
            environment["note"] = f"rebuilt from {args.from_records.name}; machine described at rebuild time"
        _write_outputs(records, environment, args.out)
        return 0

    device = _device(args.device)
    configs = expand(
        FULL if args.full else QUICK,
        workloads=_unique(args.workloads),
        strategies=_unique(args.strategies),
        steps=sorted(set(args.steps)) if args.steps else None,
        device=device,
        repeats=args.repeats,
        threads=args.threads,
        memory_limit_gib=args.memory_limit_gib if device == "cpu" else 0.0,
    )
    environment = describe_environment(device, args.threads)
    _prepare_out(args.out)
    checkpoint = args.out / "records.partial.jsonl"
    kept = _measured(checkpoint, configs)
    todo = [config for config in configs if _key(config) not in {_key_of(r) for r in kept}]
    count = f"{len(todo)} configuration{'s' if len(todo) != 1 else ''}"
    resumed = f" ({len(kept)} already measured in {checkpoint}, kept)" if kept else ""
    print(f"metakit bench: {count} on {device}, each in a fresh process{resumed}", file=sys.stderr)
    checkpoint.write_text("".join(json.dumps(record) + "\n" for record in kept))
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        new = run_configs(todo, timeout_s=args.timeout, progress=not args.no_progress, checkpoint=checkpoint)
    except KeyboardInterrupt as interrupt:
        done = len(_measured(checkpoint, configs))
        print(
            f"interrupted: {done} of {len(configs)} configurations are measured and kept in {checkpoint}; "
            f"run the same command again (same --out) to measure the rest",
            file=sys.stderr,
        )
        return 143 if isinstance(interrupt, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    by_key = {_key_of(record): record for record in [*kept, *new]}
    records = [by_key[_key(config)] for config in configs]
    environment["load_average_at_end"] = list(os.getloadavg())
    if kept:
        environment["resumed_records"] = len(kept)
    _write_outputs(records, environment, args.out)
    checkpoint.unlink()
    return 0 if any(r["status"] == "ok" for r in records) else 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same message and the kept records apply."""


def _terminated(signum, frame) -> None:
    raise _Terminated


def _prepare_out(out: Path) -> None:
    """Create ``--out``, or exit with one line saying why it cannot be used."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"metakit bench: error: --out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise SystemExit(
            f"metakit bench: error: --out {out} cannot be written ({error.strerror or error}); choose another --out"
        ) from None


def _key(config) -> str:
    return _canonical(json.loads(config.to_json()))


def _key_of(record: dict) -> str:
    return _canonical(record["config"])


def _canonical(config: dict) -> str:
    """A configuration's identity: its fields but the scratch path of its gradient, which a record drops."""
    return json.dumps({k: v for k, v in config.items() if k != "grad_path"}, sort_keys=True)


def _measured(checkpoint: Path, configs) -> list[dict]:
    """The records an interrupted run of these configurations left in ``checkpoint`` (unreadable lines dropped)."""
    if not checkpoint.is_file():
        return []
    wanted = {_key(config) for config in configs}
    records = []
    for line in checkpoint.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            if isinstance(record, dict) and _key_of(record) in wanted:
                records.append(record)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    return records
