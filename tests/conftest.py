"""Fixtures shared by the test modules."""

import os

import pytest
import torch


@pytest.fixture
def float64():
    """Run the test with float64 as the default dtype (exactness checks), restored afterwards."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# Tests never reach the Hugging Face hub: data comes from explicit paths, $METAKIT_DATA or the
# development folder (metakit.experiments.data.locate skips the hub when this is set).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
