"""Parity of the native (C) training step and eval forward with the PyTorch path.

The reference is what training does without the native library: fast_forward in training
mode, F.cross_entropy (with the variant's label smoothing), backward, and the optimiser from
training.make_optimizer. Each test that trains compares the model's parameters and buffers and
the optimiser's state.

A Variant is the model's layers (dropout, batch norm, tanh or ReLU, average or max pooling) and
the loss's label smoothing. The one-step and forward checks run every variant on the default
build, and on the other builds the original's (tanh, average pooling, the plain loss) and ReLU
with max pooling: the others add only element-wise code, which no register blocking changes.
ReLU and max pooling are not smooth, so their long runs are checked step by step instead of
trajectory against trajectory (test_200_steps_in_lockstep says why).

Every parity check runs on each build of the C source this machine can run (the `build`
fixture): the default one, the 256-bit (-mno-avx512f, on an AVX-512 host) and 128-bit
(-mno-avx) builds, and the 512-bit register blocking at narrower widths (-DLN_WIDE_TILES), so
the blocking an AVX-512 host uses is exercised here too. The builds compile in parallel once
per module, the PyTorch references are computed once and shared by all builds, and the
sources also compile warning-free for AVX-512 (compile only: it need not run here).

One tolerance needs explaining: with batch norm, the bias of the convolution in front of it
has a gradient that is exactly zero in real arithmetic and float rounding noise (~1e-8) in
practice, in both paths, each with its own noise; Adam divides by the gradient's own scale,
so both paths move that bias by up to lr per step in unrelated directions, and the batch
mean (hence running_mean) moves with it. Batch norm cancels the bias in the output, so those
tensors are checked against Adam's bound (lr per step) and the outputs are checked instead.
The same holds for any single weight whose gradient has stayed near 0 (see _note_quiet).
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import inspect
import os
import platform
import weakref
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from lenetlab import native
from lenetlab.augment import Augmentation, draw
from lenetlab.model import LeNet5V1, fast_forward
from lenetlab.recipes import RECIPES
from lenetlab.training import make_optimizer

if native.load() is None:
    pytest.skip(f"the native step cannot be built here: {native.unavailable_reason()}",
                allow_module_level=True)


class Variant(NamedTuple):
    """What a parity test trains: the model's layers and the loss's label smoothing."""

    dropout: bool = False
    bn: bool = False
    activation: str = "tanh"
    pool: str = "avg"
    smoothing: float = 0.0

    def __str__(self) -> str:  # the test id: baseline, batch_norm, dropout+bn+relu+max+ls0.1, ...
        layers = {(True, False): "dropout", (False, True): "batch_norm", (True, True): "dropout+bn"}
        parts = [layers.get((self.dropout, self.bn), ""),
                 self.activation if self.activation != "tanh" else "",
                 self.pool if self.pool != "avg" else "",
                 f"ls{self.smoothing:g}" if self.smoothing else ""]
        return "+".join(part for part in parts if part) or "baseline"

    @property
    def original(self) -> bool:
        """tanh, average pooling and the plain loss, as the original study trained."""
        return (self.activation, self.pool, self.smoothing) == ("tanh", "avg", 0.0)


FLAGS = [Variant(False, False), Variant(True, False), Variant(False, True), Variant(True, True)]
# every activation x pooling x label smoothing over every dropout / batch-norm combination
VARIANTS = [v._replace(activation=a, pool=p, smoothing=ls)
            for a in ("tanh", "relu") for p in ("avg", "max") for ls in (0.0, 0.1) for v in FLAGS]
ALL_ON = Variant(True, True)
ALL_ON_RELU_MAX = Variant(True, True, "relu", "max", 0.1)
OPTIMIZERS = {"adam": {"lr": 1e-3, "weight_decay": 0.01}, "adamw": {"lr": 1e-3, "weight_decay": 0.01},
              "sgd": {"lr": 0.01, "weight_decay": 0.001}}
_FF_TAKES_KEEP = "keep" in inspect.signature(fast_forward).parameters
AVX512 = ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma")
WARNINGS = ("-Wall", "-Wextra", "-Werror")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


_X86 = platform.machine() in ("x86_64", "AMD64")
_CPU = _cpu_flags()
# name: (extra flags as LENETLAB_NATIVE_CFLAGS_EXTRA would give them, vector bytes, why skipped or None)
BUILDS = {
    "default": ((), None, None),
    "no-avx512": (("-mno-avx512f",), 32,
                  None if "avx512f" in _CPU else "no AVX-512: the default build is it"),
    "no-avx": (("-mno-avx",), 16, None if _X86 and "avx" in _CPU else "not an x86 CPU with AVX"),
    "wide-tiles": (("-DLN_WIDE_TILES",), None,
                   None if "avx512f" not in _CPU else "AVX-512: the default build has the wide tiles"),
    "wide-tiles-sse": (("-DLN_WIDE_TILES", "-mno-avx"), 16,
                       None if _X86 and "avx" in _CPU else "not an x86 CPU with AVX"),
}
# compile-only checks: -Wall -Wextra -Werror for this CPU, and for AVX-512 on any x86 host
CHECKS = {"warnings": (*native.BASE_FLAGS, *WARNINGS),
          "avx512-warnings": (*native.BASE_FLAGS, *AVX512, *WARNINGS)}


@pytest.fixture(scope="module")
def compiled():
    """Every build and compile check of this module, started together on a thread pool (the
    compiler runs in subprocesses) and cached by native.build: futures by name."""
    src = native.SOURCE.read_text()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {name: pool.submit(native.load_build, (*native.BASE_FLAGS, *native.extra_flags(), *extra), src)
                for name, (extra, _, skip) in BUILDS.items() if skip is None and name != "default"}
        if _X86:
            jobs.update({name: pool.submit(native.build, src, "native_check", flags)
                         for name, flags in CHECKS.items()})
        yield jobs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The torch reference on one thread: the native step is single-threaded, and torch's
    thread pool stalls badly when another process holds a core (150 ms steps seen here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(BUILDS))
def build(request, compiled):
    """The library as built by default, and the other widths and blockings where they differ
    (a test may pick the builds per case: see _on_builds)."""
    extra, vector_bytes, skip = BUILDS[request.param]
    if skip:
        pytest.skip(skip)
    lib = native.load() if request.param == "default" else compiled[request.param].result()
    if vector_bytes:
        assert lib.ln_vector_bytes() == vector_bytes
    return lib


def _on_builds(cases: list[tuple], everywhere) -> list:
    """Parameters (build, *case) for a test that names build in parametrize (indirect): every
    case on the default build, and on the other builds the cases for which everywhere(*case)
    holds."""
    return [pytest.param(name, *case, id="-".join(map(str, (name, *case))))
            for name in BUILDS for case in cases if name == "default" or everywhere(*case)]


def _fresh(variant: Variant, optimizer: str, seed: int = 0):
    """A model in training mode and its optimiser, the same for the same arguments."""
    torch.manual_seed(seed)
    recipe = dataclasses.replace(RECIPES["baseline"], use_dropout=variant.dropout,
                                 use_batch_norm=variant.bn, optimizer=optimizer, **OPTIMIZERS[optimizer])
    model = LeNet5V1(variant.dropout, variant.bn, activation=variant.activation, pool=variant.pool).train()
    return model, make_optimizer(recipe, model.parameters())


def _pair(variant: Variant, optimizer: str, seed: int = 0):
    """Two identical models with their optimisers: one for torch, one for the native step."""
    return _fresh(variant, optimizer, seed), _fresh(variant, optimizer, seed)


def _torch_step(model, optimizer, x, y, keep, seed, smoothing: float = 0.0):
    if not _FF_TAKES_KEEP and keep is not None:  # the generator form of fast_forward: replay the mask
        logits = fast_forward(model, x, torch.Generator().manual_seed(seed))
    else:
        logits = fast_forward(model, x, keep)
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    _note_quiet(optimizer)
    return loss.item() * len(y), (logits.argmax(1) == y).sum().item()


def _mask(model, batch: int, seed: int):
    if not model.use_dropout:
        return None, None
    keep = torch.rand((batch, 120), generator=torch.Generator().manual_seed(seed)) >= 0.5
    return keep, (keep / 0.5).float()


def _random_batches(n: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def _train_torch(ref, batches, smoothing: float = 0.0) -> None:
    for s, (x, y) in enumerate(batches):
        _torch_step(*ref, x, y, _mask(ref[0], len(x), s)[0], s, smoothing)


def _train_native(nat, batches, lib=None, smoothing: float = 0.0):
    trainer = native.NativeTrainer(*nat, label_smoothing=smoothing, lib=lib)
    for s, (x, y) in enumerate(batches):
        trainer.train_step(x, y, _mask(nat[0], len(x), s)[1])
    return trainer


def _train_both(ref, nat, batches, lib=None):
    _train_torch(ref, batches)
    return _train_native(nat, batches, lib)


def _lockstep(variant: Variant, optimizer: str, batches, tol_param: float, tol_state: float,
              lib=None, every: int = 1) -> list[tuple]:
    """The native path trained on batches, checked against torch's step from the same state
    (the torch model and optimiser loaded from the native ones before it) with _compare's
    tolerances at every `every`-th step and at each batch of another size than the one before
    it; per step checked, the largest diff of a parameter and of an optimiser state (the free
    tensors aside)."""
    nat, twin = _pair(variant, optimizer)
    free = _free_tensors(nat[0])
    trainer = native.NativeTrainer(*nat, label_smoothing=variant.smoothing, lib=lib)
    per_step = []
    for s, (x, y) in enumerate(batches):
        keep, scale = _mask(nat[0], len(x), s)
        if s % every and len(x) == len(batches[s - 1][0]):
            trainer.train_step(x, y, scale)
            continue
        twin[0].load_state_dict(nat[0].state_dict())
        twin[1].load_state_dict(copy.deepcopy(nat[1].state_dict()))  # its own tensors, not nat's
        _QUIET.pop(twin[1], None)  # a one-step comparison: the quiet weights of this step
        _torch_step(*twin, x, y, keep, s, variant.smoothing)
        trainer.train_step(x, y, scale)
        diffs = _compare(twin, nat, 1, tol_param, tol_state, logits=False)
        kept = [(k, d) for k, d in diffs.items() if k.split(":")[0] not in free]
        per_step.append((max(d for k, d in kept if ":" not in k), max(d for k, d in kept if ":" in k)))
    return per_step


_REFERENCES: dict = {}


def _reference(variant: Variant, optimizer: str, batches, key):
    """The PyTorch path trained on these batches from _fresh(variant, optimizer): computed once
    per key and shared by every build (do not train it further)."""
    key = (variant, optimizer, key)
    if key not in _REFERENCES:
        ref = _fresh(variant, optimizer)
        _train_torch(ref, batches, variant.smoothing)
        _REFERENCES[key] = ref
    return _REFERENCES[key]


def _free_tensors(model) -> set[str]:
    """With batch norm: the conv biases in front of it and the running means (see the docstring)."""
    if not model.use_batch_norm:
        return set()
    conv2 = 4
    return {"feature.0.bias", f"feature.{conv2}.bias", "feature.1.running_mean", "feature.5.running_mean"}


QUIET = 1e-7  # a gradient this small is within a few roundings of 0 (see _note_quiet)
_QUIET: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # torch Adam -> {param: mask}


def _note_quiet(optimizer) -> None:
    """After a torch Adam step: mark the weights whose gradient has been quiet so far (RMS
    below QUIET, from exp_avg_sq). Adam's step divides by that RMS, so such a weight moves by up
    to lr in the direction its rounding noise happens to take, differently in each path, as the
    free biases do (see the module docstring). A few weights of a run are quiet at its first
    step where weight decay all but cancels the loss's gradient; the rounding of ReLU's and max
    pooling's larger gradients moves them past tol_param."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    beta2 = optimizer.param_groups[0]["betas"][1]
    marks = _QUIET.setdefault(optimizer, {})
    for p, state in optimizer.state.items():
        quiet = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() < QUIET
        marks[p] = marks[p] | quiet if p in marks else quiet


