"""The priming experiment (Gheini et al.): cross-lingual WikiAnn NER, seven settings, one command."""

from metakit.extras import require

for _module in ("transformers", "datasets", "seqeval", "sklearn", "tqdm"):
    require(_module, "experiments", "metakit.experiments (metakit ner, metakit fewshot)")
