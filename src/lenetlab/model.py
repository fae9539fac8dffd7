"""LeNet5V1 as the original study built it (with ReLU and max pooling as options), loading
weights, and a faster forward pass for training.

The module layout (two nn.Sequential attributes, layers appended in a fixed order,
optional layers shifting the indices of later ones) is what makes weights saved by
the original code load here unchanged, so it must not change (docs/original-study.md
lists the keys of every variant).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError
from .recipes import ACTIVATIONS, POOLS

# The layers of each name a recipe may use.
ACTIVATION_LAYERS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU}
POOL_LAYERS: dict[str, type[nn.Module]] = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d}


class LeNet5V1(nn.Module):
    """LeNet-5 with tanh and average pooling as the original study built it, or with ReLU
    and/or max pooling; optional dropout and batch normalisation.

    activation="relu" puts nn.ReLU in every place of nn.Tanh, pool="max" nn.MaxPool2d (2x2,
    stride 2) in every place of nn.AvgPool2d (the names are kept as self.activation and
    self.pool; another name is a ValueError). Neither has weights or moves an index, so every
    variant has the original's state_dict keys and shapes: the weights of one load into any other.
    """

    def __init__(self, use_dropout: bool = False, use_batch_norm: bool = False,
                 dropout_rate: float = 0.5, activation: str = "tanh", pool: str = "avg") -> None:
        super().__init__()
        for name, value, choices in (("activation", activation, ACTIVATIONS), ("pool", pool, POOLS)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        self.use_dropout = use_dropout
        self.use_batch_norm = use_batch_norm
        self.activation = activation
        self.pool = pool
        act, pooling = ACTIVATION_LAYERS[activation], POOL_LAYERS[pool]
        feature: list[nn.Module] = [nn.Conv2d(1, 6, kernel_size=5, stride=1, padding=2)]
        if use_batch_norm:
            feature.append(nn.BatchNorm2d(6))
        feature += [act(), pooling(kernel_size=2, stride=2),
                    nn.Conv2d(6, 16, kernel_size=5, stride=1)]
        if use_batch_norm:
            feature.append(nn.BatchNorm2d(16))
        feature += [act(), pooling(kernel_size=2, stride=2)]
        classifier: list[nn.Module] = [nn.Flatten(), nn.Linear(16 * 5 * 5, 120)]
        if use_dropout:
            classifier.append(nn.Dropout(dropout_rate))
        classifier += [act(), nn.Linear(120, 84), act(), nn.Linear(84, 10)]
        self.feature = nn.Sequential(*feature)
        self.classifier = nn.Sequential(*classifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.feature(x))


def architecture_name(model: LeNet5V1) -> str:
    """A short name for a model's architecture, as `evaluate` reports it: baseline,
    dropout+batch_norm, batch_norm+relu+max..."""
    parts = [name for name, on in (("dropout", model.use_dropout), ("batch_norm", model.use_batch_norm),
                                   ("relu", model.activation == "relu"), ("max", model.pool == "max")) if on]
    return "+".join(parts) or "baseline"


def architecture_call(model: LeNet5V1) -> str:
    """The constructor call that builds model's architecture."""
    return (f"LeNet5V1(use_dropout={model.use_dropout}, use_batch_norm={model.use_batch_norm}, "
            f"activation={model.activation!r}, pool={model.pool!r})")


def expected_shapes(use_dropout: bool, use_batch_norm: bool) -> dict[str, tuple[int, ...]]:
    """The state_dict keys and shapes of one flag combination."""
    return {k: tuple(v.shape) for k, v in LeNet5V1(use_dropout, use_batch_norm).state_dict().items()}


def detect_flags(state_dict: dict) -> tuple[bool, bool]:
    """Tell (use_dropout, use_batch_norm) from a state_dict's keys alone.

    Batch norm adds `feature.1.*`; dropout has no weights but shifts the second
    linear layer from `classifier.3` to `classifier.4`. Raises WeightsError when the
    keys or shapes fit no combination.
    """
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise WeightsError("not a state_dict (expected a mapping of names to tensors)")
    odd = [k for k, v in state_dict.items() if v.layout != torch.strided or v.is_meta]
    if odd:
        raise WeightsError(f"not a LeNet5V1 state_dict (sparse or meta tensors: {', '.join(odd[:3])})")
    use_batch_norm = "feature.1.weight" in state_dict
    use_dropout = "classifier.4.weight" in state_dict
    expected = expected_shapes(use_dropout, use_batch_norm)
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected),
                                ("wrong shape", wrong)) if keys
        )
        raise WeightsError(f"not a LeNet5V1 state_dict ({detail})")
    return use_dropout, use_batch_norm


