"""The native parity tests' shared parts: variants, builds, reference steps, the element-by-element check.

tests/native/test_native.py runs the parity checks below on each build of the library;
test_native_harness.py replays them on the C harness, and test_native_flags.py uses the same
models, batches and element-by-element check (no test module imports another).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import platform
import subprocess
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from lenetlab import mixing, native
from lenetlab.augment import Augmentation, draw
from lenetlab.model import LeNet5V1, fast_forward
from lenetlab.recipes import RECIPES
from lenetlab.training import make_optimizer
from support import rounding  # the float64 references and their float32 rounding bounds


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
AVX512 = ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma")
WARNINGS = ("-Wall", "-Wextra", "-Werror")
_X86 = platform.machine() in ("x86_64", "AMD64")

# name: the flags each build adds to the default one's (native.build_flags())
BUILDS = {"default": (), "no-avx512": ("-mno-avx512f",), "no-avx": ("-mno-avx",),
          "wide-tiles": ("-DLN_WIDE_TILES",), "wide-tiles-sse": ("-DLN_WIDE_TILES", "-mno-avx")}


def _flags(name: str) -> tuple[str, ...]:
    return (*native.build_flags(), *BUILDS[name])


class Target(NamedTuple):
    vector_bytes: int  # what ln_vector_bytes() must say
    wide_tiles: bool  # the 512-bit register blocking


@functools.cache
def _target(flags: tuple[str, ...]) -> Target | None:
    """What the native source compiles to under these flags, read from the compiler's predefined
    macros as the source's #if reads them; None where the compiler refuses the flags."""
    done = subprocess.run([native.compiler(), *flags, "-dM", "-E", "-x", "c", os.devnull],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        return None
    macros = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("#define ")}
    vector_bytes = 64 if "__AVX512F__" in macros else 32 if "__AVX__" in macros else 16
    return Target(vector_bytes, vector_bytes == 64 or "LN_WIDE_TILES" in macros)


def _skip_reason(name: str) -> str | None:
    """Why the build is not run here: the compiler refuses its flags, or an earlier build
    compiles the same width and blocking."""
    target = _target(_flags(name))
    if target is None:
        return f"{native.compiler()} does not take {' '.join(BUILDS[name])} here"
    for other in BUILDS:
        if other == name:
            return None
        if _target(_flags(other)) == target:
            return f"the same width and blocking as the {other} build ({target})"
    return None


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


def plain_forward(model, x, keep=None):
    """LeNet5V1.forward, the module's own layers, its dropout replaying keep (the mask the native
    step is given): the PyTorch reference that every fast path is held to."""
    if keep is None or not model.use_dropout or not model.training:
        return model(x)
    hook = model.classifier[2].register_forward_hook(
        lambda dropout, inputs, _: inputs[0] * keep / (1.0 - dropout.p))
    try:
        return model(x)
    finally:
        hook.remove()


