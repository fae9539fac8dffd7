"""The lenetlab command as a user runs it (in this process): output, saved files, and one-line
errors with exit 2 for every bad input, checked before any work starts or any folder exists."""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_gone, assert_one_line_error, children, run_cli, strict_json

from lenetlab import __version__, cli
from lenetlab.model import LeNet5V1


def test_variants_lists_the_five_recipes():
    result = run_cli("variants")
    assert result.returncode == 0
    for name in ("baseline", "dropout", "l2_regularization", "batch_norm", "l2_optimized",
                 "lenet5v1_l2_optimized.pth"):
        assert name in result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("models")
    result = run_cli("train", "batch_norm", "--epochs", "1", "--train-subset", "3000", "--seed", "5",
                     "--out", out, "--data-dir", data_dir, "--device", "cpu", "--threads", "1")
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_train_prints_epochs_and_saves_original_names(trained):
    out, result = trained
    assert "epoch  1/1" in result.stdout and "test" in result.stdout
    weights = out / "lenet5_batchnorm_fashionmnist.pth"
    sidecar = strict_json(weights.with_suffix(".json"))
    assert sidecar["variant"] == "batch_norm" and sidecar["seed"] == 5
    assert len(sidecar["metrics"]) == 3 and set(sidecar["data_sha256"]) == {
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte"}
    state = torch.load(weights, weights_only=True)
    LeNet5V1(use_batch_norm=True).load_state_dict(state)  # loads in the original class


@pytest.mark.slow
def test_evaluate_reproduces_the_trained_test_accuracy(trained, data_dir):
    import json

    out, _ = trained
    sidecar = strict_json(out / "lenet5_batchnorm_fashionmnist.json")
    weights = out / "lenet5_batchnorm_fashionmnist.pth"
    evaluated = run_cli("evaluate", weights, "--json", "--data-dir", data_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout, parse_constant=lambda name: pytest.fail(f"not strict: {name}"))
    assert report["variant"] == "batch_norm"
    assert report["test_accuracy"] == pytest.approx(sidecar["test_accuracy"], abs=1e-9)
    assert len(report["per_class_accuracy"]) == 10 and "Ankle boot" in report["per_class_accuracy"]
    assert sum(map(sum, report["confusion_matrix"])) == 10_000
    text = run_cli("evaluate", weights, "--data-dir", data_dir)
    assert f"{sidecar['test_accuracy']:.4f}" in text.stdout and "Trouser" in text.stdout


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_evaluate_detects_every_flag_combination(tmp_path, data_dir, flags):
    import json

    path = tmp_path / "original.pth"
    torch.save(LeNet5V1(*flags).state_dict(), path)
    report = json.loads(run_cli("evaluate", path, "--json", "--data-dir", data_dir).stdout)
    assert (report["use_dropout"], report["use_batch_norm"]) == flags


def test_bad_inputs_get_one_line_and_exit_2(tmp_path, data_dir):
    assert_one_line_error(run_cli("evaluate", tmp_path / "nope.pth"), "nope.pth", "no such file")
    (tmp_path / "text.pth").write_text("not torch")
    assert_one_line_error(run_cli("evaluate", tmp_path / "text.pth"), "text.pth", "not a torch")
    torch.save({"a": torch.zeros(1)}, tmp_path / "other.pth")
    assert_one_line_error(run_cli("evaluate", tmp_path / "other.pth"), "not a LeNet5V1 state_dict")
    assert_one_line_error(run_cli("train", "resnet"), "unknown variant 'resnet'")
    assert_one_line_error(run_cli("train", "baseline", "--epochs", "0"), "--epochs")
    assert_one_line_error(run_cli("train", "baseline", "--lr", "abc"), "--lr")
    assert_one_line_error(run_cli("train", "baseline", "--seed", "-1"), "--seed")
    assert_one_line_error(run_cli("evaluate", tmp_path / "text.pth", "--device", "cuda:x"), "text.pth")
    assert_one_line_error(run_cli("train", "baseline", "--device", "tpu", "--data-dir", data_dir),
                          "--device tpu")
    assert_one_line_error(run_cli("train", "baseline", "--data-dir", tmp_path), str(tmp_path), "missing")
    assert_one_line_error(run_cli("study", "--variants", "baseline,nope"), "unknown variant 'nope'")
    assert_one_line_error(run_cli("report", tmp_path / "norun"), "norun")
    assert_one_line_error(run_cli("resume", tmp_path), "not a lenetlab run")
    assert_one_line_error(run_cli("resume", tmp_path / "norun"), "norun")
    assert_one_line_error(run_cli("frobnicate"), "invalid choice")


def test_mistakes_are_refused_before_any_work_or_folder(tmp_path, data_dir):
    in_the_way = tmp_path / "afile"
    in_the_way.write_text("x")
    result = run_cli("train", "baseline", "--epochs", "1", "--train-subset", "500", "--out",
                     in_the_way, "--data-dir", data_dir, "--quiet")
    assert_one_line_error(result, "afile", "a file is in the way")
    assert "epoch" not in result.stdout  # refused before training, not after
    assert_one_line_error(run_cli("study", "--out", in_the_way, "--data-dir", data_dir), "afile")
    assert_one_line_error(run_cli("study", "--variants", ","), "comma-separated list")
    assert_one_line_error(run_cli("study", "--name", "..", "--out", tmp_path), "--name")
    assert_one_line_error(run_cli("train", "baseline", "--train-subset", "100000", "--data-dir", data_dir),
                          "--train-subset", "54000")
    # A start that fails leaves no run folder that would block a retry.
    for mistake, fragment in [(["--data-dir", tmp_path / "nodata"], "nodata"),
                              (["--device", "tpu", "--data-dir", data_dir], "--device tpu"),
                              (["--train-subset", "60000", "--data-dir", data_dir], "--train-subset"),
                              (["--name", "a\nb", "--data-dir", data_dir], "--name"),
                              (["--name", "a/b", "--data-dir", data_dir], "--name")]:
        result = run_cli("study", "--out", tmp_path / "runs", "--name", "first", *mistake)
        assert_one_line_error(result, fragment)
        assert not (tmp_path / "runs").exists()
    spec = tmp_path / "one.toml"
    spec.write_text("seeds = 1\n[grid]\nlr = [0.001]\n")
    assert_one_line_error(run_cli("sweep", spec, "--seeds", "2", "--epochs", "1"), "one.toml",
                          "--seeds", "--epochs")


def test_weights_that_are_not_a_state_dict_say_what_they_are(tmp_path, data_dir):
    assert_one_line_error(run_cli("evaluate", tmp_path), "a folder")
    torch.save(LeNet5V1(), tmp_path / "whole.pth")  # the whole module, pickled
    assert_one_line_error(run_cli("evaluate", tmp_path / "whole.pth"), "whole.pth",
                          "save model.state_dict() instead")
    result = run_cli("evaluate", data_dir / "t10k-labels-idx1-ubyte.gz")
    assert_one_line_error(result, "not a torch weights file")
    assert "\x1b" not in result.stderr


# ----------------------------------------------------------------------------- issue 14


@pytest.mark.parametrize(("args", "option"), [
    (["study", "--seeds", "1000000000"], "--seeds"),  # was: building a 40 GB list of seeds
    (["study", "--epochs-scale", "1e308"], "--epochs-scale"),  # was: OverflowError
    (["study", "--epochs-scale", "nan"], "--epochs-scale"),
    (["study", "--epochs-scale", "0"], "--epochs-scale"),
    (["study", "--threads", "1000000000"], "--threads"),  # was: libgomp out of memory in every trial
    (["study", "--split-seed", "100000000000000000000000"], "--split-seed"),  # stored: resume never ran
    (["study", "--workers", "100000"], "--workers"),
    (["sweep", "--lr", "1e309"], "--lr"),
    (["sweep", "--seeds", "1000000000", "--lr", "0.1"], "--seeds"),
    (["train", "baseline", "--seed", "100000000000000000000000"], "--seed"),  # was: ValueError
    (["train", "baseline", "--split-seed", "100000000000000000000000"], "--split-seed"),
    (["train", "baseline", "--threads", "1000000000"], "--threads"),
    (["train", "baseline", "--batch-size", "100000"], "--batch-size"),
    (["train", "baseline", "--lr", "inf"], "--lr"),
])
def test_values_out_of_range_are_one_line_before_any_folder(tmp_path, args, option):
    """Issue 14, item 3: every option has a range, checked before a run folder exists."""
    where = ["--quiet"] if args[0] == "train" else ["--name", "x"]
    line = assert_one_line_error(run_cli(*args, "--out", tmp_path / "out", *where), f"argument {option}:")
    assert "expected" in line
    assert not (tmp_path / "out").exists()


def test_version_and_a_bare_command():
    """Issue 14, item 7: --version, and usage on a bare `lenetlab`."""
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"lenetlab {__version__}"
    result = run_cli()
    assert result.returncode == 2 and result.stderr.startswith("usage: lenetlab")
    for command in ("train", "evaluate", "study", "sweep", "resume", "report"):
        assert command in result.stderr


def test_resume_refuses_options_that_would_change_the_plan(tmp_path):
    """Issue 14, item 7: `--out` (or --seeds) beside resume is refused, not ignored."""
    for extra in (["--out", "x"], ["--seeds", "2"], ["--variants", "baseline"]):
        assert_one_line_error(run_cli("resume", tmp_path, *extra), "unrecognized arguments", extra[0])


def _options(command: str) -> list[argparse.Action]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return [a for a in sub.choices[command]._actions if a.option_strings and a.dest != "help"]


@pytest.mark.parametrize("command", ["train", "study", "sweep", "resume"])
def test_every_option_says_what_it_takes(command):
    """Issue 14, item 7: every flag has help; every number its range; sweep lists their format."""
    for action in _options(command):
        assert action.help, action.option_strings
        kind = getattr(action.type, "__name__", "")
        if kind in ("int", "float"):
            assert " to " in action.help or ">" in action.help, (action.option_strings, action.help)
        if command == "sweep" and kind.startswith("comma-separated"):
            assert "comma-separated" in action.help, action.option_strings


def test_a_list_of_variants_may_have_spaces():
    """Issue 14, item 7: "baseline, dropout" is two variants, as a user types it."""
    args = cli.build_parser().parse_args(["study", "--variants", "baseline, dropout"])
    assert args.variants == ["baseline", "dropout"]


def test_training_that_diverges_is_an_error_not_a_model(tmp_path, data_dir):
    """Issue 14, item 5: a NaN model is never saved; the message says where it diverged."""
    result = run_cli("train", "baseline", "--lr", "1e308", "--epochs", "1", "--train-subset", "500",
                     "--threads", "1", "--out", tmp_path, "--data-dir", data_dir, "--quiet")
    assert_one_line_error(result, "diverged at epoch 1, step", "no weights saved")
    assert not list(tmp_path.iterdir())


def test_evaluate_refuses_weights_with_non_finite_values(tmp_path):
    """Issue 14, item 5: was per-class 1.0000, and NaN in --json."""
    state = LeNet5V1().state_dict()
    state["classifier.5.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    for extra in ([], ["--json"]):
        result = run_cli("evaluate", tmp_path / "nan.pth", *extra)
        assert_one_line_error(result, "nan.pth", "non-finite", "classifier.5.weight")
        assert result.stdout == ""


# ----------------------------------------------------------------------------- issue 11


@pytest.mark.parametrize(("args", "fragment"), [
    (["--activation", "sigmoid"], "--activation"),
    (["--pool", "min"], "--pool"),
    (["--translate", "-1"], "--translate"),
    (["--translate", "28"], "--translate"),  # larger than the image
    (["--erasing", "1.5"], "--erasing"),
    (["--label-smoothing", "1"], "--label-smoothing"),
    (["--schedule", "step"], "--schedule"),
    (["--flip", "maybe"], "--flip"),
    (["--checkpoint", "best_test"], "--checkpoint"),
    (["--warmup-epochs", "12"], "warm-up"),  # baseline trains 12 epochs: as long as the run
])
def test_bad_recipe_fields_are_one_line_in_flags(tmp_path, args, fragment):
    line = assert_one_line_error(run_cli("train", "baseline", *args, "--out", tmp_path / "out", "--quiet"),
                                 fragment)
    assert not (tmp_path / "out").exists(), line
    assert_one_line_error(run_cli("sweep", *args, "--out", tmp_path / "out"), fragment)


@pytest.mark.parametrize(("toml", "fragment"), [
    ('activation = "sigmoid"', "activation: invalid value 'sigmoid'"),
    ('pool = "min"', "pool: invalid value"),
    ("translate = -1", "translate: invalid value -1"),
    ("translate = 28", "translate: invalid value 28"),
    ("erasing = 1.5", "erasing: invalid value 1.5"),
    ('schedule = "step"', "schedule: invalid value 'step'"),
    ('flip = "yes"', "flip: expected bool"),
    ('variant = "tuned"\nepochs = 5\nwarmup_epochs = 5\n[grid]\nlr = [0.001]', "warm-up (5 epochs)"),
    ('[[configs]]\nvariant = "tuned"\nname = "a/b"', "configs[0].name"),
    ('reference = "nothing"\n[[configs]]\nvariant = "tuned"', "reference: 'nothing' is none of"),
])
def test_bad_recipe_fields_are_one_line_in_sweep_specs(tmp_path, toml, fragment):
    spec = tmp_path / "spec.toml"
    spec.write_text(toml + "\n")
    assert_one_line_error(run_cli("sweep", spec, "--out", tmp_path / "out"), "spec.toml", fragment)
    assert not (tmp_path / "out").exists()


def test_study_runs_the_published_five_unless_tuned_is_asked_for(tmp_path):
    from lenetlab.recipes import PUBLISHED_RECIPES, RECIPES

    five = ["baseline", "dropout", "l2_regularization", "batch_norm", "l2_optimized"]
    assert list(PUBLISHED_RECIPES) == five
    assert list(RECIPES) == [*PUBLISHED_RECIPES, "tuned", "distilled"]
    assert_one_line_error(run_cli("study", "--variants", "tuned,nothing", "--out", tmp_path), "'nothing'")
    listing = run_cli("variants").stdout
    assert "tuned" in listing and "activation relu" in listing


@pytest.fixture(scope="module")
def trained_tuned(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("tuned")
    result = run_cli("train", "tuned", "--epochs", "2", "--warmup-epochs", "1", "--train-subset", "3000",
                     "--pool", "max", "--out", out, "--data-dir", data_dir, "--device", "cpu",
                     "--threads", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    return out / "lenet5_tuned_fashionmnist.pth"


@pytest.mark.slow
def test_a_relu_max_model_evaluates_to_its_recorded_accuracy_through_its_sidecar(trained_tuned, data_dir):
    import json

    from lenetlab.data import load_fashion_mnist, normalise
    from lenetlab.evaluation import evaluate
    from lenetlab.model import load_weights

    sidecar = strict_json(trained_tuned.with_suffix(".json"))
    assert sidecar["architecture"] == {"use_dropout": False, "use_batch_norm": True, "activation": "relu",
                                       "pool": "max"}
    assert sidecar["test_accuracy_flip_averaged"] is not None and sidecar["kept_epoch"] == 2
    report = json.loads(run_cli("evaluate", trained_tuned, "--json", "--data-dir", data_dir).stdout)
    assert (report["activation"], report["pool"]) == ("relu", "max")
    assert report["architecture_source"] == "architecture from lenet5_tuned_fashionmnist.json"
    assert report["test_accuracy"] == sidecar["test_accuracy"]
    model = load_weights(trained_tuned)
    data = load_fashion_mnist(data_dir)
    assert evaluate(model, normalise(data.test_images), data.test_labels).accuracy == sidecar["test_accuracy"]
    text = run_cli("evaluate", trained_tuned, "--data-dir", data_dir).stdout
    assert "activation='relu', pool='max'" in text and "from lenet5_tuned_fashionmnist.json" in text

    # without its sidecar the same weights load as the original's tanh/avg network, and say so
    alone = trained_tuned.parent / "alone" / trained_tuned.name
    alone.parent.mkdir()
    alone.write_bytes(trained_tuned.read_bytes())
    report = json.loads(run_cli("evaluate", alone, "--json", "--data-dir", data_dir).stdout)
    assert (report["activation"], report["pool"]) == ("tanh", "avg")
    assert report["architecture_source"].startswith("no sidecar")
    assert report["test_accuracy"] != sidecar["test_accuracy"]


def test_a_sidecar_that_does_not_fit_is_one_line(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(LeNet5V1(use_batch_norm=True).state_dict(), weights)
    for text, fragment in (("{not json", "not a lenetlab sidecar"),
                           ('{"architecture": {"activation": "gelu"}}', "unknown activation 'gelu'"),
                           ('{"architecture": {"pool": ["max"]}}', "or pool ['max']"),
                           ('{"architecture": {"use_batch_norm": false}}', "use_batch_norm=False, but")):
        weights.with_suffix(".json").write_text(text)
        assert_one_line_error(run_cli("evaluate", weights), "w.json", fragment)


@pytest.mark.slow
def test_a_relu_max_model_exports_as_relu_max(trained_tuned, data_dir, tmp_path):
    onnx = pytest.importorskip("onnx", reason="needs the onnx extra: pip install 'lenetlab[onnx]'")
    pytest.importorskip("onnxruntime", reason="needs the onnx extra")
    result = run_cli("export", trained_tuned, "--onnx", tmp_path / "tuned.onnx", "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    assert "exported batch_norm+relu+max" in result.stdout and "predicted class differs on 0" in result.stdout
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "tuned.onnx")).metadata_props}
    assert meta["architecture"].endswith("activation='relu', pool='max')")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`lenetlab variants | head -1`: the reader leaves early; no error line, no traceback."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "lenetlab", "variants"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before lenetlab writes a line: its first write meets a closed pipe
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and err == "", err


def test_the_command_starts_without_the_report_libraries():
    # scipy.stats and matplotlib cost 2.2 s of every process's start; only a finished run needs them
    code = ("import sys, lenetlab.cli, lenetlab.trials; "
            "print(' '.join(m for m in ('scipy', 'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_a_native_study_imports_no_torch_dynamo_in_any_of_its_processes(tmp_path, data_dir):
    # Making a torch optimiser imported torch._dynamo (1.4 s of a 4.1 s small `lenetlab train`),
    # in the command, the forkserver and every worker; the native step needs none of it.
    # -X importtime is passed on to the forkserver, and its forked workers print through it.
    from lenetlab import native

    if native.load() is None:
        pytest.skip(f"the native step cannot be built here: {native.unavailable_reason()}")
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "lenetlab", "study", "--variants", "baseline,dropout",
         "--seeds", "1", "--epochs-scale", "0.09", "--train-subset", "1000", "--kernels", "native",
         "--out", str(tmp_path), "--name", "s", "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 trial(s) done, 0 failed" in result.stdout, result.stdout
    imports = result.stderr.splitlines()
    assert sum(line.endswith(" lenetlab.trials") for line in imports) >= 2  # the command's, the forkserver's
    assert not [line for line in imports if "torch._dynamo" in line]


def test_importing_lenetlab_leaves_the_optimisers_compile_wrappers_alone():
    # Only lenetlab's own processes skip torch._dynamo: a user's torch.compile must still skip
    # tracing into an optimiser's add_param_group, state_dict, load_state_dict and zero_grad.
    code = ("import sys, torch, lenetlab, lenetlab.api, lenetlab.training as t; "
            "p = torch.zeros(2, requires_grad=True); torch.optim.Adam([p]).zero_grad(); "
            "m = [getattr(vars(torch.optim.Optimizer)[n], '__wrapped__') for n in t._DYNAMO_WRAPPED]; "
            "print(any(getattr(f, '__dynamo_disable', None) is f for f in m), "
            "'torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]  # the wrappers ran as torch wrote them


def test_a_study_command_leaves_no_forkserver_holding_its_output(tmp_path, data_dir):
    # The local pool's forkserver inherits the command's stdout and stderr. Stopped the usual
    # way, it frees torch's modules for a second or more after the command has exited, and a
    # pipe reading the command stays open that long: the command kills and reaps it first.
    process = subprocess.Popen(
        [sys.executable, "-m", "lenetlab", "study", "--variants", "baseline", "--seeds", "1",
         "--epochs-scale", "0.09", "--train-subset", "1000", "--out", str(tmp_path), "--name", "s",
         "--data-dir", str(data_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    servers: list[int] = []
    while process.poll() is None and not servers:
        servers = [pid for pid in children(process.pid)
                   if b"forkserver" in _cmdline(pid)]
        time.sleep(0.02)
    assert process.wait(timeout=300) == 0
    assert servers, "the study started no forkserver"
    assert_gone(servers, timeout=0.2)
    output = _read_to_end(process.stdout.fileno(), within=0.5)  # the resource tracker's exit: ms
    assert b"1 trial(s) done, 0 failed" in output, output
    assert (tmp_path / "s" / "report.html").is_file()


def _read_to_end(fd: int, within: float) -> bytes:
    """What is left in the pipe fd, asserting that its last writer closes it within `within` s."""
    deadline, data = time.monotonic() + within, b""
    while True:
        left = deadline - time.monotonic()
        assert left > 0 and select.select([fd], [], [], left)[0], "the output pipe is still held open"
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data
        data += chunk


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_the_command_exits_fast_yet_a_profiler_still_writes_its_results(tmp_path):
    # run() skips the interpreter's teardown; under a profiler it must exit as usual, or the
    # profile (written after the program returns) is lost. Output through a pipe stays whole.
    plain = subprocess.run([sys.executable, "-m", "lenetlab", "variants"], capture_output=True, text=True)
    assert plain.returncode == 0 and plain.stdout.endswith("as the original did.\n"), plain
    assert all(name in plain.stdout for name in cli.RECIPES)
    profile = tmp_path / "variants.prof"
    profiled = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "lenetlab",
                               "variants"], capture_output=True, text=True)
    assert profiled.returncode == 0 and profiled.stdout == plain.stdout
    assert profile.stat().st_size > 0
    refused = subprocess.run([sys.executable, "-m", "lenetlab", "study", "--seeds", "0"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
