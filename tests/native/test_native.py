"""Parity of the native (C) training step and eval forward with the PyTorch path.

The reference is the plain PyTorch model: LeNet5V1.forward (the module's own layers, its dropout
given the step's mask) in training mode, F.cross_entropy (with the variant's label smoothing),
backward, and torch's own optimiser from make_optimizer. fast_forward, PyTorch's faster path,
is held to the same float64 steps as the native step (tests/test_model.py). Each test that
trains compares the model's parameters and buffers and the optimiser's state.

A Variant is the model's layers (dropout, batch norm, tanh or ReLU, average or max pooling) and
the loss's label smoothing. The one-step and forward checks run every variant on the default
build, and on the other builds the original's (tanh, average pooling, the plain loss) and ReLU
with max pooling: the others add only element-wise code, which no register blocking changes.

Tolerances. No bound here was measured on one machine. A forward or a single step is checked
element by element against the same step in float64, within a bound derived from float32
rounding (tests/support/rounding.py: each sum's bound is relative to its terms' magnitudes and grows
with their number, stage by stage), and torch's own float32 step is held to the same bound, so
the bound is known to admit a correct float32 implementation. Longer runs compare trajectories,
whose differences grow with every step: those are calibrated in the run itself, against how
far torch's float32 trajectory ends from its float64 one and the native one from itself started
one rounding away (_check_trajectory). ReLU and max pooling are not smooth, so their long runs
are checked step by step, each checked step within the derived bound (test_200_steps_in_lockstep).

Every parity check runs on each build of the C source this machine can run (the `build`
fixture): the default one (native.build_flags(): the probed target flag and
LENETLAB_NATIVE_CFLAGS_EXTRA), and that with
-mno-avx512f (256 bits on an AVX-512 host), -mno-avx (128 bits) and -DLN_WIDE_TILES (the 512-bit
register blocking at a narrower width, so that the blocking an AVX-512 host uses is exercised
everywhere), each where it differs from the builds before it. The builds compile in parallel
once per module, the float64 references are computed once and shared by all builds, and the
sources also compile warning-free for AVX-512 (compile only: it need not run here).
"""

from __future__ import annotations

import concurrent.futures
import copy
import os

import pytest
import torch
from support import rounding  # the float64 references and their float32 rounding bounds
from support.parity import (
    _X86,
    ALL_ON,
    ALL_ON_RELU_MAX,
    AVX512,
    BUILDS,
    FLAGS,
    WARNINGS,
    Variant,
    _check_trajectory,
    _flags,
    _fresh,
    _lockstep,
    _mask,
    _nudged,
    _pair,
    _random_batches,
    _reference,
    _skip_reason,
    _state,
    _target,
    _torch_step,
    _train_both,
    _train_native,
    _within,
    check_augmenting_in_the_step_is_augmenting_before_it,
    check_bad_input_changes_nothing,
    check_bad_mixing_changes_nothing,
    check_bad_targets_change_nothing,
    check_forward_matches_fast_forward,
    check_max_pooling_ties_go_to_the_first,
    check_mixing_in_the_step_is_mixing_before_it,
    check_one_step_matches_torch,
    check_one_step_on_given_targets_matches_torch,
    check_one_step_on_soft_targets_matches_torch,
    check_other_batch_sizes_match_torch,
    check_totals_match_torch,
)

from lenetlab import native
from lenetlab.model import LeNet5V1

if native.load() is None:
    pytest.skip(f"the native step cannot be built here: {native.unavailable_reason()}",
                allow_module_level=True)


# compile-only checks: -Wall -Wextra -Werror for the default build's flags, and for AVX-512 on any x86 host
CHECKS = {"warnings": (*native.build_flags(), *WARNINGS),
          "avx512-warnings": (*native.build_flags(), *AVX512, *WARNINGS)}