def _compare(ref, nat, steps: int, tol_param: float, tol_state: float,
             logits: bool = True) -> dict[str, float]:
    """Max |diff| per tensor of the model and the optimiser state; asserts the tolerances."""
    (ma, oa), (mb, ob) = ref, nat
    free = _free_tensors(ma)
    adam = isinstance(oa, (torch.optim.Adam, torch.optim.AdamW))
    lr = oa.param_groups[0]["lr"]
    params = dict(ma.named_parameters())
    diffs = {}
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        diff = (sa[k].double() - sb[k].double()).abs()
        quiet = _QUIET.get(oa, {}).get(params.get(k)) if k not in free else None
        if quiet is not None and quiet.any():
            d = diff[quiet].max().item()
            assert d <= 2 * lr * steps, f"{k} (quiet weights): max |diff| {d:.3g} > {2 * lr * steps:.3g}"
            diff = diff[~quiet]
        d = diff.max().item() if diff.numel() else 0.0
        diffs[k] = d
        bound = 2 * lr * steps if k in free and adam else tol_param
        assert d <= bound, f"{k}: max |diff| {d:.3g} > {bound:.3g}"
    names = [n for n, _ in ma.named_parameters()]
    sta, stb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sta.keys() == stb.keys()
    for i in sta:
        assert sta[i].keys() == stb[i].keys()
        for k in sta[i]:
            d = (sta[i][k].double() - stb[i][k].double()).abs().max().item()
            diffs[f"{names[i]}:{k}"] = d
            noise = names[i] in free and k in ("exp_avg", "momentum_buffer")
            bound = 1e-5 if noise else tol_state  # the free biases' gradients are rounding noise
            assert d <= bound, f"{names[i]} {k}: max |diff| {d:.3g} > {bound:.3g}"
            assert sta[i][k].dtype == stb[i][k].dtype and sta[i][k].shape == stb[i][k].shape
    if logits:
        diffs["logits"] = _logit_diff(ma, mb)
        assert diffs["logits"] <= 10 * tol_param, f"logits differ by {diffs['logits']:.3g}"
    return diffs