def load_weights(path: str | Path) -> LeNet5V1:
    """Load a .pth state_dict (weights_only) into a LeNet5V1 of the right variant, in eval mode.

    Dropout and batch norm are told by the keys. Activation and pooling have no weights: they
    come from the sidecar lenetlab writes beside its weights (the same name ending in .json),
    else they are the original's tanh and average pooling. model.architecture_source says
    which was used.
    """
    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"{path}: a folder, not a weights file")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not its own
        raise WeightsError(f"{path}: {_load_problem(exc)}") from None
    try:
        use_dropout, use_batch_norm = detect_flags(state_dict)
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    broken = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise WeightsError(f"{path}: non-finite values (NaN or infinity) in {', '.join(broken[:3])}: "
                           f"the model diverged in training")
    activation, pool, source = _sidecar_architecture(path, use_dropout, use_batch_norm)
    model = LeNet5V1(use_dropout=use_dropout, use_batch_norm=use_batch_norm, activation=activation, pool=pool)
    model.load_state_dict(state_dict)
    model.architecture_source = source
    return model.eval()


def _sidecar_architecture(weights: Path, use_dropout: bool, use_batch_norm: bool) -> tuple[str, str, str]:
    """(activation, pool, where they came from) for the weights file: its sidecar's, or the original's."""
    sidecar = weights.with_suffix(".json")
    if not sidecar.is_file():
        return "tanh", "avg", "no sidecar: the original's tanh and average pooling"
    try:
        architecture = json.loads(sidecar.read_text(encoding="utf-8"))["architecture"]
        activation, pool = architecture.get("activation", "tanh"), architecture.get("pool", "avg")
        flags = (architecture.get("use_dropout", use_dropout),
                 architecture.get("use_batch_norm", use_batch_norm))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise WeightsError(f"{sidecar}: beside the weights but not a lenetlab sidecar (no readable "
                           f"\"architecture\"); move it away to load the weights as the original's") from None
    if not isinstance(activation, str) or not isinstance(pool, str) or activation not in ACTIVATIONS \
            or pool not in POOLS:
        raise WeightsError(f"{sidecar}: architecture: unknown activation {activation!r} or pool {pool!r} "
                           f"(expected {' or '.join(ACTIVATIONS)}, {' or '.join(POOLS)})")
    if flags != (use_dropout, use_batch_norm):
        raise WeightsError(f"{sidecar}: says use_dropout={flags[0]}, use_batch_norm={flags[1]}, but the "
                           f"weights are of use_dropout={use_dropout}, use_batch_norm={use_batch_norm}")
    return activation, pool, f"architecture from {sidecar.name}"


