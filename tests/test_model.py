"""LeNet5V1's layout (so the original's weights load), its activation and pooling options,
variant detection, weight-file checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support import rounding  # float64 references and float32 rounding bounds
from support.parity import check_fast_forward_step_matches_torch

from lenetlab.errors import WeightsError
from lenetlab.model import LeNet5V1, detect_flags, fast_forward, load_weights

# The keys as shared/spec/facts.md lists them, for each (use_dropout, use_batch_norm).
CONV = ["feature.0.weight", "feature.0.bias"]
BN1 = [f"feature.1.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                  "num_batches_tracked")]
BN2 = [f"feature.5.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                  "num_batches_tracked")]
EXPECTED_KEYS = {
    (False, False): CONV + ["feature.3.weight", "feature.3.bias", "classifier.1.weight",
                            "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
                            "classifier.5.weight", "classifier.5.bias"],
    (True, False): CONV + ["feature.3.weight", "feature.3.bias", "classifier.1.weight",
                           "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
                           "classifier.6.weight", "classifier.6.bias"],
    (False, True): CONV + BN1 + ["feature.4.weight", "feature.4.bias"] + BN2 + [
        "classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias",
        "classifier.5.weight", "classifier.5.bias"],
    (True, True): CONV + BN1 + ["feature.4.weight", "feature.4.bias"] + BN2 + [
        "classifier.1.weight", "classifier.1.bias", "classifier.4.weight", "classifier.4.bias",
        "classifier.6.weight", "classifier.6.bias"],
}
FLAGS = list(EXPECTED_KEYS)
HEADS = [("tanh", "avg"), ("relu", "avg"), ("tanh", "max"), ("relu", "max")]  # (activation, pool)


@pytest.mark.parametrize("flags", FLAGS)
def test_state_dict_keys_match_the_original_layout(flags):
    model = LeNet5V1(use_dropout=flags[0], use_batch_norm=flags[1])
    assert list(model.state_dict()) == EXPECTED_KEYS[flags]
    assert detect_flags(model.state_dict()) == flags
    kinds = [type(m).__name__ for m in model.feature] + [type(m).__name__ for m in model.classifier]
    assert kinds.count("Tanh") == 4 and kinds.count("AvgPool2d") == 2
    assert ("Dropout" in kinds) == flags[0] and ("BatchNorm2d" in kinds) == flags[1]


@pytest.mark.parametrize("flags", FLAGS)
def test_relu_and_max_pooling_keep_the_layout(flags):
    """Same keys and shapes as the original's: its weights load unchanged, and vice versa."""
    default = LeNet5V1(*flags)
    model = LeNet5V1(*flags, activation="relu", pool="max")
    assert (default.activation, default.pool) == ("tanh", "avg")
    assert (model.activation, model.pool) == ("relu", "max")
    assert ({k: v.shape for k, v in model.state_dict().items()}
            == {k: v.shape for k, v in default.state_dict().items()})
    assert list(model.state_dict()) == EXPECTED_KEYS[flags]
    assert detect_flags(model.state_dict()) == flags
    model.load_state_dict(default.state_dict())
    default.load_state_dict(model.state_dict())
    layers = [*model.feature, *model.classifier]
    kinds = [type(m).__name__ for m in layers]
    assert kinds.count("ReLU") == 4 and kinds.count("MaxPool2d") == 2
    assert "Tanh" not in kinds and "AvgPool2d" not in kinds
    assert all(m.kernel_size == 2 and m.stride == 2 for m in layers if isinstance(m, torch.nn.MaxPool2d))
    # where the original's layers were: the same indices, the same classes elsewhere
    for mine, original in zip(layers, [*default.feature, *default.classifier]):
        swapped = {"Tanh": "ReLU", "AvgPool2d": "MaxPool2d"}
        assert type(mine).__name__ == swapped.get(type(original).__name__, type(original).__name__)


def test_positional_arguments_are_the_originals():
    model = LeNet5V1(True, False, 0.3)
    assert model.use_dropout and not model.use_batch_norm and model.classifier[2].p == 0.3
    assert (model.activation, model.pool) == ("tanh", "avg")
    assert LeNet5V1(False, True, 0.5, "relu", "max").pool == "max"