_LOGIT_X = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(9))


def _logits(m) -> torch.Tensor:
    """Logits on fixed inputs: in eval mode, or with batch norm in training mode (batch
    statistics, which cancel the free conv biases; on a copy, so the running statistics stay as
    they are) with dropout off."""
    m = copy.deepcopy(m).train(m.use_batch_norm)
    if m.use_dropout:
        m.classifier[2].p = 0.0  # fast_forward draws no mask then
    with torch.no_grad():
        return fast_forward(m, _LOGIT_X)


def _logit_diff(ma, mb) -> float:
    """ma's logits are computed once when ma is a shared reference (they never train further)."""
    if any(ma is ref[0] for ref in _REFERENCES.values()):
        if id(ma) not in _REF_LOGITS:
            _REF_LOGITS[id(ma)] = _logits(ma)
        want = _REF_LOGITS[id(ma)]
    else:
        want = _logits(ma)
    return (want - _logits(mb)).abs().max().item()


_REF_LOGITS: dict[int, torch.Tensor] = {}


def test_tanh_is_accurate(build):
    x = torch.linspace(-12, 12, 1 << 21)
    y = torch.empty_like(x)
    build.ln_tanh(x.data_ptr(), y.data_ptr(), len(x))
    assert (y.double() - torch.tanh(x.double())).abs().max().item() < 2e-7
    assert (y.double() - torch.tanh(x).double()).abs().max().item() < 2e-7


