"""The README's code example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[:1]
    assert "range(100)" in code
    code = code.replace("range(100)", "range(3)")  # same code, fewer meta-steps
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.inner_losses.shape == (25, 6)
    assert result.grad_norms["total"] >= 0
