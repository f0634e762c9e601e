#!/usr/bin/env bash
# The core install: build the wheel, install it with its core dependencies only (torch, torchopt)
# into a clean venv, run the README's first example and `metakit --help` there.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet torch==2.13.0
"$work/venv/bin/python" -m pip install --quiet "$work"/dist/metakit-*.whl
for heavy in transformers datasets scikit-learn seqeval tensorboard matplotlib; do
    if "$work/venv/bin/python" -m pip show --quiet "$heavy" 2>/dev/null; then
        echo "the core install pulled in $heavy" >&2
        exit 1
    fi
done
echo "core install: $("$work/venv/bin/python" -m pip list --format=freeze | wc -l) packages"
# The README's first example (its first python block), run from outside the repository.
python - "$work/example.py" <<'PY'
import re, sys
text = open("README.md", encoding="utf-8").read()
open(sys.argv[1], "w", encoding="utf-8").write(re.search(r"```python\n(.*?)```", text, re.S).group(1))
PY
(cd "$work" && "$work/venv/bin/python" example.py > /dev/null)
"$work/venv/bin/metakit" --help > /dev/null
echo "core install: README example and metakit --help ran"