_FORWARD_WANT: dict = {}


@pytest.mark.parametrize(("build", "variant"), _on_builds(
    [(v,) for v in VARIANTS if not v.smoothing],  # the loss plays no part
    lambda v: v.original or (v.activation, v.pool) == ("relu", "max")), indirect=["build"])
def test_forward_matches_fast_forward(build, variant):
    torch.manual_seed(3)
    model = LeNet5V1(variant.dropout, variant.bn, activation=variant.activation, pool=variant.pool).eval()
    if variant.bn:
        for bn in (model.feature[1], model.feature[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
    x = torch.randn(1000, 1, 28, 28, generator=torch.Generator().manual_seed(4))  # 15 chunks + 40
    if variant not in _FORWARD_WANT:  # the same model and images for every build
        with torch.no_grad():
            _FORWARD_WANT[variant] = fast_forward(model, x)
    want = _FORWARD_WANT[variant]
    model.train()  # forward is eval-mode whatever the module's mode
    got = native.forward(model, x, lib=build)
    assert got.shape == (1000, 10) and got.dtype == torch.float32
    assert (got - want).abs().max().item() < 1e-4
    assert torch.equal(native.forward(model, x[:37], lib=build), got[:37])  # chunking does not change a row


def _tol_state(variant: Variant) -> float:
    """One step's tolerance for the optimiser state. With batch norm, ReLU and max pooling
    make conv1's weight gradient up to 3x as large and torch's rounding of it with it: SGD's
    momentum buffer (the gradient) differs by up to 5.2e-7 over 20 random batches, torch's
    error against float64 being 2-3x the native step's."""
    return 1e-7 if (variant.activation, variant.pool) == ("tanh", "avg") else 1e-6


@pytest.mark.parametrize(("build", "variant", "optimizer"), _on_builds(
    # AdamW differs from Adam only in the update, which no variant changes
    [(v, o) for v in VARIANTS for o in OPTIMIZERS if v.original or o != "adamw"],
    lambda v, o: v.original or (v._replace(dropout=True, bn=True) == ALL_ON_RELU_MAX and o == "adam")),
    indirect=["build"])
def test_one_step_matches_torch(build, variant, optimizer):
    """Every op's forward and gradients, through one update (SGD's is the gradient times lr)."""
    batches = _random_batches(1, 64)
    ref = _reference(variant, optimizer, batches, "one step")
    nat = _fresh(variant, optimizer)
    _train_native(nat, batches, build, variant.smoothing)
    tol = 5e-5 if optimizer != "sgd" else 1e-6  # Adam's first step divides by |grad|: see _compare
    _compare(ref, nat, 1, tol_param=tol, tol_state=_tol_state(variant))


@pytest.mark.parametrize(("batch", "variant"), [(b, ALL_ON) for b in (1, 48, 128, 150)]
                         + [(b, ALL_ON_RELU_MAX) for b in (48, 150)], ids=str)
def test_other_batch_sizes_match_torch(build, batch, variant):
    """Padding lanes (1, 48), two chunks (128) and a padded second chunk (150), with batch norm
    over the whole batch and dropout (and label smoothing, whose gradient is nonzero for every
    class: padding lanes must still get none). ReLU and max pooling step by step, as in
    test_200_steps_in_lockstep: over 3 steps Adam's quiet weights (see _note_quiet) move the
    trajectories apart by more than one step's rounding."""
    batches = _random_batches(3, batch)
    if not variant.original:
        _lockstep(variant, "adam", batches, tol_param=5e-5, tol_state=_tol_state(variant), lib=build)
        return
    ref = _reference(variant, "adam", batches, f"batch {batch}")
    nat = _fresh(variant, "adam")
    _train_native(nat, batches, build, variant.smoothing)
    _compare(ref, nat, 3, tol_param=5e-5, tol_state=2e-7)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_max_pooling_ties_go_to_the_first(build, activation):
    """Every 2x2 block a tie (conv1's weights zero: each conv1 map is its bias, and then each
    conv2 map a constant): each block's gradient goes whole to its top-left pixel, the index
    torch's max_pool2d keeps. Any other pick moves conv1's weight gradient by image patches."""
    variant = Variant(activation=activation, pool="max")
    batches = _random_batches(1, 64)
    ref, nat = _pair(variant, "sgd")
    for model, _ in (ref, nat):
        with torch.no_grad():
            model.feature[0].weight.zero_()
            model.feature[0].bias.copy_(torch.linspace(0.1, 0.6, 6))
            model.feature[3].weight.abs_()  # conv2's maps positive too, where ReLU passes gradients
    _train_torch(ref, batches)
    _train_native(nat, batches, build)
    _compare(ref, nat, 1, tol_param=1e-6, tol_state=_tol_state(variant))


@pytest.fixture(scope="module")
def real_batches(small_splits):
    x, y = small_splits.train_x.cpu().contiguous(), small_splits.train_y.cpu().contiguous()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))
    batches = [(x[order[i:i + 64]], y[order[i:i + 64]]) for i in range(0, len(x), 64)]
    return (batches * 5)[:200]  # last batch of each pass: 3000 % 64 = 56


