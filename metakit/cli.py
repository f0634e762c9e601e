"""The ``metakit`` command line: each subcommand lives in its own module, imported only when run."""

from __future__ import annotations

import argparse
import importlib
import sys

from metakit.extras import MissingExtraError

# subcommand -> (module, one-line help). Each module defines add_arguments(parser) and run(args) -> int.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("metakit.bench.cli", "compare gradient strategies: time, memory, fidelity"),
    "plan": ("metakit.bench.plan_cli", "predict each gradient mode's peak memory and time on a device"),
    "ner": ("metakit.experiments.cli", "the priming experiment: cross-lingual WikiAnn NER"),
    "fewshot": ("metakit.experiments.fewshot.cli", "Meta-Adapters and baselines: few-shot LEOPARD"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (its arguments are the only ones needed)."""
    parser = argparse.ArgumentParser(
        prog="metakit", description="Higher-order-gradient meta-learning toolkit."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommand_parsers = {}
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        parser.subcommand_parsers[name] = sub
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    try:
        parser = build_parser(command if command in SUBCOMMANDS else None)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # name them under the subcommand's usage, not the top-level one
            parser.subcommand_parsers[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
        return int(args._run(args) or 0)
    except KeyboardInterrupt:  # before a subcommand could handle it (e.g. while importing torch)
        print("interrupted", file=sys.stderr)
        return 130
    except MissingExtraError as error:  # a subcommand whose extra is not installed
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