def _load_problem(exc: Exception) -> str:
    """One readable line from torch.load's error, whose text spans paragraphs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "Unsupported global" in text:
        return ("a pickled Python object (such as a whole model saved with torch.save(model)), "
                "not a state_dict: save model.state_dict() instead")
    if "Weights only load failed" in text:
        return "not a torch weights file (not a pickle that torch.load can read)"
    first = text.strip().splitlines()[0][:100] if text.strip() else ""
    return f"not a torch weights file ({type(exc).__name__}{': ' + first if first else ''})"


# ---------------------------------------------------------------------------
# The fast forward pass used by lenetlab's own training and evaluation.
#
# On CPU, PyTorch's tanh, average-pooling and small-convolution backward kernels
# are slow for these small maps (tanh took 3x as long as sigmoid here). The
# functions below compute the same values through faster kernels on CPU and use
# PyTorch's own on CUDA; the module above still uses nn.Tanh and nn.AvgPool2d so
# that `model(x)` behaves exactly as in the original. ReLU and max pooling run
# PyTorch's own F.relu and F.max_pool2d everywhere (the module's very kernels).
# ---------------------------------------------------------------------------


class _Tanh(torch.autograd.Function):
    """tanh(x) = 2 * sigmoid(2x) - 1, with the usual 1 - y^2 backward (|error| < 1e-6)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = torch.sigmoid(x * 2).mul_(2).sub_(1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


@functools.lru_cache(maxsize=8)
def _spread(width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(width, 2*width): column j carries a quarter of input column j//2; built once, not per step."""
    spread = torch.zeros(width, 2 * width, dtype=dtype, device=device)
    columns = torch.arange(width, device=device)
    spread[columns, 2 * columns] = 0.25
    spread[columns, 2 * columns + 1] = 0.25
    return spread


class _AvgPool2x2(torch.autograd.Function):
    """2x2 average pooling, stride 2, as four strided adds.

    The backward spreads a quarter of each gradient over its 2x2 block: a small
    matmul doubles the columns, then an expand doubles the rows. Both copy long
    contiguous runs, which measured 2.5x faster here than a 6-d expand or
    PyTorch's own avg_pool2d_backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2]
                + x[:, :, 0::2, 1::2] + x[:, :, 1::2, 1::2]).mul_(0.25)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, c, h, w = grad.shape
        wide = (grad.reshape(-1, w) @ _spread(w, grad.dtype, grad.device)).view(b * c, h, 1, 2 * w)
        return wide.expand(b * c, h, 2, 2 * w).reshape(b, c, 2 * h, 2 * w)


class _Conv2d(torch.autograd.Function):
    """A valid 5x5 convolution whose weight gradient is computed as a convolution
    with the batch as channels (measured 1.4x faster here than mkldnn's own)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return F.conv2d(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = F.conv_transpose2d(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = F.conv2d(x.transpose(0, 1), grad.transpose(0, 1)).transpose(0, 1)
        return grad_x, grad_w, grad.sum((0, 2, 3))


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, weight, bias) if x.is_cuda else _Conv2d.apply(x, weight, bias)


def _tanh(x: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x) if x.is_cuda else _Tanh.apply(x)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 2) if x.is_cuda else _AvgPool2x2.apply(x)


# fast_forward's function for each LeNet5V1 activation and pool
_FAST_ACTIVATIONS = {"tanh": _tanh, "relu": F.relu}
_FAST_POOLS = {"avg": _pool, "max": lambda x: F.max_pool2d(x, 2)}


class _Layers(NamedTuple):
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d | None
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d | None
    fc1: nn.Linear
    dropout: nn.Dropout | None
    fc2: nn.Linear
    fc3: nn.Linear


def _layers(model: LeNet5V1) -> _Layers:
    f, c = model.feature, model.classifier
    bn = 1 if model.use_batch_norm else 0
    dr = 1 if model.use_dropout else 0
    return _Layers(f[0], f[1] if bn else None, f[3 + bn], f[4 + bn] if bn else None,
                   c[1], c[2] if dr else None, c[3 + dr], c[5 + dr])


def _batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, training: bool) -> torch.Tensor:
    if training:
        bn.num_batches_tracked.add_(1)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                        training, bn.momentum, bn.eps)


def fast_forward(model: LeNet5V1, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of model(x), computed with the faster kernels above.

    In training mode with dropout, keep is the (batch, 120) mask of the units kept, drawn by
    the caller from the trial's generator so that a run's randomness is fully determined by
    its seed and replays on resume; without it the mask is drawn from torch's global generator.
    """
    L = _layers(model)
    act, pool = _FAST_ACTIVATIONS[model.activation], _FAST_POOLS[model.pool]
    h = F.conv2d(x, L.conv1.weight, L.conv1.bias, padding=2)
    if L.bn1 is not None:
        h = _batch_norm(h, L.bn1, model.training)
    h = pool(act(h))
    h = _conv(h, L.conv2.weight, L.conv2.bias)
    if L.bn2 is not None:
        h = _batch_norm(h, L.bn2, model.training)
    h = pool(act(h)).flatten(1)
    h = F.linear(h, L.fc1.weight, L.fc1.bias)
    if L.dropout is not None and model.training and L.dropout.p > 0:
        if keep is None:
            keep = torch.rand(h.shape, device=h.device) >= L.dropout.p
        h = h * keep / (1.0 - L.dropout.p)
    h = act(h)
    h = act(F.linear(h, L.fc2.weight, L.fc2.bias))
    return F.linear(h, L.fc3.weight, L.fc3.bias)
