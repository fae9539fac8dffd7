"""`lenetlab tune`: a search with real Optuna on a subset of the real data, on the pool and on Ray;
pruning; SIGKILL and resume; the test set unread until the confirmation; bad specs; the extra
missing; the Python API, `runs`, `report`, `log-mlflow` and open_run on a search's folder."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import numpy as np
import pytest
from conftest import assert_one_line_error, run_cli, write_idx
from support.searches import SMALL, SUBSET, make_search, to_toml

pytestmark = pytest.mark.slow


def journal_trials(run: Path) -> list:
    """The search's trials as Optuna holds them."""
    import optuna

    from lenetlab.tuning.study import STUDY_NAME, storage

    return optuna.load_study(study_name=STUDY_NAME, storage=storage(run)).get_trials(deepcopy=False)


def trial_records(run: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((run / "trials").glob("trial*.json"))}


HOSTILE = "<img src=x onerror=alert(1)> & [x](y)"  # a run name is text on every page


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir) -> Path:
    """A search whose name holds markup, on the pool, two workers."""
    return make_search(tmp_path_factory.mktemp("tune"), HOSTILE, data_dir, workers=2)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("text, fragments", [
    ("[search]\nlearning_rate = [0.1, 0.2]\n", ["search.learning_rate", "not a recipe field"]),
    ("[search]\nlr = { low = 0.1, high = 0.01 }\n", ["search.lr", "above high"]),
    ("[search]\nweight_decay = { low = 0.0, high = 0.1, log = true }\n", ["search.weight_decay", "above 0"]),
    ("[search]\nactivation = [\"tanh\", \"sigmoid\"]\n", ["search.activation", "'sigmoid'"]),
    ("trials = 0\n[search]\nlr = [0.001, 0.01]\n", ["trials", "1 to 10,000"]),
    ("budget = 3\n[search]\nlr = [0.001, 0.01]\n", ["budget", "neither a setting"]),
    ("epochs = 5\n[search]\nwarmup_epochs = { low = 0, high = 8 }\n", ["warmup_epochs", "shorter"]),
    ("pruner = \"asha\"\n[search]\nlr = [0.001]\n", ["pruner", "'asha'"]),
    ("[search]\n", ["search", "at least one field"]),
    ("min_epochs = 13\n[search]\nlr = [0.001]\n", ["min_epochs", "most epochs (12)"]),
], ids=["unknown field", "low above high", "log reaching 0", "choice outside", "budget 0", "unknown key",
        "warm-up past the epochs", "unknown pruner", "nothing to search", "pruning after the last epoch"])
def test_a_bad_spec_gets_one_line_naming_the_key(tmp_path, text, fragments):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    assert_one_line_error(run_cli("tune", spec, "--out", tmp_path), str(spec), *fragments)
    assert not any(tmp_path.glob("tune-*"))


def test_the_docs_spec_and_the_example_are_valid_specs():
    from lenetlab.tunespec import load_tune_spec, parse

    repo = Path(__file__).resolve().parents[1]
    shown = (repo / "docs" / "tune.md").read_text().split("```toml")[1].split("```")[0]
    assert set(parse(tomllib.loads(shown)).space) == {"lr", "batch_size", "epochs"}
    assert set(load_tune_spec(repo / "examples" / "tune.toml").space) == {"lr", "weight_decay", "batch_size",
                                                                          "epochs"}
    distilling = load_tune_spec(repo / "examples" / "distill-search.toml")
    assert distilling.base.teacher == "tuned" and set(distilling.space) == {
        "distill", "distill_temp", "epochs", "label_smoothing"}


@pytest.mark.parametrize("flag, value", [("--trials", "0"), ("--timeout", "0"), ("--timeout", "-5")])
def test_a_bad_budget_flag_gets_one_line(tmp_path, flag, value):
    spec = tmp_path / "s.toml"
    spec.write_text(to_toml(SMALL))
    assert_one_line_error(run_cli("tune", spec, flag, value), flag)


