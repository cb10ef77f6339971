"""Fixtures shared by the test modules: tiny model configs, synthetic clips and captions
(tests/helpers.py builds them)."""

import pytest

import helpers


@pytest.fixture(scope="session")
def tiny_config():
    """`tiny_config(**overrides)` -> a config dict of the tiny models."""
    return helpers.tiny_config


@pytest.fixture(scope="session")
def tiny_video():
    """`tiny_video(batch, seed=0)` -> random clips that fit the tiny models."""
    return helpers.tiny_video


@pytest.fixture(scope="session")
def captions() -> list:
    """Four captions, one per tiny video."""
    return list(helpers.CAPTIONS)
