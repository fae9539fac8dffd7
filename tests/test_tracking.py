"""--mlflow and `lenetlab log-mlflow` against real MLflow (issue 13): SQLite stores in tmp folders,
read back with MlflowClient, and a real `mlflow server` read through its REST API. No mocks.

Each test gets a copy of one empty store (creating an SQLite store runs MLflow's migrations,
about ten seconds), and runs in its own working directory: MLflow puts artifacts under ./mlruns.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import fields
from pathlib import Path

import pytest
from conftest import wait_for

mlflow = pytest.importorskip("mlflow")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")  # MLflow's, not lenetlab's
from mlflow import MlflowClient  # noqa: E402

from lenetlab import cli  # noqa: E402
from lenetlab.recipes import Recipe  # noqa: E402
from lenetlab.records import TrialResult  # noqa: E402
from lenetlab.rundir import read_plan  # noqa: E402
from lenetlab.runner import read_results  # noqa: E402

QUICK = ["--epochs-scale", "0.1", "--train-subset", "2000", "--threads", "1", "--quiet", "--kernels", "torch"]
MEASURES = [f"{split}_{measure}" for split in ("train", "val", "test") for measure in ("loss", "accuracy")]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(*args) -> int:
    """lenetlab.cli.main in this process (capsys captures its output)."""
    try:
        return cli.main([str(a) for a in args])
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


def new_store(empty_store: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def live_store(empty_store, tmp_path_factory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("live")
    return folder, new_store(empty_store, folder)


@pytest.fixture(scope="module")
def server(live_store):
    """`mlflow server` on the live store, started first so that it boots while the study trains."""
    folder, uri = live_store
    port = free_port()
    log = open(folder / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    yield f"http://127.0.0.1:{port}", process, folder / "server.log"
    os.killpg(process.pid, signal.SIGTERM)  # the server and its uvicorn worker
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


@pytest.fixture(scope="module")
def live(server, live_store, data_dir) -> tuple[Path, str]:
    """A study of 2 configurations x 2 seeds logged live into the live store."""
    folder, uri = live_store
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        code = main("study", "--variants", "baseline,dropout", "--seeds", "2", *QUICK,
                    "--out", folder / "runs", "--name", "live", "--data-dir", data_dir, "--mlflow", uri)
    assert code == 0
    return folder / "runs" / "live", uri


def runs_of(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no experiment {experiment!r} in {uri}"
    return client.search_runs([found.experiment_id], max_results=1000)


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    listed = []
    for entry in client.list_artifacts(run_id, path):
        listed += artifacts(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return sorted(listed)


def snapshot(uri: str, experiment: str) -> dict:
    """Everything logged, by run name: status, params, tags (the parent by name), metric histories
    (step, value) and artifact paths; MLflow's own tags and timestamps left out."""
    client = MlflowClient(uri)
    runs = runs_of(uri, experiment)
    names = {run.info.run_id: run.info.run_name for run in runs}
    logged = {}
    for run in runs:
        tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
        tags["parent"] = names.get(run.data.tags.get("mlflow.parentRunId"))
        metrics = {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                   for key in run.data.metrics}
        logged[run.info.run_name] = (run.info.status, run.data.params, tags, metrics,
                                     artifacts(client, run.info.run_id))
    assert len(logged) == len(runs), "two runs of one name"
    return logged


