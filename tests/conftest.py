"""Shared fixtures: tiny text-conditioned backbones built once per test session."""

import pytest
from tiny_models import flux_pipeline, sd3_pipeline

from guidance.models.flux import FluxModel
from guidance.models.sd3 import SD3Model


@pytest.fixture(scope="session")
def sd3():
    return SD3Model(sd3_pipeline())


@pytest.fixture(scope="session")
def flux():
    return FluxModel(flux_pipeline(dev=True))