def test_200_steps_match_torch(request, build, real_batches):
    """The 200-step trajectory with everything on (dropout, batch norm, Adam), for every width;
    30 steps for the wide-tile blockings (the one-step checks above test their every op)."""
    steps = 30 if request.node.callspec.params["build"].startswith("wide") else 200
    ref = _reference(ALL_ON, "adam", real_batches[:steps], f"{steps} real")
    nat = _fresh(ALL_ON, "adam")
    _train_native(nat, real_batches[:steps], build)
    _compare(ref, nat, steps, tol_param=3e-5, tol_state=2e-6)  # measured: <= 3.2e-6 and 2.3e-7


@pytest.mark.parametrize(("variant", "optimizer"),
                         [(ALL_ON, "adamw"), (ALL_ON._replace(smoothing=0.1), "sgd")], ids=str)
def test_200_steps_other_optimizers(real_batches, variant, optimizer):
    """The other optimisers' trajectories, one of them with label smoothing."""
    ref = _reference(variant, optimizer, real_batches, "200 real")
    nat = _fresh(variant, optimizer)
    _train_native(nat, real_batches, smoothing=variant.smoothing)
    _compare(ref, nat, 200, tol_param=3e-5, tol_state=2e-6)


@pytest.mark.parametrize(("variant", "optimizer"), [
    (ALL_ON_RELU_MAX, "adamw"),  # the tuned recipe's loss and optimiser, every layer, max pooling
    (Variant(activation="relu", pool="max", smoothing=0.1), "sgd"),  # without batch norm
    (Variant(bn=True, activation="relu"), "adam"),  # ReLU with average pooling
    (Variant(dropout=True, pool="max"), "adam"),  # max pooling with tanh
], ids=str)
def test_200_steps_in_lockstep(real_batches, variant, optimizer):
    """ReLU and max pooling over 200 native steps, every fourth step checked from the state the
    run reached (Adam's moments, running statistics), and the short batch that ends each pass
    and the step after it.

    Not one trajectory against another, as above: where a ReLU input is (nearly) 0 or two pooled
    values (nearly) tie, rounding picks the side, differently in each path, and a trajectory
    amplifies every such pick. Torch against itself with its initial weights nudged by 1e-7
    (relative) ends 200 steps up to 4e-3 to 2e-2 apart (1.3e-6 with tanh and average pooling).
    Within one step a pick moves one image's share of a gradient (up to 3e-5 of a state
    measured): each step checked is held to that, and the typical one (the median) to the
    rounding level that an error made at every step would exceed (measured: <= 1.2e-7 for a
    parameter, 6.2e-7 for a state)."""
    per_step = _lockstep(variant, optimizer, real_batches, tol_param=3e-5, tol_state=1e-4, every=4)
    median_param, median_state = (sorted(d)[len(d) // 2] for d in zip(*per_step))
    assert median_param <= 1e-6 and median_state <= 4e-6, (median_param, median_state)


@pytest.mark.parametrize("variant", FLAGS[:3], ids=str)
def test_30_steps_other_layers(real_batches, variant):
    """Without dropout or batch norm: the same trajectory check, shorter (the 200-step ones
    above cover the long run)."""
    ref = _reference(variant, "adam", real_batches[:30], "30 real")
    nat = _fresh(variant, "adam")
    _train_native(nat, real_batches[:30])
    _compare(ref, nat, 30, tol_param=3e-5, tol_state=2e-6)


@pytest.mark.parametrize("check", list(CHECKS))
def test_compiles_without_warnings(compiled, check):
    """-Wall -Wextra -Werror for this CPU, and for AVX-512 (the 512-bit code path, compiled
    only: this host need not run it)."""
    if not _X86:
        pytest.skip("x86 flags")
    compiled[check].result()  # raises NativeBuildError with the compiler's messages


def test_extra_flags_reach_the_build(monkeypatch, compiled):
    """LENETLAB_NATIVE_CFLAGS_EXTRA selects the build: the wide-tile 128-bit one here."""
    extra, vector_bytes, skip = BUILDS["wide-tiles-sse"]
    if skip:
        pytest.skip(skip)
    compiled["wide-tiles-sse"].result()
    monkeypatch.setenv(native.EXTRA_FLAGS_ENV, " ".join((*native.extra_flags(), *extra)))
    assert native.load().ln_vector_bytes() == vector_bytes  # the build above, from the cache


def test_deterministic():
    runs = []
    for _ in range(2):
        nat = _fresh(ALL_ON, "adam")
        trainer = _train_native(nat, _random_batches(4, 100))
        runs.append((nat[0].state_dict(), nat[1].state_dict()["state"], trainer.take_totals()))
    (ma, sa, ta), (mb, sb, tb) = runs
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    assert ta == tb


def test_indexed_step_is_the_gathered_step():
    (ma, oa), (mb, ob) = _pair(ALL_ON, "adam")
    ta, tb = native.NativeTrainer(ma, oa), native.NativeTrainer(mb, ob)
    data_x, data_y = _random_batches(1, 500)[0]
    for s in range(3):
        perm = torch.randperm(500, generator=torch.Generator().manual_seed(s))
        idx = perm[s:s + 77]  # a slice at any offset, as training passes it
        scale = _mask(ma, 77, s)[1]
        ta.train_step(data_x[idx], data_y[idx], scale)
        tb.train_step_indexed(data_x, data_y, idx, scale)
    assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())
    assert ta.take_totals() == tb.take_totals()


@pytest.mark.parametrize("aug", [Augmentation(2, True, 0.0), Augmentation(0, False, 0.5),
                                 Augmentation(3, False, 1.0), Augmentation(27, True, 0.25)], ids=str)
def test_augmenting_in_the_step_is_augmenting_before_it(aug):
    """The step's own augmentation (while packing its input) gives the images EpochDraws.apply
    gives, bit for bit: the parameters after steps on both are identical."""
    (ma, oa), (mb, ob) = _pair(ALL_ON, "adam")
    ta, tb = native.NativeTrainer(ma, oa), native.NativeTrainer(mb, ob)
    data_x, data_y = _random_batches(1, 500)[0]
    draws = draw(aug, 500, torch.Generator().manual_seed(7), background=-0.8)
    order = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    for start in (0, 77, 450):  # batches anywhere in the epoch, the last one short (50 images)
        idx = order[start:start + 77]
        scale = _mask(ma, len(idx), start)[1]
        ta.train_step(draws.apply(data_x[idx], start), data_y[idx], scale)
        tb.train_step_indexed(data_x, data_y, idx, scale, draws, start)
    assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())
    assert ta.take_totals() == tb.take_totals()
    with pytest.raises(IndexError, match="draws"):
        tb.train_step_indexed(data_x, data_y, idx, None, draws, 480)


