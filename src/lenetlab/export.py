"""Export trained weights to ONNX, with their classes and normalisation, checked against PyTorch first.

The file takes `image`, float32 (batch, 1, 28, 28) normalised as training does, any batch
size, and gives `logits`, float32 (batch, 10). Its metadata_props carry the class names, the
normalisation constants and the input layout, so a runtime needs nothing else from lenetlab.

Exporter: torch.export-based (torch.onnx.export(dynamo=True), needs onnxscript) on torch
2.9 and later, where PyTorch made it the default and recommends it; the TorchScript-based
exporter on torch 2.4 to 2.8, where that one is still the default. Before anything is
written, onnxruntime runs the exported graph on the given images (the 10,000 test images,
from the CLI) and its logits must match PyTorch's within TOLERANCE, with the same predicted
class for every image; otherwise nothing is written.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .data import CLASS_NAMES, MEAN, STD, normalise
from .errors import OutputError, SpecError
from .files import atomic_write, writable_dir
from .model import LeNet5V1, architecture_call, architecture_name, load_weights

TOLERANCE = 1e-4
EXTRA = "lenetlab export needs the onnx extra: pip install 'lenetlab[onnx]'"
INPUT, OUTPUT = "image", "logits"
LEGACY_OPSET = 17


@dataclass
class Export:
    """What export_onnx did: the exporter, and onnxruntime's agreement with PyTorch."""

    out: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    architecture: str
    images: int
    max_abs_diff: float
    argmax_mismatches: int
    torch_accuracy: float | None
    onnx_accuracy: float | None
    written: bool
    size: int  # bytes

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.argmax_mismatches == 0


def use_dynamo() -> bool:
    """The torch.export-based exporter where it is torch's default (2.9 and later)."""
    major, minor = (int(part) for part in re.findall(r"\d+", torch.__version__)[:2])
    return (major, minor) >= (2, 9)


def require_extra(dynamo: bool | None = None) -> None:
    """SpecError with the install line when onnx, onnxruntime (or onnxscript, for dynamo) is missing."""
    names = ["onnx", "onnxruntime"] + (["onnxscript"] if (use_dynamo() if dynamo is None else dynamo) else [])
    for name in names:
        try:
            __import__(name)
        except ImportError:
            raise SpecError(EXTRA) from None


def metadata(model: LeNet5V1, weights: Path) -> dict[str, str]:
    """The metadata_props of an exported model: enough to feed it and read its output."""
    return {
        "class_names": json.dumps(list(CLASS_NAMES)),
        "mean": repr(MEAN),
        "std": repr(STD),
        "input_layout": (f"{INPUT}: float32 (batch, 1, 28, 28), NCHW, one grey channel, a light garment on "
                         f"black; x = (pixel / 255 - mean) / std, pixel 0-255"),
        "output": f"{OUTPUT}: float32 (batch, 10), in class_names order; softmax gives probabilities",
        "architecture": architecture_call(model),
        "weights_sha256": hashlib.sha256(Path(weights).read_bytes()).hexdigest(),
        "lenetlab_version": __version__,
    }


