"""The native step and eval forward on several threads give the same bits as on one.

Every stage splits its outputs between the threads so that each element is computed by one
thread with the single-threaded arithmetic (native_step.c, step_job): parameters, buffers,
optimiser state and the loss totals are torch.equal for any thread count, and without batch
norm equal to those of the library before the threads existed (e056921's native_step.c, driven
through its old positional interface).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from support.legacy import BEFORE_THREADS, Legacy

from lenetlab import mixing, native
from lenetlab.augment import Augmentation, draw
from lenetlab.model import LeNet5V1

if native.load() is None:
    pytest.skip(f"the native step cannot be built here: {native.unavailable_reason()}",
                allow_module_level=True)

REPO = Path(__file__).resolve().parents[2]
THREADS = (1, 2, 3, 4)
OPTIMIZERS = {"adam": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=0.01),
              "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
              "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=1e-3)}
# (dropout, batch norm, activation, pooling, label smoothing, optimizer, batch, augmentation[,
# mixing[, given soft targets]])
CASES = {
    "baseline": (False, False, "tanh", "avg", 0.0, "adam", 64, None),
    "dropout": (True, False, "tanh", "avg", 0.0, "adam", 64, None),
    "batch_norm-sgd": (False, True, "tanh", "avg", 0.0, "sgd", 64, None),
    "all-relu-max-ls": (True, True, "relu", "max", 0.1, "adamw", 64, None),
    "relu-avg-short-batch": (False, True, "relu", "avg", 0.0, "adam", 37, None),
    "tanh-max-batch-150": (True, True, "tanh", "max", 0.0, "adam", 150, None),
    "augmented": (True, True, "relu", "max", 0.1, "adam", 77, Augmentation(2, True, 0.5)),
    "one-image": (False, True, "tanh", "avg", 0.0, "sgd", 1, None),
    # without batch norm and over several chunks: one thread runs its row-by-row schedule per chunk
    "relu-max-batch-130": (True, False, "relu", "max", 0.1, "adamw", 130, Augmentation(2, True, 0.5)),
    # partners in the other chunk, mixed while another thread packs theirs
    "mixup-batch-130": (True, True, "relu", "max", 0.1, "adamw", 130, Augmentation(2, True, 0.5),
                        mixing.Mixing(mixup=0.4)),
    "cutmix-batch-130": (False, False, "tanh", "avg", 0.0, "adam", 130, None, mixing.Mixing(cutmix=1.0)),
    # a teacher's targets, each chunk's own rows read on the thread that runs its loss
    "targets-batch-130": (True, True, "relu", "max", 0.1, "adamw", 130, Augmentation(2, True, 0.5), None,
                          True),
    "targets-mixup-batch-130": (False, True, "tanh", "avg", 0.0, "sgd", 130, None, mixing.Mixing(mixup=0.4),
                                True),
}


def _train(case, threads, lib=None, steps: int = 4):
    """The state after `steps` steps of a case on `threads` threads: model, optimiser state, totals."""
    dropout, bn, activation, pool, smoothing, optimizer, batch, aug, *extra = case
    mix, given = extra[0] if extra else None, len(extra) > 1 and extra[1]
    torch.manual_seed(0)
    model = LeNet5V1(dropout, bn, activation=activation, pool=pool).train()
    opt = OPTIMIZERS[optimizer](model.parameters())
    trainer = native.NativeTrainer(model, opt, label_smoothing=smoothing, lib=lib, threads=threads)
    g = torch.Generator().manual_seed(1)
    data_x, data_y = torch.randn(500, 1, 28, 28, generator=g), torch.randint(0, 10, (500,), generator=g)
    draws = draw(aug, 500, torch.Generator().manual_seed(7), background=-0.8) if aug else None
    mixes = mixing.draw(mix, 500, batch, seed=3) if mix else None
    for s in range(steps):
        start = 17 * s
        idx = torch.randperm(500, generator=g)[:batch]
        scale = (torch.rand(batch, 120, generator=g) >= 0.5).float() / 0.5 if dropout else None
        targets = torch.softmax(2 * torch.randn(batch, 10, generator=g), 1) if given else None
        trainer.train_step_indexed(data_x, data_y, idx, scale, draws, start, mixes, targets)
    return model.state_dict(), opt.state_dict()["state"], trainer.take_totals()


def _assert_same(got, want) -> None:
    (mg, sg, tg), (mw, sw, tw) = got, want
    assert mg.keys() == mw.keys()
    for k in mw:
        assert torch.equal(mg[k], mw[k]), k
    assert sg.keys() == sw.keys()
    for i in sw:
        for k in sw[i]:
            assert torch.equal(sg[i][k], sw[i][k]), (i, k)
    assert tg == tw


@pytest.mark.parametrize("case", list(CASES))
def test_every_thread_count_gives_the_same_bits(case):
    want = _train(CASES[case], 1)
    for threads in THREADS[1:]:
        _assert_same(_train(CASES[case], threads), want)


def test_more_threads_than_work():
    """More threads than a stage has units of work (conv1's weight gradient has 10): idle threads."""
    case = CASES["tanh-max-batch-150"]
    _assert_same(_train(case, 13, steps=2), _train(case, 1, steps=2))


@pytest.mark.parametrize(("bn", "activation", "pool"), [(False, "tanh", "avg"), (True, "relu", "max")])
def test_forward_is_the_same_on_every_thread_count(bn, activation, pool):
    torch.manual_seed(3)
    model = LeNet5V1(True, bn, activation=activation, pool=pool).eval()
    if bn:
        for m in (model.feature[1], model.feature[5]):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(4))  # 15 chunks + 40
    want = native.forward(model, x, threads=1)
    for threads in (2, 3, 4, 16, 64):  # 16 and 64: more threads than chunks
        assert torch.equal(native.forward(model, x, threads=threads), want)
    assert torch.equal(native.forward(model, x[:5], threads=4), want[:5])


