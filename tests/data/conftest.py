"""Shared fixtures for the data tests: the real bundled tokenizers, loaded once per session."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftkit.data import minilm_dir, smollm2_dir


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """Uncased WordPiece tokenizer of all-MiniLM-L6-v2 (gives ``token_type_ids``, pad id 0)."""
    return AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct tokenizer with its chat template (converts the GGUF on first use)."""
    return AutoTokenizer.from_pretrained(smollm2_dir())
