"""Fixtures: random-weight models with their HF reference (session-scoped, exports cached)."""

from __future__ import annotations

import pytest

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
