"""Fixtures shared by the test modules: the test vocabulary, tiny model configs and
synthetic clips (tests/helpers.py builds them)."""
import os

import pytest

import helpers


@pytest.fixture(scope="session")
def vocab() -> str:
    """Path of bert-base-uncased's vocab.txt."""
    return helpers.vocab_file()


@pytest.fixture(scope="session")
def minilm(vocab) -> str:
    """Folder of all-MiniLM-L6-v2: a real 6-layer, width-384 BERT beside the vocabulary."""
    return os.path.dirname(vocab)


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