def test_without_optuna_one_line_names_the_extra(tmp_path, finished):
    spec = tmp_path / "s.toml"
    spec.write_text(to_toml(SMALL))
    blocked = ("import sys; sys.modules['optuna'] = None; from lenetlab.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
    for args in (["tune", str(spec)], ["resume", str(finished)]):
        result = subprocess.run([sys.executable, "-c", blocked, *args], capture_output=True, text=True)
        assert_one_line_error(result, "pip install 'lenetlab[tune]'")


# ----------------------------------------------------------------------------- a search on the pool


def test_a_search_prunes_chooses_on_validation_and_confirms_on_test(finished):
    from lenetlab.sweeps import load_spec
    from lenetlab.tunerecords import read_tune_plan, read_tune_summary

    plan, summary = read_tune_plan(finished), read_tune_summary(finished)
    trials = journal_trials(finished)
    assert [t.number for t in trials] == list(range(SMALL["trials"]))
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and states.count("PRUNED") >= 1, states
    assert [row.state for row in summary.trials] == [s.lower().replace("fail", "failed") for s in states]
    # every search trial was judged on validation alone: no test rows, no test result
    for name, record in trial_records(finished).items():
        assert {row["split"] for row in record["history"]} == {"train", "val"}, name
        assert record["test"] is None
    for trial in trials:  # each epoch's validation accuracy was told, in order, up to where it stopped
        assert sorted(trial.intermediate_values) == list(range(1, len(trial.intermediate_values) + 1))
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert all(len(t.intermediate_values) < SMALL["epochs"] for t in pruned)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(complete, key=lambda t: (t.value, -t.number))
    assert summary.best == best.number
    # best.toml: the winner beside the published variant, as the sweep that confirmed them
    sweep = load_spec(finished / "best.toml")
    assert dict(sweep.configs)["best"] == plan.spec.recipe(best.params)
    assert sweep.seeds == [0, 1] and sweep.reference == "baseline"
    from lenetlab import open_run

    run = open_run(finished)
    table = run.table()
    assert list(table.index) == ["best", "baseline"] and table[("test", "mean")].notna().all()
    comparisons = run.comparisons()
    assert comparisons.loc["best", "paired_seeds"] == 2
    frame = run.trials()
    assert len(frame) == SMALL["trials"] and (frame["state"] == "pruned").sum() == states.count("PRUNED")
    assert frame.loc[best.number, "val_accuracy"] == pytest.approx(best.value)
    assert run.best_params == best.params
    assert run.model().training is False


def test_runs_and_report_read_a_search(finished):
    result = run_cli("runs", finished.parent)
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(finished.name))
    assert "tune" in line and "pruned" in line and "best val" in line and "finished" in line
    before = (finished / "report.md").read_text()
    result = run_cli("report", finished)
    assert result.returncode == 0, result.stderr
    assert (finished / "report.md").read_text() == before
    for section in ("## Confirmation on the test set", "## The search", "## Importance of each field",
                    "best trials", "## Every trial"):
        assert section in before


def test_the_name_is_text_in_the_search_report(finished):
    from test_untrusted_names import assert_no_markup_from_names

    page = (finished / "report.html").read_text()
    assert_no_markup_from_names(page)
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; [x](y)" in page


def test_log_mlflow_logs_a_search_once(tmp_path, finished):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for _ in range(2):  # logging again adds nothing
        result = run_cli("log-mlflow", finished, "--mlflow", uri)
        assert result.returncode == 0, result.stderr
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(finished.name).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == SMALL["trials"]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    states = sorted(r.data.tags["state"] for r in children)
    pruned = [r for r in children if r.data.tags["state"] == "pruned"]
    assert pruned and all(r.info.status == "KILLED" for r in pruned), states
    assert parents[0].data.metrics["trials_pruned"] == len(pruned)


