"""`lenetlab export --onnx`: every architecture, parity with onnxruntime, dynamic batch, metadata, errors."""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from lenetlab import cli, export
from lenetlab.data import CLASS_NAMES, MEAN, STD, normalise
from lenetlab.model import LeNet5V1, architecture_name, fast_forward

onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'lenetlab[onnx]'")
onnxruntime = pytest.importorskip("onnxruntime", reason="needs the onnx extra: pip install 'lenetlab[onnx]'")
if export.use_dynamo():
    pytest.importorskip("onnxscript", reason="needs the onnx extra: pip install 'lenetlab[onnx]'")

# The five published recipes have four architectures: both L2 recipes are the baseline's.
FLAGS = {architecture_name(LeNet5V1(d, b)): (d, b) for d in (False, True) for b in (False, True)}
SUBSET = 1000  # the API exports check parity on this many test images; the CLI one on all 10,000


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small batches on a machine shared with others: one torch thread is much faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def weights(dataset, tmp_path_factory):
    """Each architecture trained for 40 steps (batch norm's running statistics included), saved."""
    root = tmp_path_factory.mktemp("export")
    x, y = normalise(dataset.train_images[:40 * 64]), dataset.train_labels[:40 * 64]
    paths = {}
    for name, (use_dropout, use_batch_norm) in FLAGS.items():
        torch.manual_seed(0)
        model = LeNet5V1(use_dropout, use_batch_norm)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for start in range(0, len(x), 64):
            loss = F.cross_entropy(fast_forward(model, x[start:start + 64]), y[start:start + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        paths[name] = root / f"{name}.pth"
        torch.save(model.state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def cli_export(weights, data_dir):
    """The baseline exported by the command, checked on the 10,000 test images."""
    out = weights["baseline"].with_suffix(".onnx")
    code, printed, _ = run_export(weights["baseline"], out, data_dir)
    return code, out, printed


def run_export(weights_path, out, data_dir) -> tuple[int, str, str]:
    """`lenetlab export` in-process: (exit status, stdout, stderr); capsys cannot serve a module fixture."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["export", str(weights_path), "--onnx", str(out), "--data-dir", str(data_dir)])
    return code, stdout.getvalue(), stderr.getvalue()


def test_cli_export_prints_its_parity_figures(cli_export):
    code, out, printed = cli_export
    assert code == 0 and out.is_file()
    exporter = "torch.export-based (dynamo)" if export.use_dynamo() else "TorchScript-based"
    assert f"exported baseline with the {exporter} exporter" in printed
    figures = re.search(r"parity on 10,000 test images: max \|logit difference\| (\S+) \(tolerance 0.0001\), "
                        r"predicted class differs on (\d+)", printed)
    assert figures and float(figures[1]) <= 1e-4 and figures[2] == "0", printed
    onnx_acc, torch_acc = re.search(r"test accuracy: onnxruntime (\S+), PyTorch (\S+)", printed).groups()
    assert onnx_acc == torch_acc
    assert printed.rstrip().endswith(f"wrote {out} ({out.stat().st_size:,} bytes)")


def check_model(path, weights_path, flags, dataset):
    """Metadata, input/output shapes, and onnxruntime against PyTorch at batch sizes 1 and 7."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == list(CLASS_NAMES)
    assert (float(meta["mean"]), float(meta["std"])) == (MEAN, STD)
    assert "(batch, 1, 28, 28), NCHW" in meta["input_layout"]
    assert "(pixel / 255 - mean) / std" in meta["input_layout"]
    assert meta["architecture"] == (f"LeNet5V1(use_dropout={flags[0]}, use_batch_norm={flags[1]}, "
                                    "activation='tanh', pool='avg')")
    shape = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert (proto.graph.input[0].name, shape) == ("image", ["batch", 1, 28, 28])
    model = LeNet5V1(*flags)
    model.load_state_dict(torch.load(weights_path, weights_only=True))
    model.eval()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for start, size in ((0, 1), (1, 7)):
        x = normalise(dataset.test_images[start:start + size])
        (got,) = session.run(None, {"image": x.numpy()})
        with torch.inference_mode():
            expected = model(x)
        assert got.shape == (size, 10)
        assert (torch.from_numpy(got) - expected).abs().max() <= 1e-4
        assert got.argmax(1).tolist() == expected.argmax(1).tolist()


@pytest.mark.parametrize("name", list(FLAGS))
def test_every_architecture_exports_with_parity(name, weights, cli_export, dataset, tmp_path):
    if name == "baseline":
        out = cli_export[1]
    else:
        out = tmp_path / f"{name}.onnx"
        result = export.export_onnx(weights[name], out, dataset.test_images[:SUBSET],
                                    dataset.test_labels[:SUBSET])
        assert result.written and result.ok and result.images == SUBSET
        assert result.max_abs_diff <= 1e-4 and result.argmax_mismatches == 0
        assert result.onnx_accuracy == result.torch_accuracy and result.architecture == name
    check_model(out, weights[name], FLAGS[name], dataset)


def test_torchscript_exporter_for_torch_before_2_9(weights, dataset, tmp_path):
    """The path older torch takes (2.4 to 2.8), run here with the installed torch."""
    out, images = tmp_path / "legacy.onnx", dataset.test_images[:SUBSET]
    result = export.export_onnx(weights["dropout+batch_norm"], out, images, dynamo=False)
    assert result.written and result.ok and (result.exporter, result.opset) == ("torchscript", 17)
    check_model(out, weights["dropout+batch_norm"], FLAGS["dropout+batch_norm"], dataset)


def test_a_failed_parity_check_writes_nothing(weights, cli_export, data_dir, tmp_path, monkeypatch):
    serialised = cli_export[1].read_bytes()
    monkeypatch.setattr(export, "to_onnx", lambda model, dynamo: serialised)  # no second slow export
    monkeypatch.setattr(export, "parity", lambda *args: (3e-4, 2, 0.8, 0.79))
    out = tmp_path / "bad.onnx"
    code, printed, _ = run_export(weights["baseline"], out, data_dir)
    assert code == 1 and not out.exists()
    assert "predicted class differs on 2" in printed and f"parity check failed: {out} not written" in printed


def test_without_the_extra_one_line(weights, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    code = cli.main(["export", str(weights["baseline"]), "--onnx", str(tmp_path / "m.onnx")])
    assert code == 2
    assert capsys.readouterr().err == ("lenetlab: error: lenetlab export needs the onnx extra: "
                                       "pip install 'lenetlab[onnx]'\n")


@pytest.mark.parametrize("problem", ["missing weights", "folder in the way"])
def test_bad_input_one_line(problem, weights, data_dir, tmp_path, capsys):
    source = tmp_path / "none.pth" if problem == "missing weights" else weights["baseline"]
    code = cli.main(["export", str(source), "--onnx", str(tmp_path), "--data-dir", str(data_dir)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("none.pth: no such file" if problem == "missing weights" else "a folder is in the way") in err
