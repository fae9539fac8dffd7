"""The local pool's fixed cost and cores (issue 20): the splits are made once per run and
shared with every worker, not decoded and normalised again for each trial; the cores of the
workers that finish go to the trials still running."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import KERNELS

from lenetlab import engines, native, runner
from lenetlab.data import make_splits
from lenetlab.recipes import RECIPES
from lenetlab.records import RunOptions, Trial
from lenetlab.trials import execute_trial

LONG_EPOCHS = 10
NATIVE = KERNELS != "torch" and native.load() is not None


@pytest.fixture(autouse=True)
def one_thread_after():
    """execute_trial sets this process's torch threads: back to one for the tests after."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pool_run(tmp_path_factory, dataset):
    """Three trials on two workers, one long and two of one epoch (longest first: the long one
    starts first and is still running when the second short one ends), on a data set whose
    folder does not exist (a worker reading the IDX files would fail its trial), with every
    Splits the study's process makes counted, and two usable cores whatever this machine has."""
    made = []
    real = engines.make_splits

    def counting(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    base = RECIPES["baseline"]
    configs = [("long", replace(base, epochs=LONG_EPOCHS)), ("short-a", replace(base, epochs=1)),
               ("short-b", replace(base, epochs=1))]
    out = tmp_path_factory.mktemp("pool")
    gone = replace(dataset, folder=out / "nowhere")
    plan = runner.new_plan("sweep", "pool", configs, [0], RunOptions(threads=1, train_subset=500,
                                                                   kernels=KERNELS), workers=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engines, "make_splits", counting)
        patch.setattr(engines, "usable_cores", lambda: 2)
        summary = runner.start(out / "pool", plan, gone)
    return summary, made, runner.read_results(out / "pool", plan)


@pytest.mark.slow
def test_the_splits_are_made_once_per_run_and_no_worker_reads_the_files(pool_run, dataset):
    """Was: every worker decoded the four IDX files and normalised 70,000 images (about 1 s a trial)."""
    summary, made, _ = pool_run
    assert [len(c.completed_seeds) for c in summary.configs] == [1, 1, 1]
    assert len(made) == 1  # for three trials on two workers
    shared = made[0]
    assert shared.train_x.is_shared() and len(shared.train_x) == 500
    # The workers only read them: they are still the splits of the data set.
    fresh = make_splits(dataset, 0, "cpu", 500)
    assert all(torch.equal(getattr(shared, name), getattr(fresh, name)) for name in vars(fresh))


@pytest.mark.slow
@pytest.mark.skipif(not NATIVE, reason="only the native kernels follow the pool's share of the cores")
def test_the_cores_of_finished_workers_go_to_the_trial_still_running(pool_run):
    _, _, results = pool_run
    assert results["short-a__seed0"].epoch_threads == [1]
    assert results["short-b__seed0"].epoch_threads == [1]
    long = results["long__seed0"]
    assert long.kernels == "native" and len(long.epoch_threads) == LONG_EPOCHS
    # One thread while the short trials ran beside it, both cores once they were done.
    assert long.epoch_threads[0] == 1 and long.epoch_threads[-1] == 2
    assert long.epoch_threads == sorted(long.epoch_threads)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_only_the_native_kernels_follow_the_threads_they_are_given(dataset, kernels):
    """PyTorch's kernels give other numbers with other thread counts: a trial on them keeps its own."""
    if kernels == "native" and not NATIVE:
        pytest.skip("the native kernels are not available here")
    splits = make_splits(dataset, 0, "cpu", 128)
    trial = Trial("b", replace(RECIPES["baseline"], epochs=2), 0)
    offered = iter([2, 3])
    result, _ = execute_trial(trial, "t", splits, RunOptions(threads=1, kernels=kernels), None,
                              threads=lambda: next(offered))
    assert result.kernels == kernels
    assert result.epoch_threads == ([2, 3] if kernels == "native" else [1, 1])


def test_the_cores_are_spread_over_the_running_workers_and_a_share_never_shrinks(monkeypatch):
    import multiprocessing as mp

    monkeypatch.setattr(engines, "usable_cores", lambda: 3)
    cores = engines._Cores(mp.get_context("forkserver"), workers=3, threads=1)
    slots = [cores.take() for _ in range(3)]
    assert list(cores.shares) == [1, 1, 1]
    cores.release(slots[0])
    cores.spread(slots[1:])  # three cores over two workers: the first named gets the third
    assert list(cores.shares)[1:] == [2, 1]
    cores.spread([slots[2], slots[1]])
    assert list(cores.shares)[1:] == [2, 2]  # 2 stays 2; 1 rises to 2: never fewer than before
    # Never more cores than the machine has, never fewer than a worker was planned with.
    monkeypatch.setattr(engines, "usable_cores", lambda: 2)
    assert engines._Cores(mp.get_context("forkserver"), workers=4, threads=2).budget == 2
    assert engines._Cores(mp.get_context("forkserver"), workers=1, threads=4).budget == 4
