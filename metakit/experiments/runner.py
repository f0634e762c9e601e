"""Runs the units of the experiment — (setting, target language, seed) — and keeps the output folder current.

Layout of the output folder::

    config.json          the full config and its fingerprint (a resumed run must match it)
    results.json         every finished unit (F1, timings, share of parameters updated), priming runs
    table.md             the paper's Table 1 shape, rewritten after every unit
    runs/s{N}-seed{S}/predictions-{lang}.jsonl.gz   the unit's result, then its predictions
    .lock                held (``flock``) by the process writing the folder
    tensorboard/         prime-{slug}-seed{S} (inner losses, adaptation gain), ft-{slug}-{lang}-seed{S}
                         (fine-tuning loss); {slug} is the setting's Setting.slug, e.g. s4-meta-priming
    checkpoints/         priming checkpoints and primed weights (git-ignored, large)

Priming runs once per (setting, seed) and is shared by every target language.

Under ``torchrun`` (`metakit.experiments.ranks`) every rank runs this loop: meta priming splits
its meta-batches across the ranks, the units of a (setting, seed) are split target by target, and
rank 0 alone writes the folder.

One process writes a folder at a time (`FolderLock`). A unit's
result and predictions are written together in one file with one rename, and only then added to
``results.json``; ``metakit ner verify`` recomputes every F1 from those files.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from metakit.experiments.config import ExperimentConfig, differing_keys
from metakit.experiments.data.locate import locate
from metakit.experiments.data.metrics import entity_f1
from metakit.experiments.data.ner import encode_ner, make_collator, model_inputs, truncated_count
from metakit.experiments.data.wikiann import (
    WIKIANN_HUB_NAME,
    WIKIANN_LABELS,
    load_wikiann,
    wikiann_files,
    wikiann_path,
)
from metakit.experiments.finetune import finetune, predict, sentence_features
from metakit.experiments.folder import open_folder, saved_config
from metakit.experiments.model import Backbone, check_model, fraction, trainable_state
from metakit.experiments.priming import load_checkpoint, prime
from metakit.experiments.ranks import Failure, Ranks, ScalarRecorder
from metakit.experiments.report import (
    environment,
    render_report,
    save_predictions,
    write_json,
)
from metakit.experiments.settings import SETTINGS, Setting

__all__ = ["Experiment", "saved_config"]

#: Data sub-samples use this seed for every run seed, so seeds differ in initialisation and order only.
DATA_SEED = 0


class Experiment:
    """The priming experiment on one output folder, which it locks until `close`.

    Args:
        config: what to run.
        out_dir: where results, predictions, logs and checkpoints go.
        resume: continue a folder that already holds results (every key that changes results must match).
        ranks: the processes of a ``torchrun`` launch (`Ranks.from_environment`); one by default.

    Example:
        >>> with Experiment(load_config("tiny"), "runs/tiny") as experiment:  # doctest: +SKIP
        ...     experiment.run()
    """

    def __init__(
        self, config: ExperimentConfig, out_dir: str | Path, resume: bool = False, ranks: Ranks | None = None
    ):
        self.config, self.out, self.ranks = config, Path(out_dir), ranks or Ranks()
        self.results_path = self.out / "results.json"
        self.activity = "starting"
        self.lock, results, error = None, None, None
        if self.ranks.main:  # the other ranks receive what rank 0 read, or its error
            try:
                self._check_inputs()  # before anything is written, so a failed start leaves no folder behind
                self.lock, results = open_folder(
                    self.out,
                    config.to_dict(),
                    config.fingerprint(),
                    differing=lambda saved: differing_keys(saved, config.to_dict()),
                    resume=resume,
                    empty={"units": [], "priming": {}, "elapsed_seconds": 0.0},
                    experiment="ner",
                )
            except Exception as caught:
                if not self.ranks.launched:
                    raise
                error = caught
        if self.ranks.launched:
            shared, failures = self.ranks.meet(error, "opening the output folder", results)
            self.ranks.raise_failures(error, failures)
            results = shared[0]
        self.results = results

    def close(self) -> None:
        """Release the output folder."""
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the output folder -------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        c = self.config
        check_model(c.model)
        # Where the data is (a folder, or the hub: checked when it loads); a clear error if nowhere.
        folder = locate(
            "wikiann",
            c.data_dir,
            hub=lambda: None,
            hub_name=WIKIANN_HUB_NAME,
            label="WikiAnn",
            expected=wikiann_files(c.sources[0]),
        )
        if folder is None:
            return
        for lang in c.sources:
            wikiann_path(folder, lang, "train")
        for lang in c.targets:
            wikiann_path(folder, lang, "train")
            wikiann_path(folder, lang, "test")

    def done(self, setting: int, lang: str, seed: int) -> bool:
        """Whether the unit has a result on disk."""
        return any(
            (u["setting"], u["lang"], u["seed"]) == (setting, lang, seed) for u in self.results["units"]
        )

    def progress(self) -> str:
        """Where the run is, for a message on interruption: finished units and the current activity."""
        c = self.config
        total = len(c.seeds) * len(c.settings) * len(c.targets)
        selected = sum(
            (u["setting"], u["lang"], u["seed"])
            in {(s, t, e) for s in c.settings for t in c.targets for e in c.seeds}
            for u in self.results["units"]
        )
        return f"{selected} of {total} units, during {self.activity}"

    def _save(self) -> None:
        if not self.ranks.main:
            return
        self.results["config"] = self.config.to_dict()
        self.results["environment"] = environment()
        write_json(self.results_path, self.results)
        (self.out / "table.md").write_text(render_report(self.results), encoding="utf-8")

    # -- data ----------------------------------------------------------------------------------------
    def _load_data(self) -> None:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()  # one bar per tiny map() drowns the experiment's own progress bars
        c = self.config
        take = {"source": c.source_sentences, "train": c.target_sentences, "test": c.test_sentences}
        raw_sources = {
            lang: load_wikiann(lang, "train", c.data_dir, max_sentences=take["source"], seed=DATA_SEED)
            for lang in c.sources
        }
        raw_train = {
            lang: load_wikiann(lang, "train", c.data_dir, max_sentences=take["train"], seed=DATA_SEED)
            for lang in c.targets
        }
        raw_test = {
            lang: load_wikiann(lang, "test", c.data_dir, max_sentences=take["test"], seed=DATA_SEED)
            for lang in c.targets
        }
        words = (
            w
            for group in (raw_sources, raw_train, raw_test)
            for ds in group.values()
            for s in ds["tokens"]
            for w in s
        )
        self.backbone = Backbone(c, tiny_words=words if c.model == "tiny" else ())
        tokenizer = self.backbone.tokenizer
        self.collator = make_collator(tokenizer)

        def encode(group: dict[str, Dataset], split: str) -> dict[str, Dataset]:
            encoded = {lang: encode_ner(ds, tokenizer, c.max_length) for lang, ds in group.items()}
            for lang, ds in encoded.items():
                self.results.setdefault("truncated", {})[f"{split}-{lang}"] = {
                    "sentences": len(ds),
                    "truncated": truncated_count(ds),
                }
            return encoded

        self.sources = encode(raw_sources, "source")
        self.train = encode(raw_train, "train")
        self.test = encode(raw_test, "test")
        cut = {k: v["truncated"] for k, v in self.results["truncated"].items() if v["truncated"]}
        if cut and self.ranks.main:
            tqdm.write(f"Sentences truncated to max_length={c.max_length} sub-words: {cut}")

    # -- running ---------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run every unfinished unit; returns the results dict (also in ``results.json``)."""
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)
        began = time.perf_counter()
        units = [(s, lang, seed) for seed in c.seeds for s in c.settings for lang in c.targets]
        todo = [u for u in units if not self.done(*u)]
        if not todo:
            if self.ranks.main:
                tqdm.write(f"All {len(units)} units are finished in {self.out}.")
            self._save()
            return self.results
        self.activity = "loading the data and the model"
        self._load_data()
        self._check_episodes()
        self._pristine: dict[tuple[str, str], list[torch.Tensor]] = {}
        bar = tqdm(
            total=len(units),
            initial=len(units) - len(todo),
            desc="units",
            unit="unit",
            disable=not self.ranks.main,
        )
        finished_before = len(self.results["units"])
        try:
            with bar:
                for seed in c.seeds:
                    for number in c.settings:
                        langs = [lang for lang in c.targets if not self.done(number, lang, seed)]
                        if not langs:
                            continue
                        setting = SETTINGS[number]
                        self.activity = f"priming s{number} seed {seed} (it resumes from its last checkpoint)"
                        primed, state = self._prime_or_skip(setting, seed)
                        if not primed:
                            bar.update(len(langs))
                            continue
                        self._units(setting, seed, langs, state, bar)
        except BaseException:
            # An interrupted invocation that finished units still counts (the report's wall time).
            self._note_interrupted(began, len(self.results["units"]) - finished_before)
            raise
        self.activity = "the final save"
        wall = time.perf_counter() - began
        invocation = {"wall_seconds": wall, "units": len(todo)}
        if self.ranks.launched:
            invocation["processes"] = self.ranks.world
        self.results.setdefault("invocations", []).append(invocation)
        self._save()
        if self.ranks.main:
            tqdm.write(f"Finished in {wall:.0f} s; table: {self.out / 'table.md'}")
        return self.results

    def _check_episodes(self) -> None:
        """Meta priming's episodes must fit the source data: refused before any unit runs (the folder,
        with no finished unit, is reused by the next run)."""
        c = self.config
        if not any(SETTINGS[number].priming in ("meta", "maml_loop") for number in c.settings):
            return
        need = c.support_size + c.query_size
        for lang, encoded in self.sources.items():
            if len(encoded) < need:
                raise ValueError(
                    f"Language {lang!r} has {len(encoded)} sentences; an episode needs support_size + "
                    f"query_size = {need}. Lower them (--set support_size=...) or raise source_sentences."
                )

    def _note_interrupted(self, began: float, finished: int) -> None:
        if not finished or not self.ranks.main:
            return
        invocation = {"wall_seconds": time.perf_counter() - began, "units": finished, "interrupted": True}
        self.results.setdefault("invocations", []).append(invocation)
        self._save()

    def _prime_or_skip(self, setting: Setting, seed: int) -> tuple[bool, dict | None]:
        """``(True, primed state or None)``, or ``(False, None)`` when priming failed in floating point.

        A floating-point failure (e.g. ``InnerLossError``) skips that priming's units; the others still
        run. Under ``torchrun`` the ranks meet after priming and skip, or stop, together.
        """
        error: Exception | None = None
        state = None
        try:
            state = self._primed(setting, seed) if setting.priming else None
        except Exception as caught:
            if not (self.ranks.launched or isinstance(caught, FloatingPointError)):
                raise
            error = caught
        failures = []
        if self.ranks.launched and setting.priming:
            _, failures = self.ranks.meet(error, f"priming s{setting.number} seed {seed}")
        elif error is not None:
            failures = [Failure.of(self.ranks.rank, error)]
        if not failures:
            return True, state
        if not all(f.floating_point for f in failures):
            self.ranks.raise_failures(error, [f for f in failures if f.rank != self.ranks.rank])
        message = failures[0].message
        if self.ranks.main:
            tqdm.write(f"Priming s{setting.number} seed {seed} failed, its units are skipped: {message}")
        self.results.setdefault("failed", {})[f"s{setting.number}-seed{seed}"] = message
        self._save()
        return False, None

    def _units(self, setting: Setting, seed: int, langs: list[str], state: dict | None, bar: tqdm) -> None:
        """Run the units of (setting, seed) for ``langs``: this rank's share; rank 0 records them all."""
        remote: list[tuple[str, dict, list, list]] = []  # what this rank sends to rank 0
        error: Exception | None = None
        try:
            for lang in self.ranks.mine(langs):
                bar.set_postfix(setting=setting.number, lang=lang, seed=seed)
                self.activity = f"unit s{setting.number} {lang} seed {seed} (it restarts)"
                unit, predicted, scalars = self._unit(setting, lang, seed, state)
                if self.ranks.main:
                    self._record(unit)
                    bar.update(1)
                else:
                    remote.append((lang, unit, predicted, scalars))
        except Exception as caught:
            if not self.ranks.launched:
                raise
            error = caught
        if not self.ranks.launched:
            return
        sent, failures = self.ranks.meet(error, f"the units of s{setting.number} seed {seed}", remote)
        self.ranks.raise_failures(error, failures)
        if not self.ranks.main:
            return
        for lang, unit, predicted, scalars in (record for records in sent[1:] for record in records):
            writer = SummaryWriter(str(self._unit_log(setting, lang, seed)))
            try:
                for tag, value, step in scalars:
                    writer.add_scalar(tag, value, step)
            finally:
                writer.close()
            self._write_predictions(unit, lang, predicted)
            self._record(unit)
            bar.update(1)

    def _record(self, unit: dict[str, Any]) -> None:
        self.results["units"].append(unit)
        self.results["elapsed_seconds"] += unit["seconds"]
        self._save()

    def _unit_log(self, setting: Setting, lang: str, seed: int) -> Path:
        return self.out / "tensorboard" / f"ft-{setting.slug}-{lang}-seed{seed}"

    def _write_predictions(self, unit: dict[str, Any], lang: str, predicted: list[list[str]]) -> None:
        gold = [[WIKIANN_LABELS[i] for i in tags] for tags in self.test[lang]["ner_tags"]]
        save_predictions(
            self.out / unit["predictions"], self.test[lang]["tokens"], gold, predicted, result=unit
        )

    def _primed(self, setting: Setting, seed: int) -> dict[str, torch.Tensor]:
        """The primed model's trained tensors for (setting, seed), priming (or resuming it) if needed."""
        key = f"s{setting.number}-seed{seed}"
        folder = self.out / "checkpoints" / f"prime-{key}"
        primed = folder / "primed.pt"
        if primed.is_file():
            return load_checkpoint(primed, f"priming s{setting.number} seed {seed}", weights_only=True)
        tagger, groups = self.backbone.build(setting, seed)
        info = prime(
            tagger,
            groups,
            setting,
            self.config,
            self.sources,
            self.backbone.tokenizer,
            seed,
            checkpoint_dir=folder,
            log_dir=self.out / "tensorboard" / f"prime-{setting.slug}-seed{seed}",
            ranks=self.ranks,
        )
        state = trainable_state(tagger, groups.backbone | groups.adapter | groups.head)
        if self.ranks.main:
            torch.save(state, primed.with_suffix(".tmp"))
            primed.with_suffix(".tmp").replace(primed)
        self.results["priming"][key] = info
        self.results["elapsed_seconds"] += info["seconds"]
        self._save()
        return state

    def _features(
        self, tagger, setting: Setting, lang: str, split: str, encoded: Dataset
    ) -> list[torch.Tensor]:
        # The unprimed encoder gives the same features to settings 2 and 3 and to every seed.
        key = (lang, split)
        if setting.priming is None and key in self._pristine:
            return self._pristine[key]
        features = sentence_features(
            tagger, model_inputs(encoded), self.collator, self.config.eval_batch_size
        )
        if setting.priming is None:
            self._pristine[key] = features
        return features

    def _unit(
        self, setting: Setting, lang: str, seed: int, state: dict | None
    ) -> tuple[dict[str, Any], list[list[str]], list[tuple[str, float, int]]]:
        """One unit: ``(result, predicted tags, scalars a non-writing rank recorded for rank 0)``.

        Rank 0 writes the unit's TensorBoard log and predictions file itself; another rank returns them.
        """
        c, began = self.config, time.perf_counter()
        tagger, groups = self.backbone.build(setting, seed, state=state)
        tuned = groups.tuned(setting)
        cache = c.cache_features and setting.tune != "full"
        train_features = self._features(tagger, setting, lang, "train", self.train[lang]) if cache else None
        test_features = self._features(tagger, setting, lang, "test", self.test[lang]) if cache else None
        writer = (
            SummaryWriter(str(self._unit_log(setting, lang, seed))) if self.ranks.main else ScalarRecorder()
        )
        try:
            info = finetune(
                tagger,
                tuned,
                model_inputs(self.train[lang]),
                self.collator,
                epochs=c.ft_epochs_full if setting.tune == "full" and c.ft_epochs_full else c.ft_epochs,
                batch_size=c.ft_batch_size,
                lr=c.ft_lr_full if setting.tune == "full" else c.ft_lr_pe,
                seed=seed,
                features=train_features,
                writer=writer,
                desc=f"s{setting.number} {lang} seed {seed}",
                progress=self.ranks.main,
            )
            predicted = predict(
                tagger, self.test[lang], self.collator, c.eval_batch_size, features=test_features
            )
            gold = [[WIKIANN_LABELS[i] for i in tags] for tags in self.test[lang]["ner_tags"]]
            f1 = entity_f1(gold, predicted)
            writer.add_scalar("test/f1", f1, info["steps"])
        finally:
            writer.close()
        path = self.out / "runs" / f"s{setting.number}-seed{seed}" / f"predictions-{lang}.jsonl.gz"
        result = {
            "setting": setting.number,
            "name": setting.name,
            "lang": lang,
            "seed": seed,
            "f1": f1,
            "test_sentences": len(gold),
            "fraction_updated": fraction(tagger, tuned),
            "ft_steps": info["steps"],
            "ft_final_loss": info["final_loss"],
            "all_o": all(tag == "O" for sentence in predicted for tag in sentence),
            "seconds": time.perf_counter() - began,
            "predictions": path.relative_to(self.out).as_posix(),
        }
        if self.ranks.main:
            self._write_predictions(result, lang, predicted)
        return result, predicted, getattr(writer, "scalars", [])
