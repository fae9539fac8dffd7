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


def test_arithmetic_states_what_the_target_asks_of_the_machine(benchmark):
    conventional = {"seconds": 500.0, "trial_epochs": 10}
    result = benchmark.arithmetic(conventional, {"seconds": 250.0}, test_images=10_000,
                                  peak_per_core=50.0, cores=2)
    per_epoch = result["gflop_per_trial_epoch"]
    assert 135 < per_epoch < 136  # 54,000 trained + 16,000 evaluated images
    assert result["seconds_at_peak"] == pytest.approx(10 * per_epoch / 100.0)
    assert result["target_seconds"] == pytest.approx(500.0 / benchmark.TARGET_SPEEDUP)
    assert result["target_share_of_peak"] == pytest.approx(
        result["seconds_at_peak"] / result["target_seconds"])
    assert result["lenetlab_gflops"] == pytest.approx(2 * result["conventional_gflops"])
    assert "lenetlab_gflops" not in benchmark.arithmetic(conventional, {}, 10_000, 50.0, 2)


def test_matmul_peak_is_measured_on_one_thread_and_restores_threads(benchmark):
    import torch

    before = torch.get_num_threads()
    assert benchmark.matmul_peak_gflops(size=128, seconds=0.05) > 0
    assert torch.get_num_threads() == before
