"""Fixtures shared by the tests. Builders, strategies and run helpers are in tests/helpers/ (`from helpers.builders
import build_cnn`): pyproject's pytest `pythonpath` puts tests/ on sys.path."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest

from helpers.builders import build_cnn, build_relu_only
from helpers.files import save


@pytest.fixture(autouse=True, scope="session")
def _isolated_latency_cache(tmp_path_factory):
    """Measured latencies go to a cache under the session's tmp directory, never the user's real cache."""
    previous = os.environ.get("ONNX_LOWRANK_CACHE")
    os.environ["ONNX_LOWRANK_CACHE"] = str(tmp_path_factory.mktemp("latency-cache"))
    yield
    if previous is None:
        os.environ.pop("ONNX_LOWRANK_CACHE", None)
    else:
        os.environ["ONNX_LOWRANK_CACHE"] = previous


@pytest.fixture
def cnn() -> onnx.ModelProto:
    return build_cnn()


@pytest.fixture
def cnn_path(tmp_path) -> Path:
    return save(build_cnn(), tmp_path / "cnn.onnx")


@pytest.fixture
def relu_path(tmp_path) -> Path:
    return save(build_relu_only(), tmp_path / "relu.onnx")
