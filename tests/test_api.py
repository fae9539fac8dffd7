"""The Python API (issue 22, items 1-3): the same run folders as the CLI for the same options, the
run object's views equal to summary.json, runs crossing between Python and the shell, and bad
keywords as typed errors naming the keyword. Real data, tiny runs (1,000 images, 1-2 epochs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import KERNELS, REPO, assert_one_line_error, metrics_text, run_cli, strict_json, wait_for
from matplotlib.figure import Figure
from PIL import Image

import lenetlab
from lenetlab.data import normalise
from lenetlab.errors import LenetlabError, OptionError, RunDirError, SpecError
from lenetlab.evaluation import evaluate

# One 1-epoch trial per variant (12 epochs x 0.09), one seed, one worker on one thread.
TINY = {"variants": ["baseline", "batch_norm"], "seeds": 1, "epochs_scale": 0.09, "train_subset": 1000,
        "threads": 1, "workers": 1, "kernels": KERNELS}
TINY_FLAGS = ["--variants", "baseline,batch_norm", "--seeds", "1", "--epochs-scale", "0.09",
              "--train-subset", "1000", "--threads", "1", "--workers", "1", "--kernels", KERNELS]


@pytest.fixture(scope="module")
def both(tmp_path_factory, data_dir):
    """The same tiny study, once from the shell and once from Python."""
    out = tmp_path_factory.mktemp("both")
    result = run_cli("study", *TINY_FLAGS, "--out", out, "--name", "cli", "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    run = lenetlab.study(**TINY, out=out, name="api", data_dir=data_dir, quiet=True)
    return out / "cli", run


@pytest.mark.slow
def test_the_api_and_the_cli_make_the_same_run_folder(both):
    cli_dir, run = both
    assert run.path == cli_dir.parent / "api"
    assert metrics_text(run.path) == metrics_text(cli_dir)  # byte for byte
    cli, api = strict_json(cli_dir / "summary.json"), strict_json(run.path / "summary.json")
    assert api["files_sha256"] == cli["files_sha256"]  # the same weights too
    assert api["configs"] == cli["configs"] and api["config"] == cli["config"]
    assert (run.path / "report.html").is_file() and (run.path / "trials" / "baseline__seed0.json").is_file()


@pytest.mark.slow
def test_a_cli_run_opened_in_python_shows_summary_json(both, dataset):
    cli_dir, _ = both
    run = lenetlab.open_run(cli_dir)
    summary = strict_json(cli_dir / "summary.json")
    table = run.table()
    assert list(table.index) == ["baseline", "batch_norm"]
    for config in summary["configs"]:
        for split in ("train", "val", "test"):
            final = config["final"][split]
            assert table.loc[config["name"], (split, "mean")] == final["mean"]
            assert [table.loc[config["name"], (split, "ci95_low")],
                    table.loc[config["name"], (split, "ci95_high")]] == final["ci95"]
            assert table.loc[config["name"], (split, "seed 0")] == final["values"]["0"]
    assert table.loc["baseline", ("published", "val")] == 0.892121  # the original's figure
    curves = run.curves()
    assert len(curves) == len(metrics_text(cli_dir).splitlines()) - 1 == 2 * 1 * 3
    assert list(run.comparisons().index) == ["batch_norm"]  # against baseline, the reference
    assert run.comparisons().loc["batch_norm", "mean_diff"] == summary["comparisons"][0]["mean_diff"]
    # the model is the trained one: it scores the recorded test accuracy
    model = run.model("batch_norm")
    tested = evaluate(model, normalise(dataset.test_images), dataset.test_labels)
    assert tested.accuracy == summary["configs"][1]["final"]["test"]["values"]["0"]
    figure = run.plot("overlay")
    assert isinstance(figure, Figure) and figure.axes[0].get_title().startswith("Test accuracy")
    assert run.plot("convergence", "baseline").axes[0].get_title().startswith("baseline")
    shown = run._repr_html_()
    # the table, and 5 plots: 2 configurations' curves, the overlay, the confusion matrix, per class
    assert "<table" in shown and shown.count("data:image/png;base64,") == 5


@pytest.mark.slow
def test_bad_questions_to_a_run_are_typed_errors(both, tmp_path, monkeypatch):
    run = lenetlab.open_run(both[0])
    with pytest.raises(SpecError, match="'dropout': no such configuration"):
        run.model("dropout")
    with pytest.raises(SpecError, match="seed 7: baseline has no trained model"):
        run.model("baseline", seed=7)
    with pytest.raises(SpecError, match="kind 'scatter'"):
        run.plot("scatter")
    with pytest.raises(RunDirError, match="not a lenetlab run folder"):
        lenetlab.open_run(tmp_path)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as without the notebook extra
    with pytest.raises(LenetlabError, match=r"pip install 'lenetlab\[notebook\]'"):
        run.table()
    assert "pip install" in run._repr_html_()  # the plots still show


@pytest.mark.parametrize(("call", "message"), [
    (lambda: lenetlab.study(epochs_scale=0), "epochs_scale: expected more than 0 to 50, got 0"),
    (lambda: lenetlab.study(seeds=0), "seeds: expected from 1 to 1000, got 0"),
    (lambda: lenetlab.study(seeds=True), "seeds: expected a whole number, got True"),
    (lambda: lenetlab.study(threads=10**9), "threads: expected from 1 to 256"),
    (lambda: lenetlab.study(train_subset=2.5), "train_subset: expected a whole number, got 2.5"),
    (lambda: lenetlab.study(kernels="fast"), "kernels: invalid choice 'fast' (choose from auto, native"),
    (lambda: lenetlab.study(device="tpu"), "device tpu: expected auto, cpu, cuda or cuda:N"),
    (lambda: lenetlab.study(device=torch.device("cpu")), "device: expected auto, cpu, cuda or cuda:N as a"),
    (lambda: lenetlab.study(variants=["baseline", "nope"]), "unknown variant 'nope'"),
    (lambda: lenetlab.study(seeds=1000), "raise it with max_trials 5000"),
    (lambda: lenetlab.sweep({"grid": {"lr": [0.1, 0.2]}}, workers=0), "workers: expected from 1 to 1024"),
    (lambda: lenetlab.sweep({"grid": {"lr": ["fast"]}}), "grid.lr: expected float"),
    (lambda: lenetlab.sweep(3), "spec: expected a TOML file's path or a dict"),
    (lambda: lenetlab.train("baseline", weight_decay="x"), "weight_decay: expected float, got str 'x'"),
    (lambda: lenetlab.train("baseline", weight_decy=0.1), "weight_decy: neither an option of train"),
    (lambda: lenetlab.train("baseline", dropout_rate=0.3), "dropout_rate: variant 'baseline' has no dropout"),
    (lambda: lenetlab.train("baseline", seed=-1), "seed: expected from 0 to 4.29497e+09, got -1"),
    (lambda: lenetlab.predict(lenetlab.LeNet5V1(), np.zeros((2, 2, 2, 2))), "images[0]: expected a path"),
    (lambda: lenetlab.predict(lenetlab.LeNet5V1(), [], invert="maybe"), "invert: invalid choice 'maybe'"),
])
def test_bad_keywords_are_typed_errors_naming_the_keyword(tmp_path, monkeypatch, call, message):
    monkeypatch.chdir(tmp_path)  # a run folder would land here: none may
    with pytest.raises(LenetlabError) as raised:
        call()
    assert message in str(raised.value)
    assert "--" not in str(raised.value).split(":")[0]  # the keyword, not the flag
    assert not list(tmp_path.iterdir())


def test_the_cli_names_the_flag_where_python_names_the_keyword(tmp_path):
    assert_one_line_error(run_cli("train", "baseline", "--dropout-rate", "0.3", "--out", tmp_path),
                          "--dropout-rate: variant 'baseline' has no dropout layer")
    assert_one_line_error(run_cli("study", "--seeds", "1000", "--out", tmp_path), "--max-trials 5000")
    with pytest.raises(OptionError) as raised:
        lenetlab.train("baseline", dropout_rate=0.3)
    assert raised.value.key == "dropout_rate" and raised.value.on_command_line().startswith("--dropout-rate")


@pytest.mark.slow
def test_train_returns_the_kept_model_and_saves_what_the_cli_saves(tmp_path, data_dir, dataset):
    options = {"epochs": 1, "train_subset": 1000, "threads": 1, "kernels": KERNELS}
    trained = lenetlab.train("batch_norm", **options, out=tmp_path / "api", data_dir=data_dir, quiet=True)
    assert isinstance(trained.model, lenetlab.LeNet5V1) and not trained.model.training
    assert [(row.epoch, row.split) for row in trained.history] == [(1, "train"), (1, "val"), (1, "test")]
    tested = evaluate(trained.model, normalise(dataset.test_images), dataset.test_labels)
    assert tested.accuracy == trained.test.accuracy == trained.final("test")
    result = run_cli("train", "batch_norm", "--epochs", "1", "--train-subset", "1000", "--threads", "1",
                     "--kernels", KERNELS, "--out", tmp_path / "cli", "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    name = "lenet5_batchnorm_fashionmnist"
    api_sidecar = json.loads((tmp_path / "api" / f"{name}.json").read_text())
    cli_sidecar = json.loads((tmp_path / "cli" / f"{name}.json").read_text())
    assert api_sidecar["metrics"] == cli_sidecar["metrics"]
    assert api_sidecar["test_accuracy"] == cli_sidecar["test_accuracy"] == tested.accuracy
    saved = torch.load(tmp_path / "api" / f"{name}.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in trained.model.state_dict().items())
    # predict takes what train returned, a model or the weights' path, and paths, PIL images or arrays
    picture = dataset.test_images[0].numpy()
    path = tmp_path / "shoe.png"
    Image.fromarray(picture).save(path)
    found = lenetlab.predict(trained, [path, Image.open(path), picture, picture / 255.0])
    # the same pixels; the probabilities within float rounding, as oneDNN's AVX-512 kernels round
    # a batch's rows by their place in it (the fourth differed by 1e-10 on a Zen 5 host)
    assert all(np.array_equal(p.pixels, found[0].pixels) for p in found)
    assert all(p.probabilities == pytest.approx(found[0].probabilities, rel=1e-6) for p in found)
    # one image alone (a batch of one rounds its sums otherwise than a batch of four)
    alone = lenetlab.predict(trained, path)[0].probabilities
    assert lenetlab.predict(tmp_path / "api" / f"{name}.pth", path)[0].probabilities == alone
    shown = run_cli("predict", tmp_path / "api" / f"{name}.pth", path, "--json")
    assert json.loads(shown.stdout)["probabilities"] == {
        name: round(p, 6) for name, p in zip(lenetlab.CLASS_NAMES, alone)}


API_STUDY = """
import sys
import lenetlab
try:
    lenetlab.study(["baseline", "batch_norm"], seeds=1, epochs_scale=0.17, train_subset=2000, threads=1,
                   workers=1, out=sys.argv[1], name="from-python", data_dir=sys.argv[2], quiet=True)