@pytest.mark.parametrize("variant", [Variant(bn=True), Variant(False, True, "relu", "max", 0.1)], ids=str)
def test_totals_match_torch(variant):
    """The summed loss is the loss torch's step minimises: with label smoothing, the smoothed one."""
    ref, nat = _pair(variant, "adam")
    trainer = native.NativeTrainer(*nat, label_smoothing=variant.smoothing)
    loss = correct = 0.0
    for s, (x, y) in enumerate(_random_batches(3, 90)):
        dl, dc = _torch_step(*ref, x, y, None, s, variant.smoothing)
        loss, correct = loss + dl, correct + dc
        trainer.train_step(x, y)
    got_loss, got_correct = trainer.take_totals()
    assert got_loss == pytest.approx(loss, rel=1e-5)
    assert got_correct == correct
    assert trainer.take_totals() == (0.0, 0)


def test_checkpoints_move_between_the_paths():
    batches = _random_batches(6, 64)
    ref, nat = _pair(ALL_ON, "adam")
    trainer = _train_both(ref, nat, batches[:3])  # both paths, 3 steps
    # torch -> native: a fresh model and optimiser loaded from the torch path's state dicts
    model, opt = _pair(ALL_ON, "adam")[0]
    model.load_state_dict(ref[0].state_dict())
    opt.load_state_dict(copy.deepcopy(ref[1].state_dict()))  # as torch.save/load would: not shared
    resumed = native.NativeTrainer(model, opt)
    # native -> torch: the same, from the native path's state dicts
    model2, opt2 = _pair(ALL_ON, "adam")[0]
    model2.load_state_dict(nat[0].state_dict())
    opt2.load_state_dict(copy.deepcopy(nat[1].state_dict()))
    for s, (x, y) in enumerate(batches[3:], start=3):
        keep, scale = _mask(model, len(x), s)
        _torch_step(*ref, x, y, keep, s)
        _torch_step(model2, opt2, x, y, keep, s)
        resumed.train_step(x, y, scale)
        trainer.train_step(x, y, scale)
    _compare(ref, (model, opt), 6, tol_param=5e-5, tol_state=2e-7)
    _compare(ref, (model2, opt2), 6, tol_param=5e-5, tol_state=2e-7)
    _compare(ref, nat, 6, tol_param=5e-5, tol_state=2e-7)


