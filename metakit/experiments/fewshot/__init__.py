"""The few-shot experiment: Meta-Adapters and its baselines on LEOPARD, meta-trained on a GLUE-style pool,
or on your own tasks (a task file's ``pool`` and ``targets``, `read_task_config`).

A unit is ``(setting, task, k, episode)``. The parts, each a module:

- `.config`: `FewShotConfig`, `FEWSHOT_PRESETS` (``paper``, ``cpu``, ``cpu-quick``,
  ``tiny``), `load_fewshot_config` (preset → TOML/YAML file → overrides, strict keys, the shared
  `metakit.experiments.config.read_config_file`), ``fingerprint()`` over every key but the
  selection (``settings``, ``tasks``, ``shots``, ``episodes``) for exact resume.
- `.settings`: `FEWSHOT_SETTINGS`, (a) ``full``, (b) ``head``, (c) ``adapters``,
  (d) ``meta_adapters``, (e) ``priming``, (f1) ``lora``, (f2) ``meta_lora``, (g1) ``meta_tarp``,
  (g2) ``meta_tams`` (issue 15: TARP, TARP+TAMS).
- `.unit`: `run_unit` (a pure function of the config and the unit, returning a JSON-ready
  dict with predictions), `FewShotResources` (what units share: encoder, data, the frozen
  encoder's test encodings, meta-trained weights — checkpointed as ``meta-{setting}.pt`` in its
  ``checkpoint_dir``), `fewshot_units` (the units a config selects, empty upstream episodes left out).
- `.meta`: meta-training on the pool; `.tune`: fine-tuning on an episode and prediction;
  `.hparams`: fine-tuning learning rates chosen on the pool's dev sets; `.report`: per-task
  mean ± std tables and paired comparisons.

- `.task_config`: `read_task_config`, `TaskConfig`, `TaskSource` (your own tasks, from a TOML/YAML
  file); `.sources`: where a run's tasks come from (LEOPARD or the task file's, `fewshot_data`);
  `.records`: the seeded episodes of a task file's targets, recorded in ``episodes/``.
- `.runner`: `FewShotExperiment`, the output folder (``metakit fewshot run``)
  on the machinery it shares with ``metakit ner``; `.verify` (``metakit fewshot verify``);
  `.cli` (the subcommand).

Plugging into a runner: for each unit of ``fewshot_units(config, resources)`` not yet in the results,
call ``run_unit(config, *unit, resources=resources)`` and store the dict (predictions may go to their
own file); meta-training happens inside the first unit of a setting that needs it and is checkpointed,
so a resumed run reuses it. ``choose_finetune_lrs(config, resources)["lrs"]`` is a dict of config
overrides to apply once, before the first unit.

Example:
    >>> config = load_fewshot_config("tiny")  # doctest: +SKIP
    >>> resources = FewShotResources(config, checkpoint_dir="runs/tiny/checkpoints")  # doctest: +SKIP
    >>> results = [run_unit(config, *u, resources=resources) for u in fewshot_units(config, resources)]  # doctest: +SKIP
"""

from metakit.experiments.fewshot.config import FEWSHOT_PRESETS, FewShotConfig, load_fewshot_config
from metakit.experiments.fewshot.settings import FEWSHOT_SETTINGS, FewShotSetting
from metakit.experiments.fewshot.task_config import TaskConfig, TaskSource, read_task_config
from metakit.experiments.fewshot.unit import FewShotResources, fewshot_units, run_unit

__all__ = [
    "FEWSHOT_PRESETS",
    "FEWSHOT_SETTINGS",
    "FewShotConfig",
    "FewShotResources",
    "FewShotSetting",
    "TaskConfig",
    "TaskSource",
    "fewshot_units",
    "load_fewshot_config",
    "read_task_config",
    "run_unit",
]