except lenetlab.Stopped as stopped:
    sys.exit(stopped.status)
"""


@pytest.mark.slow
def test_a_python_run_stopped_by_ctrl_c_resumes_from_the_shell(tmp_path, data_dir, uninterrupted):
    """The same options as conftest's RESUME_ARGS: the resumed run equals the uninterrupted CLI run."""
    script = [sys.executable, "-c", textwrap.dedent(API_STUDY), str(tmp_path), str(data_dir)]
    process = subprocess.Popen(script, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = tmp_path / "from-python"
    wait_for(run, "checkpoints/*.pt", process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"resume with: lenetlab resume {run}" in stderr
    assert not (run / "summary.json").exists()
    with pytest.raises(RunDirError, match="has not finished"):
        lenetlab.open_run(run)
    assert run_cli("resume", run, "--data-dir", data_dir, "--quiet").returncode == 0
    assert metrics_text(run) == metrics_text(uninterrupted)
    assert lenetlab.open_run(run).summary.done_count == 2


def test_importing_lenetlab_leaves_pandas_out_and_the_plot_backend_alone():
    """pandas is the notebook extra's, imported for a table; a notebook's own matplotlib backend stays."""
    check = "import sys, lenetlab, matplotlib; print('pandas' in sys.modules, matplotlib.get_backend())"
    shown = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO,
                           env={**os.environ, "MPLBACKEND": "svg"}, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["False", "svg"]