@pytest.fixture(scope="module")
def compiled():
    """Every build and compile check of this module, started together on a thread pool (the
    compiler runs in subprocesses) and cached by native.build: futures by name."""
    src = native.source_text()
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        jobs = {name: pool.submit(native.load_build, _flags(name), src)
                for name in BUILDS if name != "default" and _skip_reason(name) is None}
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
    (a test may pick the builds per case: see _on_builds). Each is the width its flags select."""
    skip = _skip_reason(request.param)
    if skip:
        pytest.skip(skip)
    lib = native.load() if request.param == "default" else compiled[request.param].result()
    assert lib.ln_vector_bytes() == _target(_flags(request.param)).vector_bytes
    return lib


def test_tanh_is_accurate(build):
    """Each path's float32 tanh (the native step's, and fast_forward's) is within
    rounding.TANH_ERR of tanh, as the bounds assume."""
    x = torch.linspace(-12, 12, 1 << 21)
    y = torch.empty_like(x)
    build.ln_tanh(x.data_ptr(), y.data_ptr(), len(x))
    exact = torch.tanh(x.double())
    assert (y.double() - exact).abs().max().item() < rounding.TANH_ERR
    with torch.no_grad():
        ours = fast_forward_tanh(x)
    assert (ours.double() - exact).abs().max().item() < rounding.TANH_ERR


def fast_forward_tanh(x: torch.Tensor) -> torch.Tensor:
    """The tanh fast_forward applies (the model's tanh variant, its first activation)."""
    from lenetlab.model import _FAST_ACTIVATIONS

    return _FAST_ACTIVATIONS["tanh"](x)




def test_batch_norm_statistics_of_maps_far_from_zero(build):
    """Maps whose mean lies far from zero beside their spread (conv biases of +-40, spread ~1):
    the step, batch norm's statistics included, still within the rounding bound. Their variance
    comes from sums of shifted values; unshifted, its float sums would cancel."""
    model, opt = _fresh(ALL_ON, "adam")
    with torch.no_grad():
        model.feature[0].bias.copy_(torch.tensor([40.0, -40.0, 25.0, -10.0, 33.0, 40.0]))
        model.feature[4].bias.copy_(torch.linspace(-40.0, 40.0, 16))
    trainer = native.NativeTrainer(model, opt, lib=build)
    for s, (x, y) in enumerate(_random_batches(2, 150)):
        scale = _mask(model, len(x), s)[1]
        want = rounding.step(model, opt, x, y, scale, 0.0)
        trainer.train_step(x, y, scale)
        _within(_state(model, opt), want, f"the native step {s}")


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
    ref, ref64 = _reference(ALL_ON, "adam", real_batches[:steps], f"{steps} real")
    nat, nudged = _fresh(ALL_ON, "adam"), _nudged(ALL_ON, "adam")
    for run in (nat, nudged):
        _train_native(run, real_batches[:steps], build)
    _check_trajectory(nat, nudged, ref, ref64, steps)


def _checked(batches):
    """The steps of a 200-step run checked one by one: every 50th, and the first pass's short
    last batch and the full one after it."""
    short = next(s for s in range(1, len(batches)) if len(batches[s][0]) != len(batches[0][0]))
    return lambda s: s % 50 == 0 or s in (short, short + 1)


@pytest.mark.parametrize(("variant", "optimizer"),
                         [(ALL_ON, "adamw"), (ALL_ON._replace(smoothing=0.1), "sgd")], ids=str)
def test_200_steps_other_optimizers(real_batches, variant, optimizer):
    """The other optimisers over 200 native steps, one of them with label smoothing, checked step
    by step from the state the run reached (their moments and momentum after many steps), each
    checked step within the rounding bound; their trajectories: test_30_steps_other_layers."""
    _lockstep(variant, optimizer, real_batches, _checked(real_batches))


@pytest.mark.parametrize(("variant", "optimizer"), [
    (ALL_ON_RELU_MAX, "adamw"),  # the tuned recipe's loss and optimiser, every layer, max pooling
    (Variant(activation="relu", pool="max", smoothing=0.1), "sgd"),  # without batch norm
    (Variant(bn=True, activation="relu"), "adam"),  # ReLU with average pooling
    (Variant(dropout=True, pool="max"), "adam"),  # max pooling with tanh
], ids=str)
def test_200_steps_in_lockstep(real_batches, variant, optimizer):
    """ReLU and max pooling over 200 native steps, checked step by step from the state the run
    reached (Adam's moments, running statistics), the short batch that ends the first pass and
    the step after it included.

    Not one trajectory against another, as above: where a ReLU input is (nearly) 0 or two pooled
    values (nearly) tie, rounding picks the side, differently in each path, and a trajectory
    amplifies every such pick: torch against itself with its initial weights nudged by 1e-7
    (relative) ends 200 steps up to 4e-3 to 2e-2 apart (1.3e-6 with tanh and average pooling).
    Within one step, the bound gives each such pick the whole gradient it may move."""
    _lockstep(variant, optimizer, real_batches, _checked(real_batches))


@pytest.mark.parametrize(("variant", "optimizer"), [(v, "adam") for v in FLAGS[:3]]
                         + [(ALL_ON, "adamw"), (ALL_ON._replace(smoothing=0.1), "sgd")], ids=str)
def test_30_steps_other_layers(real_batches, variant, optimizer):
    """Without dropout or batch norm, and the other optimisers: the same trajectory check,
    shorter (the 200-step one above covers the long run)."""
    ref, ref64 = _reference(variant, optimizer, real_batches[:30], "30 real")
    nat, nudged = _fresh(variant, optimizer), _nudged(variant, optimizer)
    for run in (nat, nudged):
        _train_native(run, real_batches[:30], smoothing=variant.smoothing)
    _check_trajectory(nat, nudged, ref, ref64, 30)


@pytest.mark.parametrize("check", list(CHECKS))
def test_compiles_without_warnings(compiled, check):
    """-Wall -Wextra -Werror for this CPU, and for AVX-512 (the 512-bit code path, compiled
    only: this host need not run it)."""
    if not _X86:
        pytest.skip("x86 flags")
    compiled[check].result()  # raises NativeBuildError with the compiler's messages


def test_extra_flags_reach_the_build(monkeypatch, compiled):
    """LENETLAB_NATIVE_CFLAGS_EXTRA selects the build: each other build's library, from the cache."""
    others = [name for name in BUILDS if name != "default" and _skip_reason(name) is None]
    if not others:
        pytest.skip("no build differs from the default one here")
    extra = native.extra_flags()
    for name in others:
        monkeypatch.setenv(native.EXTRA_FLAGS_ENV, " ".join((*extra, *BUILDS[name])))
        assert native.load()._name == compiled[name].result()._name


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


def test_checkpoints_move_between_the_paths():
    """Six steps with the state moved torch -> native and native -> torch after three: each run
    ends as near the float64 one as an unbroken run may (_check_trajectory)."""
    batches = _random_batches(6, 64)
    ref, nat = _pair(ALL_ON, "adam")
    ref64 = rounding.train64(*_fresh(ALL_ON, "adam"), batches, [_mask(ref[0], 64, s)[1] for s in range(6)])
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
    nudged = _nudged(ALL_ON, "adam")
    _train_native(nudged, batches)
    for got in ((model, opt), (model2, opt2), nat):
        _check_trajectory(got, nudged, ref, ref64, 6)


def test_optimizer_state_replaced_under_the_trainer():
    """optimizer.load_state_dict swaps the state tensors: the trainer must follow, not write freed memory."""
    ref, nat = _pair(Variant(), "sgd")
    trainer = native.NativeTrainer(*nat)
    (x, y), = _random_batches(1, 64)
    _torch_step(*ref, x, y, None, 0)
    trainer.train_step(x, y)
    nat[1].load_state_dict(copy.deepcopy(ref[1].state_dict()))
    nat[0].load_state_dict(ref[0].state_dict())
    want = rounding.step(*ref, x, y)  # the second step, from the state both now hold
    _torch_step(*ref, x, y, None, 1)
    trainer.train_step(x, y)
    _within(_state(*nat), want, "the native step on the replaced state")


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


# The parity checks test_native_harness.py replays on the C harness too live in tests/support/parity.py,
# with their cases; here they run on each build of the library.
test_forward_matches_fast_forward = check_forward_matches_fast_forward
test_one_step_matches_torch = check_one_step_matches_torch
test_other_batch_sizes_match_torch = check_other_batch_sizes_match_torch
test_max_pooling_ties_go_to_the_first = check_max_pooling_ties_go_to_the_first
test_augmenting_in_the_step_is_augmenting_before_it = check_augmenting_in_the_step_is_augmenting_before_it
test_totals_match_torch = check_totals_match_torch
test_bad_input_changes_nothing = check_bad_input_changes_nothing
test_mixing_in_the_step_is_mixing_before_it = check_mixing_in_the_step_is_mixing_before_it
test_one_step_on_soft_targets_matches_torch = check_one_step_on_soft_targets_matches_torch
test_bad_mixing_changes_nothing = check_bad_mixing_changes_nothing
test_one_step_on_given_targets_matches_torch = check_one_step_on_given_targets_matches_torch
test_bad_targets_change_nothing = check_bad_targets_change_nothing
