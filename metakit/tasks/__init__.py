"""Task samplers and data: sine regression, cross-lingual NER on WikiAnn."""

from metakit.tasks.sine import SineTasks, mse_loss, sine_mlp

__all__ = ["SineTasks", "mse_loss", "sine_mlp"]