def _torch_step(model, optimizer, x, y, keep, seed, smoothing: float = 0.0, forward=plain_forward):
    """One step of torch's own optimiser on forward's logits (seed: the batch's, unused by the
    forwards that are given the mask)."""
    logits = forward(model, x, keep)
    loss = F.cross_entropy(logits, y, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
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


def _state(model, optimizer) -> dict[str, torch.Tensor]:
    """model.state_dict() and the optimiser's state as "parameter name:key" (rounding.step's keys)."""
    out = dict(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    for i, state in optimizer.state_dict()["state"].items():
        out.update({f"{names[i]}:{k}": v for k, v in state.items()})
    return out


def _within(got: dict, want: dict, who: str) -> float:
    """Asserts every element of got within its bound of the float64 value (want: rounding.step's
    {key: (value, bound)}); returns the largest |diff| / bound."""
    assert got.keys() == want.keys(), f"{who}: keys {sorted(got.keys() ^ want.keys())}"
    worst = 0.0
    for k, (value, bound) in want.items():
        assert got[k].shape == value.shape, f"{who}: {k} has shape {tuple(got[k].shape)}"
        diff = (got[k].double() - value).abs()
        outside = ~(diff <= bound)  # NaN too
        if outside.any():
            i = torch.where(outside, (diff - bound).nan_to_num(torch.inf), -torch.inf).flatten().argmax()
            raise AssertionError(
                f"{who}: {k}: {int(outside.sum())} of {diff.numel()} elements outside their "
                f"rounding bound, the worst |diff| {diff.flatten()[i]:.3g} > {bound.flatten()[i]:.3g} "
                f"(the float64 value {value.flatten()[i]:.3g})")
        if (bound > 0).any():
            worst = max(worst, (diff[bound > 0] / bound[bound > 0]).max().item())
    return worst


TORCH_OUTSIDE = "torch's own float32 step {} (a bound in support/rounding.py is wrong, not the native step)"
_STEPS: dict = {}
_GRADIENTS: dict = {}  # the first step's float64 gradients: the same for every optimiser


def _step_reference(variant: Variant, optimizer: str, batches, key) -> list:
    """For each batch, the PyTorch path's state before it (trained on the batches before, from
    _fresh(variant, optimizer)) and rounding.step's float64 step from there, torch's own float32
    step checked against it: computed once per key and shared by every build."""
    key = (variant, optimizer, key)
    if key not in _STEPS:
        model, opt = _fresh(variant, optimizer)
        steps = []
        for s, (x, y) in enumerate(batches):
            keep, scale = _mask(model, len(x), s)
            before = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
            grads = None
            if s == 0:
                first = (variant, key[2])
                if first not in _GRADIENTS:
                    _GRADIENTS[first] = rounding.gradients(model, x, y, scale, variant.smoothing)
                grads = _GRADIENTS[first]
            want = rounding.step(model, opt, x, y, scale, variant.smoothing, grads)
            _torch_step(model, opt, x, y, keep, s, variant.smoothing)
            _within(_state(model, opt), want, TORCH_OUTSIDE.format(s))
            steps.append((before, want))
        _STEPS[key] = steps
    return _STEPS[key]


def _native_steps(variant: Variant, optimizer: str, batches, key, lib=None) -> float:
    """Each batch's native step, from the state the PyTorch path had before it, within the
    rounding bound of the float64 step from there (_step_reference); one trainer throughout,
    the state loaded into its model and optimiser before each step. The largest |diff| / bound."""
    model, opt = _fresh(variant, optimizer)
    trainer = native.NativeTrainer(model, opt, label_smoothing=variant.smoothing, lib=lib)
    worst = 0.0
    steps = _step_reference(variant, optimizer, batches, key)
    for s, ((x, y), (before, want)) in enumerate(zip(batches, steps)):
        model.load_state_dict(before[0])
        opt.load_state_dict(copy.deepcopy(before[1]))
        trainer.train_step(x, y, _mask(model, len(x), s)[1])
        worst = max(worst, _within(_state(model, opt), want, f"the native step {s}"))
    return worst


def _lockstep(variant: Variant, optimizer: str, batches, checked, lib=None) -> float:
    """The native path trained on batches; at each step s where checked(s), its step and
    torch's, both from the state the native run reached (torch's model and optimiser loaded from
    it), within the rounding bound of the float64 step from there. The largest |diff| / bound."""
    nat, twin = _pair(variant, optimizer)
    trainer = native.NativeTrainer(*nat, label_smoothing=variant.smoothing, lib=lib)
    worst = 0.0
    for s, (x, y) in enumerate(batches):
        keep, scale = _mask(nat[0], len(x), s)
        if not checked(s):
            trainer.train_step(x, y, scale)
            continue
        want = rounding.step(*nat, x, y, scale, variant.smoothing)
        twin[0].load_state_dict(nat[0].state_dict())
        twin[1].load_state_dict(copy.deepcopy(nat[1].state_dict()))  # its own tensors, not nat's
        _torch_step(*twin, x, y, keep, s, variant.smoothing)
        _within(_state(*twin), want, TORCH_OUTSIDE.format(s))
        trainer.train_step(x, y, scale)
        worst = max(worst, _within(_state(*nat), want, f"the native step {s}"))
    return worst


_REFERENCES: dict = {}


def _reference(variant: Variant, optimizer: str, batches, key):
    """The PyTorch path trained on these batches from _fresh(variant, optimizer), in float32 and
    in float64 (rounding.train64): computed once per key and shared by every build (do not train
    them further)."""
    key = (variant, optimizer, key)
    if key not in _REFERENCES:
        ref = _fresh(variant, optimizer)
        scales = [_mask(ref[0], len(x), s)[1] for s, (x, _) in enumerate(batches)]
        ref64 = rounding.train64(*ref, batches, scales, variant.smoothing)
        _train_torch(ref, batches, variant.smoothing)
        _REFERENCES[key] = ref, ref64
    return _REFERENCES[key]


def _free_tensors(model) -> set[str]:
    """With batch norm: the conv biases in front of it and the running means they move.

    Their gradient is exactly zero in real arithmetic and rounding noise in each path (its own:
    rounding.py bounds it at each step); Adam divides by the gradient's own scale, so it moves
    each such bias by about lr per step in the direction its noise takes, differently in each
    path and in float64 (batch norm cancels the bias in the output)."""
    if not model.use_batch_norm:
        return set()
    return {"feature.0.bias", "feature.4.bias", "feature.1.running_mean", "feature.5.running_mean"}


SPREAD_FACTOR = 8


def _nudged(variant: Variant, optimizer: str):
    """_fresh(variant, optimizer) with every initial weight one float32 step away (rounding.nudge)."""
    model, opt = _fresh(variant, optimizer)
    rounding.nudge(model)
    return model, opt


def _check_trajectory(got, nudged, ref, ref64, steps: int) -> dict[str, float]:
    """got's state after `steps` steps against the float64 run's (ref64), tensor by tensor,
    within SPREAD_FACTOR times this run's own rounding spread, plus one rounding of the tensor's
    size per step. The spread is the larger of how far torch's float32 run (ref) ended from
    float64 and how far got's path ended from itself started one rounding away (nudged: the same
    path trained from _nudged's weights).

    A trajectory has no derived bound: every step's rounding differences move the next step's
    inputs, and steps amplify them (ReLU and max pooling most; see test_200_steps_in_lockstep).
    Either path's spread alone can be small where the other's is not: Adam divides each weight's
    step by its gradient's size, so a weight whose gradient is near its rounding noise moves with
    its path's own noise (measured native / torch spreads up to 20 for such weights; against the
    larger spread, 2.1). Adam's free tensors (_free_tensors) are held to how far Adam can move a
    weight in `steps` steps (rounding.adam_reach); their moments, the noise of an exact zero, are
    checked step by step only (rounding.step). Returns |diff| / bound per key, and "logits"."""
    mine, twin, torch32, exact = _state(*got), _state(*nudged), _state(*ref), _state(*ref64)
    assert mine.keys() == exact.keys()
    group = ref[1].param_groups[0]
    free = _free_tensors(ref[0]) if isinstance(ref[1], torch.optim.Adam) else set()
    ratios = {}

    def check(key, value, a, b, c):
        """value: float64; a, b, c: this path's, its nudged run's and torch's float32 ones."""
        diff = (a - value).abs().max().item()
        spread = max((c - value).abs().max().item(), (a - b).abs().max().item())
        bound = SPREAD_FACTOR * spread + steps * rounding.U * value.abs().max().item()
        if key.partition(":")[0] in free:
            bound = max(bound, rounding.adam_reach(group["lr"], group["betas"], steps))
        assert diff <= bound, (f"{key}: max |diff| from float64 {diff:.3g} > {bound:.3g} (rounding "
                               f"spreads: torch's {(c - value).abs().max().item():.3g}, its own "
                               f"{(a - b).abs().max().item():.3g})")
        ratios[key] = diff / bound if bound else 0.0

    for k, value in exact.items():
        if not value.is_floating_point() or k.endswith(":step"):  # counters: exact
            assert torch.equal(mine[k].double(), value.double()), k
        elif not (k.partition(":")[0] in free and ":" in k):
            check(k, value.double(), mine[k].double(), twin[k].double(), torch32[k].double())
    # the outputs, in which batch norm cancels the free biases
    check("logits", _logits(ref64[0]), _logits(got[0]), _logits(nudged[0]), _logits(ref[0]))
    return ratios


_LOGIT_X = torch.randn(256, 1, 28, 28, generator=torch.Generator().manual_seed(9))


def _logits(m) -> torch.Tensor:
    """Logits on fixed inputs: in eval mode, or with batch norm in training mode (batch
    statistics, which cancel the free conv biases; on a copy, so the running statistics stay as
    they are) with dropout off. A float64 model's through rounding.forward64; computed once per model."""
    key = id(m)
    if key not in _LOGITS or _LOGITS[key][0] is not m:
        copied = copy.deepcopy(m).train(m.use_batch_norm)
        with torch.no_grad():
            if next(m.parameters()).dtype == torch.float64:
                out = rounding.forward64(copied, _LOGIT_X).double()
            else:
                if m.use_dropout:
                    copied.classifier[2].p = 0.0  # fast_forward draws no mask then
                out = fast_forward(copied, _LOGIT_X).double()
        if not any(m is r[0] or m is r64[0] for r, r64 in _REFERENCES.values()):
            return out
        _LOGITS[key] = (m, out)
    return _LOGITS[key][1]


_LOGITS: dict[int, tuple] = {}


_FORWARD: dict = {}  # check_forward_matches_fast_forward's references, per variant


# ---- the parity checks, with their cases: test_native.py runs them on each build, test_native_harness.py
# ---- replays them on the C harness (natively and under qemu for aarch64)


@pytest.mark.parametrize(("build", "variant"), _on_builds(
    [(v,) for v in VARIANTS if not v.smoothing],  # the loss plays no part
    lambda v: v.original or (v.activation, v.pool) == ("relu", "max")), indirect=["build"])
def check_forward_matches_fast_forward(build, variant):
    """Eval-mode logits, element by element within the rounding bound of the float64 forward,
    as fast_forward's are; 360 images (5 chunks + 40)."""
    torch.manual_seed(3)
    model = LeNet5V1(variant.dropout, variant.bn, activation=variant.activation, pool=variant.pool).eval()
    if variant.bn:
        for bn in (model.feature[1], model.feature[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)
    x = torch.randn(360, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    if variant not in _FORWARD:  # the same model and images for every build
        want = {"logits": rounding.forward(model, x)}
        with torch.no_grad():
            ours = fast_forward(model, x)
        _within({"logits": ours}, want, "fast_forward (a bound in tests/support/rounding.py is wrong)")
        _FORWARD[variant] = want
    model.train()  # forward is eval-mode whatever the module's mode
    got = native.forward(model, x, lib=build)
    assert got.shape == (360, 10) and got.dtype == torch.float32
    _within({"logits": got}, _FORWARD[variant], "the native forward")
    assert torch.equal(native.forward(model, x[:37], lib=build), got[:37])  # chunking does not change a row


@pytest.mark.parametrize(("build", "variant", "optimizer"), _on_builds(
    # AdamW differs from Adam only in the update, which no variant changes
    [(v, o) for v in VARIANTS for o in OPTIMIZERS if v.original or o != "adamw"],
    lambda v, o: v.original or (v._replace(dropout=True, bn=True) == ALL_ON_RELU_MAX and o == "adam")),
    indirect=["build"])
def check_one_step_matches_torch(build, variant, optimizer):
    """Every op's forward and gradients, through one update (SGD's is the gradient times lr):
    every parameter, buffer and optimiser state element within its rounding bound."""
    _native_steps(variant, optimizer, _random_batches(1, 64), "one step", build)


@pytest.mark.parametrize(("variant", "optimizer"),
                         [(v, o) for v in VARIANTS for o in OPTIMIZERS if v.original or o != "adamw"],
                         ids=str)
def check_fast_forward_step_matches_torch(variant, optimizer):
    """fast_forward, PyTorch's faster path (its own tanh, pooling and convolution kernels), held to
    the plain module as the native step is: one step from the same state, every parameter,
    buffer and optimiser state element within the rounding bound of the float64 step."""
    batches = _random_batches(1, 64)
    model, opt = _fresh(variant, optimizer)
    for s, ((x, y), (before, want)) in enumerate(zip(batches, _step_reference(variant, optimizer, batches,
                                                                              "one step"))):
        model.load_state_dict(before[0])
        opt.load_state_dict(copy.deepcopy(before[1]))
        _torch_step(model, opt, x, y, _mask(model, len(x), s)[0], s, variant.smoothing, forward=fast_forward)
        _within(_state(model, opt), want, f"fast_forward's step {s}")


@pytest.mark.parametrize(("batch", "variant"), [(b, ALL_ON) for b in (1, 48, 128, 150)]
                         + [(b, ALL_ON_RELU_MAX) for b in (48, 150)], ids=str)
def check_other_batch_sizes_match_torch(build, batch, variant):
    """Padding lanes (1, 48), two chunks (128) and a padded second chunk (150), with batch norm
    over the whole batch and dropout (and label smoothing, whose gradient is nonzero for every
    class: padding lanes must still get none): three steps, each from the PyTorch path's state,
    within the rounding bound."""
    _native_steps(variant, "adam", _random_batches(3, batch), f"batch {batch}", build)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def check_max_pooling_ties_go_to_the_first(build, activation):
    """Every 2x2 block a tie (conv1's weights zero: each conv1 map is its bias, and then each
    conv2 map a constant): each block's gradient goes whole to its top-left pixel, the index
    torch's max_pool2d keeps. Any other pick moves conv1's weight gradient by image patches
    (the bound counts exact ties as no choice at all: rounding.py)."""
    variant = Variant(activation=activation, pool="max")
    batches = _random_batches(1, 64)
    ref, nat = _pair(variant, "sgd")
    for model, _ in (ref, nat):
        with torch.no_grad():
            model.feature[0].weight.zero_()
            model.feature[0].bias.copy_(torch.linspace(0.1, 0.6, 6))
            model.feature[3].weight.abs_()  # conv2's maps positive too, where ReLU passes gradients
    want = rounding.step(*ref, *batches[0])
    _train_torch(ref, batches)
    _within(_state(*ref), want, TORCH_OUTSIDE.format(0))
    _train_native(nat, batches, build)
    _within(_state(*nat), want, "the native step")


@pytest.mark.parametrize("aug", [Augmentation(2, True, 0.0), Augmentation(0, False, 0.5),
                                 Augmentation(3, False, 1.0), Augmentation(27, True, 0.25)], ids=str)
def check_augmenting_in_the_step_is_augmenting_before_it(aug):
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
def check_totals_match_torch(variant):
    """The summed loss is the loss torch's step minimises (with label smoothing, the smoothed
    one), within the rounding bound of the float64 loss (rounding.loss), at each of three steps
    from the PyTorch path's state; the correct predictions are the float64 ones', but for those
    rounding may change."""
    ref, nat = _pair(variant, "adam")
    trainer = native.NativeTrainer(*nat, label_smoothing=variant.smoothing)
    for s, (x, y) in enumerate(_random_batches(3, 90)):
        nat[0].load_state_dict(ref[0].state_dict())
        nat[1].load_state_dict(copy.deepcopy(ref[1].state_dict()))
        want, bound, correct, uncertain = rounding.loss(ref[0], x, y, None, variant.smoothing)
        torch_loss, torch_correct = _torch_step(*ref, x, y, None, s, variant.smoothing)
        trainer.train_step(x, y)
        got_loss, got_correct = trainer.take_totals()
        for who, value, count in (("torch", torch_loss, torch_correct), ("native", got_loss, got_correct)):
            assert abs(value - want) <= bound, (who, s, value, want, bound)
            assert abs(count - correct) <= uncertain, (who, s, count, correct, uncertain)
    assert trainer.take_totals() == (0.0, 0)


def check_bad_input_changes_nothing():
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


# ---- mixup and CutMix: the step's own mixing, and the loss on soft targets

MIXES = [mixing.Mixing(0.4, 0.0), mixing.Mixing(0.0, 1.0), mixing.Mixing(0.4, 1.0, 0.5)]


def _mix_slice(mixes: mixing.MixDraws, start: int, batch: int) -> mixing.MixDraws:
    """The draws of the batch of images start .. start + batch - 1, as a batch's own."""
    return mixing.MixDraws(*(t[start:start + batch].contiguous()
                             for t in (mixes.partner, mixes.lam, mixes.box)))


@pytest.mark.parametrize("mix", MIXES, ids=str)
def check_mixing_in_the_step_is_mixing_before_it(mix):
    """The step's own mixing (while packing, after augmenting) gives the images MixDraws.images
    gives, bit for bit, and the same soft targets: the parameters and totals after steps on
    both are identical. The batches: anywhere in the epoch, the last one short (38 images)."""
    (ma, oa), (mb, ob) = _pair(ALL_ON, "adam")
    ta, tb = (native.NativeTrainer(m, o, label_smoothing=0.1) for m, o in ((ma, oa), (mb, ob)))
    data_x, data_y = _random_batches(1, 500)[0]
    draws = draw(Augmentation(2, True, 0.25), 500, torch.Generator().manual_seed(7), background=-0.8)
    mixes = mixing.draw(mix, 500, 77, seed=3)
    assert (mixes.lam < 1).any() and ((mixes.box[:, 1] > mixes.box[:, 0]).any() == (mix.cutmix > 0))
    order = torch.randperm(500, generator=torch.Generator().manual_seed(1))
    for start in (0, 77, 462):
        idx = order[start:start + 77]
        scale = _mask(ma, len(idx), start)[1]
        x = mixes.images(draws.apply(data_x[idx], start), start)
        ta.train_step(x, data_y[idx], scale, _mix_slice(mixes, start, len(idx)), premixed=True)
        tb.train_step_indexed(data_x, data_y, idx, scale, draws, start, mixes)
    assert all(torch.equal(v, mb.state_dict()[k]) for k, v in ma.state_dict().items())
    assert ta.take_totals() == tb.take_totals()
    with pytest.raises(IndexError, match="mixing"):
        tb.train_step_indexed(data_x, data_y, idx, None, None, 480, mixes)


SOFT_CASES = [(Variant(), "adam"), (ALL_ON_RELU_MAX, "adamw"), (Variant(bn=True, smoothing=0.1), "sgd"),
              (Variant(dropout=True, pool="max"), "adam")]


def _soft_batch(cut: bool):
    """A batch of 100 (two chunks, partners in either), mixed by mixup or by CutMix: (images,
    labels, its draws, soft targets)."""
    (x, y), = _random_batches(1, 100, seed=4)
    mixes = mixing.draw(mixing.Mixing(0.0 if cut else 0.4, 1.0 if cut else 0.0), 100, 100, seed=5)
    return mixes.images(x, 0), y, mixes, mixes.targets(y, 0)


def _soft_torch_step(model, optimizer, x, target, keep, smoothing: float):
    """torch's own step on soft targets (as _TorchSteps takes them)."""
    loss = F.cross_entropy(plain_forward(model, x, keep), target, label_smoothing=smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _soft_reference(variant: Variant, optimizer: str, x, y, target):
    """A fresh model and optimiser for a step on soft targets, with the float64 step's state
    and loss that the native step must match (torch's own float32 step checked against them)."""
    model, opt = _fresh(variant, optimizer)
    keep, scale = _mask(model, len(x), 0)
    want = rounding.step(model, opt, x, target, scale, variant.smoothing)
    totals = rounding.loss(model, x, target, scale, variant.smoothing, labels=y)
    twin = _fresh(variant, optimizer)
    _soft_torch_step(*twin, x, target, keep, variant.smoothing)
    _within(_state(*twin), want, TORCH_OUTSIDE.format(0))
    return model, opt, scale, want, totals


@pytest.mark.parametrize(("build", "variant", "optimizer"), _on_builds(
    SOFT_CASES, lambda v, o: v.original or v == ALL_ON_RELU_MAX), indirect=["build"])
def check_one_step_on_soft_targets_matches_torch(build, variant, optimizer):
    """The loss on soft targets (mixup's, then CutMix's batch), with label smoothing on top
    where the variant has it: every parameter, buffer and optimiser state element within its
    rounding bound of the float64 step, as torch's own float32 step is; the summed loss within
    the bound of the float64 loss, the correct predictions (of each image's own label) the
    float64 ones' but for those rounding may change."""
    for cut in (False, True):
        x, y, mixes, target = _soft_batch(cut)
        model, opt, scale, want, (loss, bound, correct, uncertain) = _soft_reference(variant, optimizer, x, y,
                                                                                   target)
        trainer = native.NativeTrainer(model, opt, label_smoothing=variant.smoothing, lib=build)
        trainer.train_step(x, y, scale, mixes, premixed=True)
        _within(_state(model, opt), want, f"the native step on {'CutMix' if cut else 'mixup'}'s targets")
        got_loss, got_correct = trainer.take_totals()
        assert abs(got_loss - loss) <= bound, (cut, got_loss, loss, bound)
        assert abs(got_correct - correct) <= uncertain, (cut, got_correct, correct, uncertain)


def check_bad_mixing_changes_nothing():
    """Mixing draws that reach outside the batch or the image, or a weight outside [0, 1]: a
    ValueError, and the model as it was."""
    _, (model, opt) = _pair(Variant(bn=True), "adam")
    trainer = native.NativeTrainer(model, opt)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (x, y), = _random_batches(1, 10)
    good = mixing.draw(mixing.Mixing(0.0, 1.0), 10, 10, seed=1)
    # (field, flat element, value): a partner past the batch or before it, weights above 1 and
    # NaN, a box's bottom below the image and its top above it
    for field, i, value in (("partner", 3, 10), ("partner", 0, -1), ("lam", 2, 1.5), ("lam", 2, float("nan")),
                            ("box", 5, 29), ("box", 0, -1)):
        bad = mixing.MixDraws(good.partner.clone(), good.lam.clone(), good.box.clone())
        getattr(bad, field).view(-1)[i] = value
        with pytest.raises(ValueError, match="mixing"):
            trainer.train_step(x, y, None, bad)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---- given soft targets: a teacher's per-image targets (distillation), in place of the labels'

def _given_targets(y: torch.Tensor, seed: int = 6) -> torch.Tensor:
    """(B, 10) float32 probability targets far from the labels', in a teacher's form
    (teaching.Outputs.targets): each image's one-hot label lerped towards a random softmax by a
    weight in [0, 1] of its own; the first image's all softmax, the second's its label."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2 * torch.randn(len(y), 10, generator=g), 1)
    weight = torch.rand(len(y), 1, generator=g)
    weight[0], weight[1] = 1.0, 0.0
    return torch.lerp(F.one_hot(y, 10).float(), probs, weight).clamp_(0.0, 1.0)


def _unnormalized_targets(n: int, seed: int = 7) -> torch.Tensor:
    """(n, 10) float32 targets in [0, 1] whose rows sum to anything from 0 to about 5: F.cross_entropy
    takes them as they are (its gradient is softmax times the target's sum, less the target)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 10, generator=g) * torch.rand(n, 1, generator=g)


GIVEN_MODES = {"alone": None, "unnormalized": None, "mixup": mixing.Mixing(0.4, 0.0),
               "cutmix": mixing.Mixing(0.0, 1.0)}


@pytest.mark.parametrize(("build", "variant", "optimizer"), _on_builds(
    SOFT_CASES, lambda v, o: v.original or v == ALL_ON_RELU_MAX), indirect=["build"])
def check_one_step_on_given_targets_matches_torch(build, variant, optimizer):
    """The loss on given per-image soft targets (targets=, distillation's), with label smoothing
    on top where the variant has it, on a batch of 100 (two chunks: the second reads its own
    rows of the targets): alone (train_step; a teacher's, and rows that do not sum to 1, which
    F.cross_entropy takes as they are), and with the step's own mixup, then CutMix, of a batch
    gathered in a shuffled order (train_step_indexed; the targets, blended as training.py
    blends a teacher's, are the batch's in its order and replace mixing's in the loss). Every
    parameter, buffer and optimiser state element within its rounding bound of the float64
    step on F.cross_entropy(logits, targets, label_smoothing=...), as torch's own float32 step
    is; the summed loss within the bound of the float64 loss, the correct predictions (of each
    image's own label) the float64 ones' but for those rounding may change."""
    (data_x, data_y), = _random_batches(1, 100, seed=4)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(2))
    for mode, mix in GIVEN_MODES.items():
        if mix is None:
            x, y, mixes, idx = data_x, data_y, None, None
            target = _given_targets(y) if mode == "alone" else _unnormalized_targets(len(y))
        else:
            mixes = mixing.draw(mix, 100, 100, seed=5)
            idx, y = order, data_y[order]
            x = mixes.images(data_x[order], 0)
            target = mixes.blend(_given_targets(y), 0).contiguous()
            assert (target - mixes.targets(y, 0)).abs().max() > 0.5  # mixing's targets would fail
        model, opt, scale, want, (loss, bound, correct, uncertain) = _soft_reference(variant, optimizer, x, y,
                                                                                   target)
        trainer = native.NativeTrainer(model, opt, label_smoothing=variant.smoothing, lib=build)
        if mix is None:
            trainer.train_step(x, y, scale, targets=target)
        else:
            trainer.train_step_indexed(data_x, data_y, idx, scale, None, 0, mixes, targets=target)
        _within(_state(model, opt), want, f"the native step on given targets ({mode})")
        got_loss, got_correct = trainer.take_totals()
        assert abs(got_loss - loss) <= bound, (mode, got_loss, loss, bound)
        assert abs(got_correct - correct) <= uncertain, (mode, got_correct, correct, uncertain)


def _snapshot(model, optimizer) -> dict[str, bytes]:
    """The model's parameters and buffers and the optimiser's state, as bytes."""
    return {k: v.detach().contiguous().numpy().tobytes() for k, v in _state(model, optimizer).items()}


def check_bad_targets_change_nothing():
    """Given targets with an element above 1, below 0, NaN or infinite (in either chunk; the C
    step's LN_BAD_TARGET), through either entry point and beside valid mixing, or of the wrong
    shape, dtype or layout (refused in Python): a ValueError, and the model, the optimiser's
    state and the totals as they were, byte for byte."""
    _, (model, opt) = _pair(Variant(bn=True), "adam")
    trainer = native.NativeTrainer(model, opt)
    (x, y), = _random_batches(1, 70)  # two chunks, the second short
    good = _given_targets(y)
    idx = torch.arange(70).flip(0)
    mixes = mixing.draw(mixing.Mixing(0.4, 1.0, 0.5), 70, 70, seed=1)
    trainer.train_step(x, y, targets=good)  # the optimiser's state made: it must not change either
    trainer.take_totals()
    before = _snapshot(model, opt)
    # (flat element, value): rows 0 and 69 (the second chunk's last image)
    for i, value in ((3, 1.5), (0, -0.1), (695, float("nan")), (699, float("inf")), (12, -float("inf")),
                     (690, 1.0000001)):
        bad = good.clone()
        bad.view(-1)[i] = value
        with pytest.raises(ValueError, match="soft target is outside"):
            trainer.train_step(x, y, targets=bad)
        with pytest.raises(ValueError, match="soft target is outside"):
            trainer.train_step_indexed(x, y, idx, targets=bad)
        with pytest.raises(ValueError, match="soft target is outside"):
            trainer.train_step_indexed(x, y, idx, None, None, 0, mixes, targets=bad)
    for bad in (good[:, :9].contiguous(), good[:69], torch.cat([good, good[:1]]), good.double(), good.half(),
                good.t().contiguous().t(), good.reshape(70, 1, 10), torch.zeros(70, 10, dtype=torch.long)):
        with pytest.raises(ValueError, match="targets must be a contiguous"):
            trainer.train_step(x, y, targets=bad)
        with pytest.raises(ValueError, match="targets must be a contiguous"):
            trainer.train_step_indexed(x, y, idx, targets=bad)
    assert _snapshot(model, opt) == before
    assert trainer.take_totals() == (0.0, 0)
