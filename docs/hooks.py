"""mkdocs hooks: publish the committed benchmark plots under ``results/`` without copying them into docs/,
and fail the build on a Sphinx role that would show as raw text."""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def on_files(files, config):
    for plot in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{plot.name}", abs_src_path=str(plot)))
    return files


#: Sphinx cross-reference roles, which mkdocstrings does not render: they would show as raw text.
SPHINX_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):(?:`|<code>)")


def on_page_content(html, page, config, files):
    """Fail the build on a Sphinx role in a rendered page (docstrings use Markdown code spans and
    ``[name][metakit.path]`` cross-references instead)."""
    found = SPHINX_ROLE.search(html)
    if found:
        start = max(found.start() - 60, 0)
        raise PluginError(
            f"{page.file.src_path}: a Sphinx role renders as raw text near {html[start : found.end() + 40]!r}; "
            "write `name` or [`name`][metakit.module.name] in the docstring instead."
        )
    return html