def test_the_timeout_counts_the_search_across_resumes(tmp_path, data_dir):
    """A search whose timeout its earlier sessions have spent: resumed with budget left, it asks
    no new trial (the time spent is in run.json) and finishes."""
    from dataclasses import replace

    from lenetlab.tunerecords import read_tune_plan, write_tune_plan

    run = make_search(tmp_path, "timed", data_dir, spec={**SMALL, "trials": 2}, workers=1)
    plan = read_tune_plan(run)
    assert plan.elapsed_s > 0
    plan.spec = replace(plan.spec, trials=50, timeout=plan.elapsed_s)  # as if started with these
    write_tune_plan(run, plan)
    result = run_cli("resume", run, "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(journal_trials(run)) == 2


# ----------------------------------------------------------------------------- the test set


def test_the_test_files_are_not_read_before_the_confirmation(tmp_path, data_dir):
    """t10k files that are not IDX files at all: the search runs to its end, the confirmation
    stops with one line naming the file; with good files, resume confirms without a new trial."""
    bad = tmp_path / "data"
    bad.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (bad / name).symlink_to(data_dir / name)
    write_idx(bad / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), magic=7)
    write_idx(bad / "t10k-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), magic=7)
    spec = tmp_path / "s.toml"
    spec.write_text(to_toml({**SMALL, "trials": 3}))
    result = run_cli("tune", spec, "--data-dir", bad, "--train-subset", SUBSET, "--out", tmp_path,
                     "--name", "s", "--quiet")
    assert_one_line_error(result, "t10k-images")
    run = tmp_path / "s"
    assert [t.state.name for t in journal_trials(run)].count("RUNNING") == 0
    assert len(journal_trials(run)) == 3 and not (run / "confirm" / "summary.json").exists()
    records = trial_records(run)
    result = run_cli("resume", run, "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert len(journal_trials(run)) == 3 and trial_records(run) == records
    assert (run / "confirm" / "summary.json").is_file() and (run / "tune.json").is_file()


# ----------------------------------------------------------------------------- kill -9 and resume

ONE_WORKER = ["--workers", "1", "--threads", "1", "--train-subset", "3000", "--quiet"]


def test_sigkill_mid_search_then_resume_gives_the_uninterrupted_search(tmp_path, data_dir):
    """One worker: killed in the middle of a trial after two have ended, resumed (logging to MLflow
    live), the search asks, prunes and keeps exactly what an uninterrupted one does."""
    spec = tmp_path / "s.toml"
    spec.write_text(to_toml({**SMALL, "trials": 5}))
    whole = run_cli("tune", spec, *ONE_WORKER, "--data-dir", data_dir, "--out", tmp_path, "--name", "whole")
    assert whole.returncode == 0, whole.stderr
    cmd = [sys.executable, "-m", "lenetlab", "tune", str(spec), *ONE_WORKER, "--data-dir", str(data_dir),
           "--out", str(tmp_path), "--name", "killed"]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    run = tmp_path / "killed"
    deadline = time.time() + 120
    while not (len(list((run / "trials").glob("*.json"))) >= 2 and any((run / "checkpoints").glob("*.pt"))):
        assert process.poll() is None and time.time() < deadline, "the search ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = trial_records(run)
    assert [t.state.name for t in journal_trials(run)].count("RUNNING") == 1
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("resume", run, "--quiet", "--mlflow", uri, "--data-dir", data_dir)
    assert result.returncode == 0, result.stderr
    resumed, uninterrupted = journal_trials(run), journal_trials(tmp_path / "whole")
    assert [t.number for t in resumed] == list(range(5))
    assert [(t.state.name, t.params, t.value, t.intermediate_values) for t in resumed] == \
        [(t.state.name, t.params, t.value, t.intermediate_values) for t in uninterrupted]
    assert {name: record for name, record in trial_records(run).items() if name in kept} == kept
    assert not any((run / "checkpoints").glob("*.pt"))
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert len(runs) == 6 and all(r.info.status != "RUNNING" for r in runs)


def test_ctrl_c_stops_a_search_cleanly_and_says_how_to_resume(tmp_path, data_dir):
    spec = tmp_path / "s.toml"
    spec.write_text(to_toml({**SMALL, "trials": 4}))
    cmd = [sys.executable, "-m", "lenetlab", "tune", str(spec), *ONE_WORKER, "--data-dir", str(data_dir),
           "--out", str(tmp_path), "--name", "stopped"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run = tmp_path / "stopped"
    deadline = time.time() + 120
    while not any((run / "trials").glob("*.json")):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert f"lenetlab resume {run}" in err and "Traceback" not in err
    result = run_cli("resume", run, "--data-dir", data_dir, "--quiet")
    assert result.returncode == 0, result.stderr
    assert [t.state.name for t in journal_trials(run)].count("RUNNING") == 0 and len(journal_trials(run)) == 4


def test_a_journal_cut_short_by_a_kill_is_repaired(tmp_path, finished):
    from lenetlab.tunerecords import read_tune_plan
    from lenetlab.tuning.study import JOURNAL, open_study, repair

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    journal = run / JOURNAL
    whole = journal.read_bytes()
    journal.write_bytes(whole + b'{"op_code": 5, "worker_id": "x", "tri')  # a write cut short
    (run / f"{JOURNAL}.lock").write_text("")  # the lock a killed writer left
    repair(run)
    assert journal.read_bytes() == whole and not (run / f"{JOURNAL}.lock").exists()
    assert len(open_study(run, read_tune_plan(run).spec).trials) == SMALL["trials"]


def test_a_journal_from_someone_else_is_refused_with_one_line(tmp_path, finished):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    journal = run / "search.journal"
    text = journal.read_text()
    forged = re.sub(r'("params":\{"lr":)[0-9.e-]+', r"\g<1>5.0", text, count=1)
    assert forged != text  # a learning rate of 5, outside the spec's range
    journal.write_text(forged)
    (run / "tune.json").unlink()  # so resume reads the journal again
    assert_one_line_error(run_cli("resume", run), "search.journal", "trial 0", "lr")


# ----------------------------------------------------------------------------- Ray


@pytest.mark.ray
def test_a_search_on_a_local_ray_instance(tmp_path, data_dir):
    pytest.importorskip("ray")
    run = make_search(tmp_path, "ray", data_dir, spec={**SMALL, "trials": 4}, engine="ray", workers=2)
    trials = journal_trials(run)
    assert len(trials) == 4 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(t.intermediate_values for t in trials)  # every task's epochs reached the study
    assert (run / "confirm" / "summary.json").is_file() and (run / "report.html").is_file()


def test_the_overhead_benchmark_runs_and_accounts_for_every_trial(data_dir):
    """benchmarks/tune_overhead.py on a tiny search: its lines, its trials; no timing is asserted."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "tune_overhead.py"
    result = subprocess.run([sys.executable, str(script), "--trials", "3", "--epochs", "1", "--train-subset",
                             "500", "--data-dir", str(data_dir)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "search: 3 trials" in result.stdout
    assert "overhead per trial beyond its epochs:" in result.stdout and "cores busy:" in result.stdout


def test_a_pruning_answer_is_the_same_after_a_kill_between_its_lines(tmp_path):
    """Killed after the pruner marked the trial's rung but before lenetlab noted its answer: the
    resumed trial, telling that epoch again, gets the first answer (Optuna itself, asked again,
    would say go on, its rung being marked)."""
    import optuna

    from lenetlab.records import Trial
    from lenetlab.tunespec import parse
    from lenetlab.tuning.referee import JUDGING, PRUNED_AT, Referee
    from lenetlab.tuning.study import distributions, open_study

    spec = parse({**SMALL, "trials": 5})
    study = open_study(tmp_path, spec)
    space = distributions(spec)
    referee = Referee(str(tmp_path), spec)
    for number, accuracy in enumerate([0.80, 0.81, 0.82]):  # each the best so far: none pruned
        asked = study.ask(space)
        assert referee.for_trial(Trial(f"trial{number}", spec.recipe(asked.params), 0))(1, accuracy) is False
        study.tell(number, accuracy)
    slow = study.ask(space)
    # The referee's lines up to the pruner's own, as a worker killed there left them.
    study._storage.set_trial_intermediate_value(slow._trial_id, 1, 0.5)
    study._storage.set_trial_system_attr(slow._trial_id, JUDGING, {"epoch": 1, "marks": 0})
    assert optuna.trial.Trial(study, slow._trial_id).should_prune() is True
    assert optuna.trial.Trial(study, slow._trial_id).should_prune() is False  # Optuna, asked again
    resumed = Referee(str(tmp_path), spec).for_trial(Trial("trial3", spec.recipe(slow.params), 0))
    assert resumed(1, 0.5) is True
    assert study._storage.get_trial(slow._trial_id).system_attrs[PRUNED_AT] == 1
    assert resumed(1, 0.5) is True  # and noted: the same answer without asking again