def test_unknown_activation_or_pool_is_refused():
    with pytest.raises(ValueError, match="activation .*'gelu'"):
        LeNet5V1(activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        LeNet5V1(activation="ReLU")  # the names are exact
    with pytest.raises(ValueError, match="pool .*'min'"):
        LeNet5V1(pool="min")
    with pytest.raises(ValueError, match="pool"):
        LeNet5V1(pool=None)


@pytest.mark.parametrize("flags", FLAGS)
def test_relu_and_max_pooling_fast_forward_is_the_module(flags):
    """ReLU and max pooling run torch's own kernels in fast_forward: the same logits, bit for bit."""
    torch.manual_seed(0)
    model = LeNet5V1(*flags, activation="relu", pool="max")
    x = torch.randn(32, 1, 28, 28)
    model.train()
    fast_forward(model, x)  # moves the batch-norm running statistics away from 0 and 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(fast_forward(model, x), model(x))


@pytest.mark.parametrize("head", HEADS, ids="-".join)
@pytest.mark.parametrize("flags", FLAGS)
def test_fast_forward_matches_the_module(flags, head):
    """fast_forward is the module's arithmetic: both give eval-mode logits, and without dropout
    training-mode gradients, within float32 rounding of the float64 computation (the bounds of
    tests/support/rounding.py, derived from float32 rounding, not measured on one CPU)."""
    torch.manual_seed(0)
    model = LeNet5V1(*flags, activation=head[0], pool=head[1])
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    model.train()
    exact = None if flags[0] else rounding.gradients(model, x, y)  # from the state before the step
    F.cross_entropy(fast_forward(model, x), y).backward()  # also moves batch-norm running statistics
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.eval()
    logits, bound = rounding.forward(model, x)
    with torch.no_grad():
        for name, got in (("fast_forward", fast_forward(model, x)), ("the module", model(x))):
            diff = (got.double() - logits).abs()
            assert (diff <= bound).all(), f"{name}: logits off by {diff.max():.3g} (bound {bound.min():.3g}+)"
    if exact is not None:  # without dropout the training-mode gradients must agree too
        model.train()
        F.cross_entropy(model(x), y).backward()
        for (name, p), fast in zip(model.named_parameters(), grads):
            value, bound = exact.values[name], exact.bounds[name] + rounding.U * exact.values[name].abs()
            for who, got in (("fast_forward", fast), ("the module", p.grad)):
                diff = (got.double() - value).abs()
                assert (diff <= bound).all(), f"{who}: {name}'s gradient off by {diff.max():.3g}"


@pytest.mark.parametrize("flags", FLAGS)
def test_saved_state_dict_round_trips(tmp_path, flags):
    model = LeNet5V1(*flags)
    torch.save(model.state_dict(), tmp_path / "w.pth")  # exactly as the original saved
    loaded = load_weights(tmp_path / "w.pth")
    assert (loaded.use_dropout, loaded.use_batch_norm) == flags
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_bad_weight_files_get_one_line_errors(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_weights(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(WeightsError, match="not a torch weights file"):
        load_weights(tmp_path / "text.pth")
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="not a LeNet5V1 state_dict"):
        load_weights(tmp_path / "other.pth")
    state = LeNet5V1().state_dict()
    state["classifier.5.weight"] = torch.zeros(5, 84)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="wrong shape: classifier.5.weight"):
        load_weights(tmp_path / "shape.pth")
    sparse = LeNet5V1().state_dict()
    sparse["feature.0.weight"] = sparse["feature.0.weight"].to_sparse()
    torch.save(sparse, tmp_path / "sparse.pth")
    with pytest.raises(WeightsError, match="sparse or meta tensors: feature.0.weight"):
        load_weights(tmp_path / "sparse.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_weights(tmp_path / "list.pth")


# fast_forward's training step against the float64 step of the plain module, as the native step's
test_fast_forward_step_matches_torch = check_fast_forward_step_matches_torch
