"""Shared fixtures: the real datasets from ../shared/data and one ci-preset backdoored run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The protocol's data folder. Tests use real data; without it they fail and say where to put it."""
    path = Path(os.environ.get("CCPURIFY_DATA", SHARED_DATA))
    if not (path / "cifar10-jpeg.zip").is_file():
        pytest.fail(f"test data not found at {path}: put the shared data folder at ../shared/data or set CCPURIFY_DATA")
    return path


@pytest.fixture(scope="session")
def cifar_test(data_dir):
    from ccpurify.data import load_dataset

    return load_dataset("cifar10", "test", data_dir)


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory, data_dir):
    """One ci-preset BadNets run on a CIFAR-10 subset, trained once per test session."""
    from ccpurify.train import preset_config, train

    out = tmp_path_factory.mktemp("runs") / "ci-badnets"
    config = preset_config("ci", "cifar10", "badnets")
    result = train(config, out, data_dir=data_dir)
    return result
