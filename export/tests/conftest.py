"""Fixtures: random-weight models with their HF reference (session-scoped, exports cached)."""

from __future__ import annotations

import pytest

from dnabert_helpers import DNABERT_TINY, Dnabert
from export_helpers import TINY, Model
from virnuc_export.reference import hf_model_from_source
from virnuc_export.weights import RandomWeights


@pytest.fixture(scope="session")
def t6(tmp_path_factory: pytest.TempPathFactory) -> Model:
    src = RandomWeights("esm2_t6_8M", 7)
    return Model(src, hf_model_from_source(src), tmp_path_factory.mktemp("t6"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Model:
    src = RandomWeights(TINY, 3)
    return Model(src, hf_model_from_source(src), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def dnabert(tmp_path_factory: pytest.TempPathFactory) -> Dnabert:
    """The real DNABERT-S architecture (768 wide, 12 heads, GeGLU 3072) with 2 layers."""
    return Dnabert(RandomWeights("dnabert_s", 11, layers=2), tmp_path_factory.mktemp("dnabert"))


@pytest.fixture(scope="session")
def dnabert_tiny(tmp_path_factory: pytest.TempPathFactory) -> Dnabert:
    """12 heads but narrow (hidden 192), for sequences up to 2,600 tokens."""
    return Dnabert(RandomWeights(DNABERT_TINY, 12), tmp_path_factory.mktemp("dnabert_tiny"))