def _quietly(call):
    """Run call() without the exporters' warnings and log lines (torchvision absent, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return call()
    finally:
        logger.setLevel(level)


def to_onnx(model: LeNet5V1, dynamo: bool) -> bytes:
    """The serialised ONNX model of model (eval mode), with a dynamic batch dimension."""
    example = torch.zeros(2, 1, 28, 28)
    if dynamo:
        try:
            program = _quietly(lambda: torch.onnx.export(
                model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                verbose=False))
        except ImportError as exc:  # an onnxscript older than this torch (0.5 lacks torch 2.11's API)
            raise SpecError(f"the installed onnxscript is too old for torch {torch.__version__} ({exc}): "
                            f"pip install --upgrade 'lenetlab[onnx]'") from None
        return program.model_proto.SerializeToString()
    import io

    buffer = io.BytesIO()
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    _quietly(lambda: torch.onnx.export(
        model, (example,), buffer, input_names=[INPUT], output_names=[OUTPUT],
        dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, opset_version=LEGACY_OPSET,
        do_constant_folding=True, verbose=False, **legacy))
    return buffer.getvalue()


def with_metadata(serialised: bytes, props: dict[str, str]) -> tuple[bytes, int]:
    """The model with props added to its metadata_props, and its default-domain opset."""
    import onnx

    proto = onnx.load_from_string(serialised)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props}, **props})
    onnx.checker.check_model(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return proto.SerializeToString(), opset


@torch.inference_mode()
def parity(model: LeNet5V1, serialised: bytes, x: torch.Tensor, y: torch.Tensor | None,
           batch_size: int = 1000) -> tuple[float, int, float | None, float | None]:
    """(max |logit difference|, argmax mismatches, PyTorch accuracy, onnxruntime accuracy) on x."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(serialised, options, providers=["CPUExecutionProvider"])
    model.eval()
    worst, mismatches, right_torch, right_onnx = 0.0, 0, 0, 0
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        expected = model(batch)
        got = torch.from_numpy(session.run([OUTPUT], {INPUT: batch.numpy()})[0])
        worst = max(worst, (got.double() - expected.double()).abs().max().item())
        mismatches += int((got.argmax(1) != expected.argmax(1)).sum())
        if y is not None:
            target = y[start:start + batch_size]
            right_torch += int((expected.argmax(1) == target).sum())
            right_onnx += int((got.argmax(1) == target).sum())
    if y is None or not len(x):
        return worst, mismatches, None, None
    return worst, mismatches, right_torch / len(x), right_onnx / len(x)


def export_onnx(weights: str | Path, out: str | Path, images: torch.Tensor,
                labels: torch.Tensor | None = None, dynamo: bool | None = None) -> Export:
    """Export a weights file to out.onnx after checking onnxruntime against PyTorch on images.

    images are uint8 (N, 28, 28) like Fashion-MNIST's (normalised here as in training);
    labels, when given, add both accuracies to the figures. dynamo None picks the exporter
    for the installed torch. The file is written (atomically) only when the check passes.
    """
    dynamo = use_dynamo() if dynamo is None else dynamo
    require_extra(dynamo)
    weights, out = Path(weights), Path(out)
    model = load_weights(weights)
    if out.is_dir():
        raise OutputError(f"{out}: a folder is in the way (expected the .onnx file's name)")
    writable_dir(out.parent)  # before the slow part
    serialised, opset = with_metadata(to_onnx(model, dynamo), metadata(model, weights))
    worst, mismatches, torch_acc, onnx_acc = parity(model, serialised, normalise(images), labels)
    result = Export(out, "dynamo" if dynamo else "torchscript", opset,
                    architecture_name(model), len(images), worst,
                    mismatches, torch_acc, onnx_acc, written=False, size=len(serialised))
    if result.ok:
        atomic_write(out, serialised)
        result.written = True
    return result


def describe(result: Export) -> str:
    """The figures of an export, for people."""
    exporter = ("torch.export-based (dynamo)" if result.exporter == "dynamo" else "TorchScript-based")
    lines = [f"exported {result.architecture} with the {exporter} exporter, opset {result.opset}, "
             f"dynamic batch dimension",
             f"parity on {result.images:,} test images: max |logit difference| {result.max_abs_diff:.2e} "
             f"(tolerance {TOLERANCE:g}), predicted class differs on {result.argmax_mismatches}"]
    if result.onnx_accuracy is not None:
        lines.append(f"test accuracy: onnxruntime {result.onnx_accuracy:.4f}, "
                     f"PyTorch {result.torch_accuracy:.4f}")
    lines.append(f"wrote {result.out} ({result.size:,} bytes)" if result.written
                 else f"parity check failed: {result.out} not written")
    return "\n".join(lines)
