"""``python -m metakit.experiments ...`` — the same as ``metakit ner ...``."""

import argparse
import sys

from metakit.experiments.cli import add_arguments, run

parser = argparse.ArgumentParser(
    prog="metakit ner", description="The priming experiment: cross-lingual WikiAnn NER."
)
add_arguments(parser)
sys.exit(run(parser.parse_args()))
