"""summarize and paired_difference against numbers worked out by hand."""

import math

import pytest

from lenetlab.stats import paired_difference, summarize

# Two-sided 95% Student t factors from printed tables, for 2, 4 and 1 degrees of freedom.
T_2, T_4, T_1 = 4.302653, 2.776445, 12.706205


def test_summarize_three_values():
    result = summarize([1.0, 2.0, 3.0])
    half = T_2 * 1.0 / math.sqrt(3)  # 2.484138
    assert result["n"] == 3
    assert result["mean"] == pytest.approx(2.0)
    assert result["std"] == pytest.approx(1.0)
    assert result["ci95"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-6)
    assert result["ci95"] == pytest.approx([-0.484138, 4.484138], abs=1e-6)


def test_summarize_five_accuracies():
    # deviations from 0.91: -0.01, +0.01, 0, +0.02, -0.02 -> sum of squares 0.001
    result = summarize([0.90, 0.92, 0.91, 0.93, 0.89])
    std = math.sqrt(0.001 / 4)
    half = T_4 * std / math.sqrt(5)
    assert result["mean"] == pytest.approx(0.91)
    assert result["std"] == pytest.approx(0.0158114, abs=1e-7)
    assert result["ci95"][1] - result["mean"] == pytest.approx(half, abs=1e-6)
    assert half == pytest.approx(0.019632, abs=1e-6)


def test_summarize_two_values_uses_wide_t():
    result = summarize([0.8, 0.9])
    std = math.sqrt(2 * 0.05**2)  # 0.0707107
    assert result["std"] == pytest.approx(std)
    assert result["ci95"][0] == pytest.approx(0.85 - T_1 * std / math.sqrt(2), abs=1e-6)


def test_summarize_single_value_has_no_interval():
    result = summarize([0.9])
    assert result == {"mean": 0.9, "std": 0.0, "ci95": [0.9, 0.9], "n": 1}


def test_summarize_identical_values_give_zero_width():
    result = summarize([0.5, 0.5, 0.5])
    assert result["std"] == 0.0
    assert result["ci95"] == [0.5, 0.5]


def test_summarize_refuses_empty():
    with pytest.raises(ValueError):
        summarize([])


def test_paired_difference_pairs_common_seeds_and_mixed_key_types():
    a = {0: 0.90, 1: 0.91, 2: 0.92, 5: 0.99}
    b = {"2": 0.90, "0": 0.89, "1": 0.90, "3": 0.50}
    result = paired_difference(a, b)
    # differences 0.01, 0.01, 0.02: mean 0.013333, std 0.0057735
    assert result["seeds"] == [0, 1, 2]
    assert result["n"] == 3
    assert result["mean_diff"] == pytest.approx(0.0133333, abs=1e-7)
    assert result["std"] == pytest.approx(0.0057735, abs=1e-7)
    assert result["ci95"] == pytest.approx([-0.0010088, 0.0276755], abs=1e-6)
    assert result["excludes_zero"] is False


def test_paired_difference_excludes_zero_when_consistent():
    result = paired_difference({0: 0.91, 1: 0.912, 2: 0.911}, {0: 0.90, 1: 0.90, 2: 0.90})
    # differences 0.010, 0.012, 0.011: mean 0.011, std 0.001, half 4.302653 * 0.001 / sqrt 3
    assert result["mean_diff"] == pytest.approx(0.011)
    assert result["ci95"] == pytest.approx([0.0085159, 0.0134841], abs=1e-6)
    assert result["excludes_zero"] is True


def test_paired_difference_negative_interval_excludes_zero():
    result = paired_difference({0: 0.80, 1: 0.81}, {0: 0.90, 1: 0.91})
    assert result["mean_diff"] == pytest.approx(-0.10)
    assert result["ci95"] == pytest.approx([-0.10, -0.10])
    assert result["excludes_zero"] is True


def test_paired_difference_one_common_seed_never_excludes_zero():
    result = paired_difference({"0": 0.95, "1": 0.9}, {0: 0.85})
    assert result["seeds"] == [0]
    assert result["n"] == 1
    assert result["mean_diff"] == pytest.approx(0.10)
    assert result["excludes_zero"] is False


def test_paired_difference_without_common_seeds_is_none():
    assert paired_difference({0: 0.9}, {1: 0.9}) is None
    assert paired_difference({}, {}) is None