def test_optimizer_state_replaced_under_the_trainer():
    """optimizer.load_state_dict swaps the state tensors: the trainer must follow, not write freed memory."""
    ref, nat = _pair(Variant(), "sgd")
    trainer = native.NativeTrainer(*nat)
    (x, y), = _random_batches(1, 64)
    _torch_step(*ref, x, y, None, 0)
    trainer.train_step(x, y)
    nat[1].load_state_dict(copy.deepcopy(ref[1].state_dict()))
    nat[0].load_state_dict(ref[0].state_dict())
    _torch_step(*ref, x, y, None, 1)
    trainer.train_step(x, y)
    _compare(ref, nat, 2, tol_param=1e-6, tol_state=1e-6)


def test_bad_input_changes_nothing():
    _, (model, opt) = _pair(Variant(bn=True), "adam")
    trainer = native.NativeTrainer(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 1, 28, 28)
    with pytest.raises(ValueError, match="label"):
        trainer.train_step(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 10]))
    with pytest.raises(IndexError):
        trainer.train_step_indexed(x, torch.zeros(10, dtype=torch.long), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="contiguous"):
        trainer.train_step(x.double(), torch.zeros(10, dtype=torch.long))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_supports_says_why():
    model = LeNet5V1(True, True)
    assert native.NativeTrainer.supports(model, 64) is None
    assert native.NativeTrainer.supports(model, 1000, torch.optim.Adam(model.parameters())) is None
    assert "batch size" in native.NativeTrainer.supports(model, 0)
    assert "LeNet5V1" in native.NativeTrainer.supports(torch.nn.Linear(2, 2), 64)
    assert "RMSprop" in native.NativeTrainer.supports(model, 64, torch.optim.RMSprop(model.parameters()))
    nesterov = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    assert "nesterov" in native.NativeTrainer.supports(model, 64, nesterov)
    assert "float32" in native.NativeTrainer.supports(LeNet5V1().double(), 64)
    with pytest.raises(ValueError, match="amsgrad"):
        native.NativeTrainer(model, torch.optim.Adam(model.parameters(), amsgrad=True))


