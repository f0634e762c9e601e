"""The documentation site builds with --strict: broken references, links or docstrings fail it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    check_page = (tmp_path / "api" / "check" / "index.html").read_text()
    assert "metakit.preflight.check" in check_page and "Report" in check_page  # rendered from docstrings
    assert (tmp_path / "results" / "fidelity_vs_cost.png").is_file()  # the hook published the plots
    strategies = (tmp_path / "strategies" / "index.html").read_text()
    assert "cosine to exact" in strategies  # the committed bench table is embedded


def test_the_compatibility_table_is_generated_from_the_declarations():
    from metakit.compatibility import TABLE_END, TABLE_START, documented_table

    text = (ROOT / "docs" / "strategies.md").read_text(encoding="utf-8")
    block = text[text.index(TABLE_START) + len(TABLE_START) : text.index(TABLE_END)].strip()
    assert block == documented_table(), (
        "docs/strategies.md's compatibility table is stale; regenerate it with "
        "python -c \"from metakit.compatibility import write_table; write_table('docs/strategies.md')\""
    )


def test_docstrings_use_no_sphinx_roles():
    # mkdocstrings renders Markdown: a Sphinx role (:class:`X`) would show as raw text on the API pages
    # (docs/hooks.py also fails the site build on one).
    import re

    role = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`")
    found = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "metakit").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if role.search(line)
    ]
    assert not found, found