@pytest.fixture(scope="module")
def before_threads():
    """e056921's native_step.c, built and driven through its old positional interface."""
    flags = native.build_flags()
    return native.load_build(flags, BEFORE_THREADS.read_text(), "native_step_e056921", legacy=Legacy)


@pytest.mark.parametrize("case", ["dropout", "baseline", "relu-max-batch-130"])
def test_the_same_bits_as_before_the_threads(before_threads, case):
    """Without batch norm, the single-threaded library's numbers, so recorded studies and resume
    still hold. (Batch norm's statistics are summed as the convolutions write their rows since,
    in another order: its training steps agree with that library's within float rounding, as
    every build's do with PyTorch's path, test_native.py.)"""
    want = _train(CASES[case], 1, lib=before_threads)
    for threads in (1, 2):
        _assert_same(_train(CASES[case], threads), want)


def test_forward_as_before_the_threads(before_threads):
    torch.manual_seed(5)
    model = LeNet5V1(True, True, activation="relu", pool="max").eval()
    x = torch.randn(300, 1, 28, 28)
    assert torch.equal(native.forward(model, x, threads=3), native.forward(model, x, lib=before_threads))


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_threads_follow_torch_unless_fixed():
    """threads=None reads torch.get_num_threads() at every step (trials set it), an int fixes
    it, and trainer.threads may change between steps; the workers live in the workspace and end
    with it. Tests run on one torch thread (conftest), so the native step does too."""
    assert torch.get_num_threads() == 1
    torch.manual_seed(0)
    model = LeNet5V1()
    trainer = native.NativeTrainer(model, torch.optim.Adam(model.parameters()))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    trainer.train_step(x, y)
    alone = _tasks()  # the process's threads with the native step on one
    try:
        torch.set_num_threads(3)
        trainer.train_step(x, y)
        assert _tasks() == alone + 2
        trainer.threads = 2
        trainer.train_step(x, y)
        assert _tasks() == alone + 1
        torch.set_num_threads(1)
        trainer.threads = None
        trainer.train_step(x, y)
        assert _tasks() == alone
        trainer.threads = 4
        trainer.train_step(x, y)
        assert _tasks() == alone + 3
    finally:
        torch.set_num_threads(1)
    del trainer  # ln_ws_free joins the workers
    assert _tasks() == alone


def test_bad_thread_counts_are_refused():
    model = LeNet5V1()
    opt = torch.optim.Adam(model.parameters())
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="threads"):
            native.NativeTrainer(model, opt, threads=bad)
        with pytest.raises(ValueError, match="threads"):
            native.forward(model, torch.zeros(2, 1, 28, 28), threads=bad)
    trainer = native.NativeTrainer(model, opt, threads=1000)  # more than native.MAX_THREADS: that many
    trainer.train_step(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))


def test_forward_from_several_python_threads_at_once():
    """forward() keeps one workspace per library; a call while another Python thread is in it
    takes a workspace of its own (ctypes releases the GIL: both run at once)."""
    import concurrent.futures

    torch.manual_seed(6)
    models = [LeNet5V1(False, bn, activation=a).eval() for bn, a in ((False, "tanh"), (True, "relu"))]
    x = torch.randn(700, 1, 28, 28)
    want = [native.forward(m, x, threads=1) for m in models]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        jobs = [pool.submit(native.forward, models[i % 2], x, threads=1 + i % 3) for i in range(12)]
        for i, job in enumerate(jobs):
            assert torch.equal(job.result(), want[i % 2])
