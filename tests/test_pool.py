"""The local pool's fixed cost and cores (issue 20): the splits are made once per run and
shared with every worker, not decoded and normalised again for each trial."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import KERNELS

from lenetlab import engines, study
from lenetlab.data import make_splits
from lenetlab.recipes import RECIPES
from lenetlab.records import RunOptions


def _three_trials(epochs_long: int = 1) -> list:
    """One long trial and two one-epoch ones: longest first, so the long one starts first."""
    base = RECIPES["baseline"]
    return [("long", replace(base, epochs=epochs_long)), ("short-a", replace(base, epochs=1)),
            ("short-b", replace(base, epochs=1))]


@pytest.fixture
def counted_splits(monkeypatch) -> list:
    """Every Splits the study's process makes for its engine, in order."""
    made = []
    real = engines.make_splits

    def counting(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engines, "make_splits", counting)
    return made


@pytest.mark.slow
def test_the_splits_are_made_once_per_run_and_no_worker_reads_the_files(tmp_path, dataset, counted_splits):
    """Was: every worker decoded the four IDX files and normalised 70,000 images (about 1 s a
    trial). The data set's folder here does not exist: a worker reading it would fail its trial."""
    gone = replace(dataset, folder=tmp_path / "nowhere")
    options = RunOptions(threads=1, train_subset=500, kernels=KERNELS)
    plan = study.new_plan("sweep", "pool", _three_trials(), [0], options, workers=2)
    summary = study.start(tmp_path / "pool", plan, gone)
    assert [len(c["completed_seeds"]) for c in summary["configs"]] == [1, 1, 1]
    assert len(counted_splits) == 1  # for three trials on two workers
    shared = counted_splits[0]
    assert shared.train_x.is_shared() and len(shared.train_x) == 500
    # The workers only read them: they are still the splits of the data set.
    fresh = make_splits(dataset, 0, "cpu", 500)
    assert all(torch.equal(getattr(shared, name), getattr(fresh, name)) for name in vars(fresh))
