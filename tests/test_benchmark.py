"""The benchmark's arithmetic section: torch's FLOP count against the layer geometry."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("lenetlab_benchmark", REPO / "benchmarks/benchmark.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def multiply_adds_per_image() -> tuple[int, int]:
    """(conv1, rest) multiply-adds of one forward pass, from the layer shapes in facts.md."""
    conv1 = 6 * 28 * 28 * (1 * 5 * 5)  # padding 2 keeps 28x28
    conv2 = 16 * 10 * 10 * (6 * 5 * 5)  # valid 5x5 on 14x14
    linear = 400 * 120 + 120 * 84 + 84 * 10
    return conv1, conv2 + linear


def test_flop_count_matches_the_layer_geometry(benchmark):
    conv1, rest = multiply_adds_per_image()
    flops = benchmark.model_flops(batch=8)
    assert flops["eval_per_image"] == 2 * (conv1 + rest)
    # Backward: conv1 needs only its weight gradient (its input is the image), every
    # other layer an input gradient and a weight gradient.
    assert flops["train_per_image"] == 2 * (2 * conv1 + 3 * rest)