def test_every_variant_is_supported_and_checked():
    """Every activation and pooling trains natively; a name the native step does not know (set
    after construction) is refused, as is label smoothing outside F.cross_entropy's [0, 1]."""
    model = LeNet5V1(True, True, activation="relu", pool="max")
    opt = torch.optim.Adam(model.parameters())
    assert native.NativeTrainer.supports(model, 64, opt) is None
    for ls in (0.0, 0.1, 1.0):
        assert native.NativeTrainer(model, opt, label_smoothing=ls).label_smoothing == ls
    for ls in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            native.NativeTrainer(model, opt, label_smoothing=ls)
    trainer = native.NativeTrainer(model, opt)
    model.activation = "gelu"
    assert "activation 'gelu'" in native.NativeTrainer.supports(model, 64)
    with pytest.raises(ValueError, match="gelu"):
        native.forward(model, torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="gelu"):
        trainer.train_step(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long),
                           torch.ones(2, 120))


def test_unavailable_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native.load() is None
    assert "compiler" in native.unavailable_reason()
    assert native.NativeTrainer.supports(LeNet5V1(), 64) is not None


def test_build_is_cached_and_keyed(monkeypatch, tmp_path):
    monkeypatch.setenv("LENETLAB_NATIVE_CACHE", str(tmp_path))
    src = "int f(void) { return 1; }\n"
    first = native.build(src, "probe")
    assert first.parent == tmp_path and first.is_file()
    assert native.build(src, "probe") == first
    monkeypatch.setenv(native.EXTRA_FLAGS_ENV, "-O1")
    assert native.build(src, "probe") != first
    assert native.build(src.replace("1", "2"), "probe") != first
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp files left


def _misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a tensor that starts one float past a 64-byte boundary."""
    buf = torch.zeros(t.numel() + 32, dtype=t.dtype)
    start = next(i for i in range(1, 17) if (buf.data_ptr() + 4 * i) % 64 == 4)
    out = buf[start:start + t.numel()].view(t.shape)
    out.copy_(t)
    return out


def test_misaligned_tensors_are_refused_not_crashed():
    """Bound tensors must start on a vector boundary: a misaligned one is a clear error (and
    supports() says so, so the caller keeps the PyTorch path), never a crash."""
    model, opt = _fresh(ALL_ON, "adam")
    conv1 = model.feature[0]
    conv1.weight.data = _misaligned_copy(conv1.weight.data)
    assert "aligned" in native.NativeTrainer.supports(model, 64)
    with pytest.raises(ValueError, match="aligned"):
        native.NativeTrainer(model, opt)
    with pytest.raises(ValueError, match="aligned"):
        native.forward(model, torch.zeros(2, 1, 28, 28))
    # optimiser state swapped for a misaligned copy under a live trainer: refused at the next step
    model, opt = _fresh(ALL_ON, "adam")
    trainer = native.NativeTrainer(model, opt)
    (x, y), = _random_batches(1, 16)
    trainer.train_step(x, y, _mask(model, 16, 0)[1])
    state = opt.state[conv1_weight := model.feature[0].weight]
    state["exp_avg"] = _misaligned_copy(state["exp_avg"])
    before = conv1_weight.detach().clone()
    with pytest.raises(ValueError, match="aligned"):
        trainer.train_step(x, y, _mask(model, 16, 1)[1])
    assert torch.equal(conv1_weight, before)
