"""WikiAnn loading, label alignment, episodes and seqeval F1 — on fixtures and, when present, the real files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metakit.experiments.data import (
    WIKIANN_LABELS,
    EpisodeSampler,
    align_labels,
    encode_ner,
    entity_f1,
    load_wikiann,
    subsample,
    truncated_count,
    wikiann_features,
    word_predictions,
)
from metakit.experiments.tiny import tiny_tokenizer
from metakit.task import Task

REAL_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikiann"

XTREME = "Berlin\tB-LOC\nis\tO\nnice\tO\n\nAngela\tB-PER\nMerkel\tI-PER\n\n"
RAHIMI = "de:Berlin\tB-LOC\nde:is\tO\nde:nice\tO\n\nde:Angela\tB-PER\nde:Merkel\tI-PER\n"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("text", [XTREME, RAHIMI], ids=["xtreme", "rahimi"])
def test_both_layouts_give_the_hub_features(tmp_path, text):
    write(tmp_path, "train-de.tsv", text)
    ds = load_wikiann("de", "train", data_dir=tmp_path)
    assert ds.features == wikiann_features()
    assert ds["tokens"] == [["Berlin", "is", "nice"], ["Angela", "Merkel"]]
    names = ds.features["ner_tags"].feature.names
    assert [[names[i] for i in s] for s in ds["ner_tags"]] == [["B-LOC", "O", "O"], ["B-PER", "I-PER"]]


def test_validation_is_an_alias_of_dev(tmp_path):
    write(tmp_path, "dev-de.tsv", XTREME)
    assert len(load_wikiann("de", "validation", data_dir=tmp_path)) == 2


def test_missing_folder_names_path_and_expected_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*train-hi\.tsv"):
        load_wikiann("hi", "train", data_dir=missing)


def test_language_without_file_lists_available_languages(tmp_path):
    write(tmp_path, "train-de.tsv", XTREME)
    with pytest.raises(FileNotFoundError, match=r"train-xx\.tsv.*\['de'\]"):
        load_wikiann("xx", "train", data_dir=tmp_path)


def test_tag_outside_label_set_names_file_and_line(tmp_path):
    write(tmp_path, "train-de.tsv", "Berlin\tB-LOC\nEU\tB-MISC\n")
    with pytest.raises(ValueError, match=r"train-de\.tsv:2: tag 'B-MISC'"):
        load_wikiann("de", "train", data_dir=tmp_path)


def test_unknown_split_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="Unknown WikiAnn split 'eval'"):
        load_wikiann("de", "eval", data_dir=tmp_path)


def test_subsample_is_seeded_and_keeps_file_order(tmp_path):
    write(tmp_path, "train-de.tsv", "".join(f"w{i}\tO\n\n" for i in range(50)))
    ds = load_wikiann("de", "train", data_dir=tmp_path)
    a, b, c = subsample(ds, 10, seed=1), subsample(ds, 10, seed=1), subsample(ds, 10, seed=2)
    assert a["tokens"] == b["tokens"] != c["tokens"]
    order = [int(t[0][1:]) for t in a["tokens"]]
    assert order == sorted(order) and len(set(order)) == 10
    assert len(subsample(ds, None)) == len(subsample(ds, 500)) == 50


def test_align_labels_first_subword_only():
    assert align_labels([None, 0, 0, 1, 2, 2, None], [5, 0, 1]) == [-100, 5, -100, 0, 1, -100, -100]


def test_encode_aligns_and_counts_truncation(tmp_path):
    write(tmp_path, "train-de.tsv", XTREME)
    ds = load_wikiann("de", "train", data_dir=tmp_path)
    tokenizer = tiny_tokenizer(w for s in ds["tokens"] for w in s)
    enc = encode_ner(ds, tokenizer, max_length=32)
    # [CLS] Ber ##lin is nic ##e [SEP]
    assert enc[0]["labels"] == [-100, 5, -100, 0, 0, -100, -100]
    assert enc[0]["word_index"] == [-100, 0, -100, 1, 2, -100, -100]
    assert truncated_count(enc) == 0
    short = encode_ner(ds, tokenizer, max_length=4)  # [CLS] Ber ##lin [SEP]: two words lost
    assert short[0]["n_words_kept"] == 1 and truncated_count(short) == 2


def test_episode_sampler_one_task_per_language_with_model_batches(tmp_path):
    text = "".join(f"Berlin\tB-LOC\nw{i}\tO\n\n" for i in range(20))
    write(tmp_path, "train-de.tsv", text)
    write(tmp_path, "train-nl.tsv", text)
    data = {lang: load_wikiann(lang, "train", data_dir=tmp_path) for lang in ("de", "nl")}
    tokenizer = tiny_tokenizer(w for s in data["de"]["tokens"] for w in s)
    encoded = {lang: encode_ner(ds, tokenizer) for lang, ds in data.items()}
    tasks = EpisodeSampler(encoded, tokenizer, support_size=3, query_size=2, seed=0).sample()
    assert len(tasks) == 2 and all(isinstance(t, Task) for t in tasks)
    support, query = tasks[0].support, tasks[0].query
    assert set(support) == {"input_ids", "attention_mask", "labels"}
    assert support["input_ids"].shape[0] == 3 and query["labels"].shape[0] == 2
    assert support["labels"].dtype == torch.long
    again = EpisodeSampler(encoded, tokenizer, support_size=3, query_size=2, seed=0).sample()
    assert torch.equal(again[1].support["input_ids"], tasks[1].support["input_ids"])


def test_episode_sampler_rejects_too_small_language(tmp_path):
    write(tmp_path, "train-de.tsv", XTREME)
    ds = load_wikiann("de", "train", data_dir=tmp_path)
    tokenizer = tiny_tokenizer(w for s in ds["tokens"] for w in s)
    with pytest.raises(ValueError, match="'de' has 2 sentences"):
        EpisodeSampler({"de": encode_ner(ds, tokenizer)}, tokenizer, support_size=2, query_size=2)


def test_entity_f1_and_word_predictions():
    gold = [["B-PER", "I-PER", "O"], ["B-LOC"]]
    assert entity_f1(gold, gold) == 1.0
    assert entity_f1(gold, [["B-PER", "O", "O"], ["B-LOC"]]) == pytest.approx(0.5)
    logits = torch.zeros(1, 5, len(WIKIANN_LABELS))
    logits[0, 1, 1] = logits[0, 3, 5] = 1.0  # word 0 -> B-PER, word 1 -> B-LOC
    tags = word_predictions(logits, [[-1, 0, -1, 1, -1]], [3], WIKIANN_LABELS)
    assert tags == [["B-PER", "B-LOC", "O"]]  # word 2 was truncated: tagged O
    with pytest.raises(ValueError, match="2 gold sentences but 1"):
        entity_f1(gold, gold[:1])


# -- the real files ----------------------------------------------------------------------------------
COUNTS = {
    "en": (20000, 10000, 10000),
    "es": (20000, 10000, 10000),
    "nl": (20000, 10000, 10000),
    "et": (15000, 10000, 10000),
    "lt": (10000, 10000, 10000),
    "az": (10000, 1000, 1000),
    "hi": (5000, 1000, 1000),
    "af": (5000, 1000, 1000),
}
needs_real_data = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} is absent")


def count_sentences(path: Path) -> int:
    count, inside = 0, False
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                inside = True
            elif inside:
                count, inside = count + 1, False
    return count + inside


@needs_real_data
@pytest.mark.parametrize("lang", sorted(COUNTS))
def test_real_sentence_counts_match_the_readme(lang):
    for split, expected in zip(("train", "dev", "test"), COUNTS[lang], strict=True):
        assert count_sentences(REAL_DATA / f"{split}-{lang}.tsv") == expected, (lang, split)


@needs_real_data
def test_real_file_loads_as_dataset():
    ds = load_wikiann("hi", "test", data_dir=REAL_DATA)
    assert len(ds) == 1000 and ds.features == wikiann_features()