def test_a_live_study_logs_a_parent_run_and_one_run_per_trial_equal_to_the_run_folder(live):
    run_dir, uri = live
    plan = read_plan(run_dir)
    logged = snapshot(uri, "live")
    trials = {t.key: t for t in plan.trials()}
    assert set(logged) == {"live", *trials}
    assert all(status == "FINISHED" for status, *_ in logged.values())

    status, params, tags, metrics, files = logged["live"]
    assert params == {"kind": "study", "configs": "baseline,dropout", "seeds": "0,1", "reference": "baseline",
                      "device": "cpu", "threads": "1", "split_seed": "0", "train_subset": "2000",
                      "kernels": "torch"}
    assert tags["lenetlab.run_id"] == plan.run_id and tags["run_dir"] == str(run_dir.resolve())
    assert tags["parent"] is None and tags["best"] in ("baseline", "dropout")
    assert metrics["trials_done"] == [(0, 4.0)] and metrics["trials_failed"] == [(0, 0.0)]
    assert {"summary.json", "metrics.csv", "report.md"} <= set(files)
    assert any(f.startswith("plots/") and f.endswith(".png") for f in files)

    for key, trial in trials.items():
        status, params, tags, metrics, files = logged[key]
        recipe = {f.name: str(getattr(trial.recipe, f.name)) for f in fields(Recipe) if f.name != "name"}
        assert params == {**recipe, "variant": trial.recipe.name, "config": trial.config,
                          "seed": str(trial.seed)}
        assert tags["config"] == trial.config and tags["variant"] == trial.recipe.name
        assert tags["seed"] == str(trial.seed) and tags["run_dir"] == str(run_dir.resolve())
        assert tags["lenetlab.run_id"] == plan.run_id and tags["lenetlab.trial"] == key
        assert tags["parent"] == "live"
        weights = Path(tags["weights"])
        assert files == [f"weights/{weights.stem}.json", f"weights/{weights.name}"]
        result = TrialResult.from_dict(json.loads((run_dir / "trials" / f"{key}.json").read_text()))
        assert metrics["final_test_accuracy"] == [(1, result.test.accuracy)]
        assert metrics["kept_epoch"] == [(1, 1.0)] and "final_test_accuracy_flip_averaged" not in metrics

    # every metric history is metrics.csv, row for row
    from_csv: dict = {}
    with open(run_dir / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            key = f"{row['config']}__seed{row['seed']}"
            for measure in ("loss", "accuracy"):
                rows = from_csv.setdefault((key, f"{row['split']}_{measure}"), [])
                rows.append((int(row["epoch"]), row[measure]))
    from_mlflow = {(key, measure): [(step, f"{value:.6f}") for step, value in logged[key][3][measure]]
                   for key in trials for measure in MEASURES}
    assert from_mlflow == {k: sorted(v) for k, v in from_csv.items()}


def test_log_mlflow_replays_a_finished_folder_as_live_logging_did_and_adds_nothing_twice(
        live, empty_store, tmp_path, monkeypatch, capsys):
    run_dir, live_uri = live
    monkeypatch.chdir(tmp_path)
    uri = new_store(empty_store, tmp_path)
    assert main("log-mlflow", run_dir, "--mlflow", uri) == 0
    out = capsys.readouterr().out
    assert "experiment 'live'" in out and f"mlflow ui --backend-store-uri {uri}" in out
    replayed = snapshot(uri, "live")
    assert replayed == snapshot(live_uri, "live")
    # again, here and into the live store: what is logged already is kept, nothing is added
    assert main("log-mlflow", run_dir, "--mlflow", uri) == 0
    assert main("log-mlflow", run_dir, "--mlflow", live_uri) == 0
    assert snapshot(uri, "live") == replayed and snapshot(live_uri, "live") == replayed


def test_a_trial_that_failed_and_then_succeeded_is_one_finished_run(live, empty_store, tmp_path, monkeypatch):
    """As the tracker logs it live: a failed result, a rerun started, its result."""
    from lenetlab.tracking import RunLog, log_run_dir

    run_dir, _ = live
    monkeypatch.chdir(tmp_path)
    uri = new_store(empty_store, tmp_path)
    plan = read_plan(run_dir)
    results = read_results(run_dir, plan)
    trial = plan.trials()[0]
    log = RunLog(uri, run_dir, plan)
    log.start_trial(trial)
    log.log_trial(TrialResult(trial, plan.run_id, "failed", error="worker died (killed by signal 9)"))
    failed = {r.info.run_name: r for r in runs_of(uri, "live")}[trial.key]
    assert failed.info.status == "FAILED" and failed.data.tags["error"].startswith("worker died")
    log.start_trial(trial)
    log.log_trial(results[trial.key])
    log_run_dir(uri, run_dir)  # the rest of the folder, and the summary
    runs = {r.info.run_name: r for r in runs_of(uri, "live")}
    assert len(runs) == 5 and runs[trial.key].info.run_id == failed.info.run_id
    assert runs[trial.key].info.status == "FINISHED" and "error" not in runs[trial.key].data.tags
    assert snapshot(uri, "live") == snapshot(live[1], "live")


def test_resume_after_kill_9_continues_the_same_runs(empty_store, tmp_path, data_dir, monkeypatch):
    uri = new_store(empty_store, tmp_path)
    # two 2-epoch trials, one at a time: killed when the first one's first epoch is saved
    args = ["--variants", "baseline,dropout", "--seeds", "1", *QUICK, "--epochs-scale", "0.17",
            "--workers", "1", "--data-dir", data_dir]
    process = subprocess.Popen([sys.executable, "-m", "lenetlab", "study", *map(str, args), "--out", "runs",
                                "--name", "killed", "--mlflow", uri], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "killed"
    wait_for(run, "checkpoints/*.pt", process)
    process.kill()
    process.communicate()
    before = {r.info.run_name: r for r in runs_of(uri, "killed")}
    assert {name: r.info.status for name, r in before.items()} == {"killed": "RUNNING",
                                                                  "baseline__seed0": "RUNNING"}

    monkeypatch.chdir(tmp_path)
    assert main("resume", run, "--quiet", "--data-dir", data_dir, "--mlflow", uri) == 0
    after = {r.info.run_name: r for r in runs_of(uri, "killed")}
    assert set(after) == {"killed", "baseline__seed0", "dropout__seed0"} and len(runs_of(uri, "killed")) == 3
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert all(after[name].info.run_id == before[name].info.run_id for name in before)
    epochs = MlflowClient(uri).get_metric_history(after["baseline__seed0"].info.run_id, "test_accuracy")
    assert sorted(m.step for m in epochs) == [1, 2]


def test_an_unreachable_server_loses_no_training_and_says_once_how_to_log_later(
        empty_store, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once, not after retries
    uri = f"http://127.0.0.1:{free_port()}"
    code = main("study", "--variants", "baseline", "--seeds", "1", *QUICK, "--out", "runs",
                "--name", "offline", "--data-dir", data_dir, "--mlflow", uri)
    out, err = capsys.readouterr()
    assert code == 0 and "1 trial(s) done, 0 failed" in out
    run = tmp_path / "runs" / "offline"
    for name in ("run.json", "summary.json", "metrics.csv", "report.md", "trials/baseline__seed0.json"):
        assert (run / name).is_file(), name
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"could not log to MLflow at {uri}" in lines[0] and "Connection refused" in lines[0]
    assert "the study's summary and 1 of 1 trial(s)" in lines[0]
    assert f"lenetlab log-mlflow runs/offline --mlflow {uri}" in lines[0]
    # ... and that command, given a store that works, logs it all
    store = new_store(empty_store, tmp_path / "store")
    assert main("log-mlflow", run, "--mlflow", store) == 0
    assert sorted(r.info.status for r in runs_of(store, "offline")) == ["FINISHED", "FINISHED"]


def test_the_kept_models_test_accuracy_is_logged_at_the_kept_epoch(empty_store, tmp_path):
    """best_val keeps an earlier epoch: its test accuracy, the epoch and the flip-averaged figure
    are logged at that epoch's step, the learning curves and the wall time run to the last."""
    from lenetlab import tracking
    from lenetlab.records import SPLITS, EpochMetrics

    client = MlflowClient(new_store(empty_store, tmp_path / "store"))
    run_id = client.create_run(tracking.experiment(client, "kept")).info.run_id
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"weights")
    weights.with_suffix(".json").write_text("{}")
    history = [EpochMetrics(epoch, split, 1.0 / epoch, 0.5 + epoch / 10)
               for epoch in (1, 2, 3) for split in SPLITS]
    tracking._log_training(client, run_id, weights, history, 0.61, 5.0, 2, 0.62)
    logged = {name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
              for name in ("final_test_accuracy", "kept_epoch", "final_test_accuracy_flip_averaged",
                           "wall_time_s", "test_accuracy")}
    assert logged["final_test_accuracy"] == [(2, 0.61)] and logged["kept_epoch"] == [(2, 2.0)]
    assert logged["final_test_accuracy_flip_averaged"] == [(2, 0.62)] and logged["wall_time_s"] == [(3, 5.0)]
    assert sorted(logged["test_accuracy"]) == [(epoch, 0.5 + epoch / 10) for epoch in (1, 2, 3)]


def test_train_logs_one_run_and_a_broken_store_costs_only_the_logging(
        empty_store, tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.db").write_bytes(b"this is not an SQLite database\n" * 100)
    broken = f"sqlite:///{tmp_path / 'broken.db'}"
    code = main("train", "baseline", "--epochs", "3", "--train-subset", "2000", "--threads", "1", "--quiet",
                "--kernels", "torch", "--data-dir", data_dir, "--out", "models", "--mlflow", broken,
                "--checkpoint", "best_val", "--flip", "true", "--lr", "0.02")
    out, err = capsys.readouterr()
    weights = Path("models/lenet5_baseline_fashionmnist.pth")
    assert code == 0 and weights.is_file() and "saved" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"could not log to MLflow at {broken}" in lines[0], err
    assert f"lenetlab log-mlflow {weights} --mlflow {broken}" in lines[0]

    uri = new_store(empty_store, tmp_path / "store")
    assert main("log-mlflow", weights, "--mlflow", uri) == 0
    assert main("log-mlflow", weights, "--mlflow", uri) == 0  # found again by its SHA-256
    assert "experiment 'lenetlab-train'" in capsys.readouterr().out
    [run] = runs_of(uri, "lenetlab-train")
    sidecar = json.loads(weights.with_suffix(".json").read_text())
    assert run.info.status == "FINISHED" and run.data.tags["variant"] == "baseline"
    assert run.data.params["seed"] == "0" and run.data.params["epochs"] == "3"
    assert run.data.params["train_subset"] == "2000"
    client = MlflowClient(uri)
    for measure in MEASURES:
        split, what = measure.split("_")
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, measure))
        assert history == [(row["epoch"], row[what]) for row in sidecar["metrics"] if row["split"] == split]
    kept = sidecar["kept_epoch"]  # best_val: the epoch with the best validation accuracy
    assert run.data.metrics["kept_epoch"] == kept and run.data.metrics["final_test_accuracy"] == sidecar[
        "test_accuracy"] and run.data.metrics["final_test_accuracy_flip_averaged"] == sidecar[
        "test_accuracy_flip_averaged"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "final_test_accuracy")] == [kept]
    assert artifacts(client, run.info.run_id) == ["weights/lenet5_baseline_fashionmnist.json",
                                                  "weights/lenet5_baseline_fashionmnist.pth"]


