"""Every reader of outside input, fuzzed from valid files: IDX data (raw and gzip), sweep and search
specs, weights and their sidecars, images, run folders (run.json, trial results, summary.json,
metrics.csv, checkpoints) and a search's (its Optuna journal, run.json, tune.json), forged with
valid checksums. Every input gives a result or
lenetlab's typed error, within 5 s, and the process grows by less than 512 MiB in all.
`python tests/fuzz_campaign.py` runs the same targets on many more inputs."""

from __future__ import annotations

import random
import resource

import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fuzzing import MEMORY_LIMIT_MIB, all_targets

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
SEEDS = st.integers(0, 2**64 - 1)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def targets(work, small_splits, data_dir) -> dict:
    found = {target.name: target for target in all_targets(work, REPO, small_splits, data_dir)}
    # the peak before any input, with the data and the seed files loaded (fuzz_campaign.py
    # measures the same in a process of its own)
    found["baseline KiB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return found


# Inputs that once failed (the seeds that make them, from fuzz_campaign.py or Hypothesis), kept
# as examples once fixed: a spec with a list as its variant; a checkpoint whose seed is a tensor.
FOUND = {"spec": [4105], "checkpoint": [4199669895101633788]}


@pytest.mark.parametrize("name", ["idx", "spec", "weights", "image", "run.json", "trial result",
                                  "summary.json", "metrics.csv", "checkpoint", "tune spec", "search journal",
                                  "tune run.json", "tune.json"])
def test_a_reader_gives_a_result_or_its_typed_error(name, targets):
    outcomes = [targets[name].run_one(random.Random(seed)) for seed in FOUND.get(name, [])]

    @FUZZ
    @given(seed=SEEDS)
    def one(seed):
        outcomes.append(targets[name].run_one(random.Random(seed)))

    one()
    assert "refused" in outcomes, "no mutation was refused: the fuzzing reached nothing"


def test_the_fuzzing_grew_the_process_by_less_than_the_limit(targets):
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - targets["baseline KiB"]) / 1024
    assert grown_mib < MEMORY_LIMIT_MIB, f"{grown_mib:.0f} MiB"
