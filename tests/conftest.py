"""Tiny random-weight SDXL and SD1.x model folders, built once per test session (no downloads)."""

from __future__ import annotations

import pytest

from nitrofusion.pipeline import load_pipeline
from nitrofusion.tiny import save_tiny_model

FAMILIES = ["sdxl", "sd"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny_model(root / fam, fam, seed=0) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_dirs):
    return tiny_dirs["sdxl"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_dirs):
    return tiny_dirs["sd"]


@pytest.fixture(scope="session")
def pipelines(tiny_dirs):
    """One loaded CPU pipeline per family, shared by tests that only read from it."""
    return {fam: load_pipeline(path, device="cpu") for fam, path in tiny_dirs.items()}
