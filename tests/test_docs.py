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
