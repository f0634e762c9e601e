"""Every page's Python blocks run as written, in order, on the tiny models they build themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PAGES = sorted(p for p in (ROOT / "docs").glob("*.md") if BLOCK.search(p.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_pages_python_blocks_run(page, tmp_path, monkeypatch):
    if page.name == "pe-modules.md":
        pytest.importorskip("peft")
    monkeypatch.chdir(tmp_path)  # blocks that write files (export_peft) write here
    namespace: dict = {"__name__": "__docs__"}
    for number, block in enumerate(BLOCK.findall(page.read_text(encoding="utf-8")), 1):
        code = compile(block, f"{page.name}, block {number}", "exec")
        exec(code, namespace)


def test_every_page_with_code_is_covered():
    assert {p.name for p in PAGES} >= {
        "check.md",
        "concepts.md",
        "getting-started.md",
        "pe-modules.md",
        "recipes.md",
    }
