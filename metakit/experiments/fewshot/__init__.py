"""The few-shot experiment: Meta-Adapters and its baselines on LEOPARD, meta-trained on a GLUE-style pool.

Units are ``(setting, task, k, episode)``; :func:`~metakit.experiments.fewshot.unit.run_unit` runs one,
:class:`~metakit.experiments.fewshot.unit.FewShotResources` holds what units share, and
:data:`~metakit.experiments.fewshot.config.FEWSHOT_PRESETS` the presets (``paper``, ``cpu``,
``cpu-quick``, ``tiny``).
"""