def test_the_missing_extra_and_bad_paths_are_one_line_errors(tmp_path, monkeypatch, capsys, live):
    monkeypatch.chdir(tmp_path)
    assert main("log-mlflow", tmp_path / "nothing", "--mlflow", "sqlite:///x.db") == 2
    assert main("log-mlflow", live[0] / "report.md", "--mlflow", "sqlite:///x.db") == 2
    assert main("log-mlflow", tmp_path, "--mlflow", "sqlite:///x.db") == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("lenetlab: error: ") for line in errors), errors
    assert "no such run folder or weights file" in errors[0]
    assert "expected a run folder or a .pth" in errors[1]
    assert "not a lenetlab run folder" in errors[2]
    # a spec after a bare --mlflow is not taken for a tracking URI
    assert main("sweep", "--mlflow", "spec.toml") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "argument --mlflow: expected a tracking URI" in line and "'spec.toml'" in line

    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    new_run = ["--kernels", "torch", "--out", tmp_path / "out"]
    for args in (["study", "--mlflow", *new_run],
                 ["train", "baseline", "--mlflow", "sqlite:///x.db", *new_run],
                 ["resume", live[0], "--mlflow"], ["log-mlflow", live[0]]):
        assert main(*args) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    install = "needs the mlflow extra: pip install 'lenetlab[mlflow]'"
    assert errors == [f"lenetlab: error: --mlflow {install}"] * 3 + [f"lenetlab: error: log-mlflow {install}"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.db").exists()


def test_the_runs_are_there_through_a_tracking_servers_rest_api(live, server):
    url, process, log = server
    deadline = time.time() + 120
    while True:
        assert process.poll() is None, log.read_text()[-2000:]
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    break
        assert time.time() < deadline, "mlflow server did not start in 120 s"
        time.sleep(0.25)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name=live") as r:
        experiment_id = json.load(r)["experiment"]["experiment_id"]
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [experiment_id]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request) as r:
        runs = json.load(r)["runs"]
    plan = read_plan(live[0])
    names = sorted(run["info"]["run_name"] for run in runs)
    assert names == sorted(["live", *(t.key for t in plan.trials())])
    assert {run["info"]["status"] for run in runs} == {"FINISHED"}
