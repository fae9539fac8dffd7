"""Sweep specs (checked key by key, sizes capped), and the same sweep on the local pool and on Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
from conftest import (
    RESUME_ARGS,
    assert_one_line_error,
    children,
    lenetlab,
    metrics_text,
    run_cli,
    strict_json,
    wait_for,
)

from lenetlab.errors import SpecError
from lenetlab.rundir import MAX_TRIALS
from lenetlab.sweeps import expand, load_spec


def test_grid_times_configs_with_readable_names():
    sweep = expand({
        "name": "wd", "seeds": [3, 7], "variant": "baseline",
        "grid": {"weight_decay": [1e-4, 1e-3], "lr": [0.001, 0.01]},
        "configs": [{"variant": "dropout", "dropout_rate": 0.3}],
    })
    assert sweep.name == "wd" and sweep.seeds == [3, 7] and sweep.reference is None
    configs = sweep.configs
    names = [n for n, _ in configs]
    assert names == ["baseline-wd0.0001-lr0.001", "baseline-wd0.0001-lr0.01",
                     "baseline-wd0.001-lr0.001", "baseline-wd0.001-lr0.01", "dropout-p0.3"]
    recipes = dict(configs)
    assert recipes["baseline-wd0.001-lr0.01"].weight_decay == 0.001
    assert recipes["baseline-wd0.001-lr0.01"].lr == 0.01
    assert recipes["dropout-p0.3"].use_dropout and recipes["dropout-p0.3"].dropout_rate == 0.3
    assert recipes["dropout-p0.3"].epochs == 12  # the rest comes from the published recipe


@pytest.mark.parametrize("spec, key", [
    ({"grid": {"momentum": [0.9]}}, "grid.momentum: unknown field"),
    ({"grid": {"weight_decay": ["a lot"]}}, "weight_decay: expected float"),
    ({"grid": {"epochs": [1.5]}}, "epochs: expected int"),
    ({"grid": {"weight_decay": []}}, "grid.weight_decay: empty"),
    ({"seeds": 2}, "grid: empty"),
    ({"grid": {"variant": ["resnet"]}}, "variant: invalid value 'resnet'"),
    ({"grid": {"optimizer": ["rmsprop"]}}, "optimizer: invalid value"),
    ({"grid": {"dropout_rate": [1.5]}, "variant": "dropout"}, "dropout_rate: invalid value"),
    ({"grid": {"dropout_rate": [0.3]}}, "dropout_rate: variant 'baseline' has no dropout"),
    ({"seeds": 0, "grid": {"lr": [0.1]}}, "seeds: expected 1 to 1000 seeds, got 0"),
    ({"seeds": [1, 1], "grid": {"lr": [0.1]}}, "seeds: repeated seed"),
    ({"seeds": [2**32], "grid": {"lr": [0.1]}}, "seeds: expected"),
    ({"seeds": "three", "grid": {"lr": [0.1]}}, "seeds: expected"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"configs": [{"lr": "fast"}]}, "configs[0].lr: expected float"),
    ({"seeds": [0, -1], "grid": {"lr": [0.1]}}, "seeds: expected"),
    ({"grid": {"lr": [float("inf")]}}, "grid.lr: invalid value inf"),
    ({"name": "..", "grid": {"lr": [0.1]}}, "name: expected a folder name"),
    ({"name": "a\nb", "grid": {"lr": [0.1]}}, "name: expected a folder name"),
])
def test_malformed_specs_name_the_key(spec, key):
    with pytest.raises(SpecError) as err:
        expand(spec)
    assert key in str(err.value)


def test_string_fields_appear_in_names_without_quotes():
    configs = expand({"seeds": 1, "grid": {"optimizer": ["sgd"], "lr": [0.5]}}).configs
    assert [name for name, _ in configs] == ["baseline-lr0.5-optsgd"]


def test_the_same_recipe_reached_twice_runs_once():
    configs = expand({"configs": [{"lr": 0.01, "weight_decay": 0.1},
                                  {"weight_decay": 0.1, "lr": 0.01}]}).configs
    assert [name for name, _ in configs] == ["baseline-wd0.1-lr0.01"]


def test_spec_file_errors_name_the_file_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nweight_decay = [0.1, 'x']\n")
    with pytest.raises(SpecError, match="bad.toml"):
        load_spec(bad)
    assert_one_line_error(run_cli("sweep", bad), "bad.toml", "weight_decay")
    bad.write_text("this is = = not toml")
    assert_one_line_error(run_cli("sweep", bad), "bad.toml", "not valid TOML")
    assert_one_line_error(run_cli("sweep", tmp_path / "none.toml"), "none.toml", "no such file")
    assert_one_line_error(run_cli("sweep", "--weight-decay", "0.1,abc"), "--weight-decay")


def test_a_huge_grid_is_refused_at_once_naming_the_cap(tmp_path):
    """Issue 14, item 4: a 100 x 100 x 100 grid (was a 428 MB run.json, then training)."""
    spec = tmp_path / "huge.toml"
    spec.write_text("[grid]\n"
                    f"lr = {[round(0.0001 * (i + 1), 6) for i in range(100)]}\n"
                    f"weight_decay = {[round(0.001 * i, 6) for i in range(100)]}\n"
                    f"batch_size = {list(range(1, 101))}\n")
    started = time.perf_counter()
    result = run_cli("sweep", spec, "--out", tmp_path / "runs")
    assert time.perf_counter() - started < 3
    assert_one_line_error(result, "huge.toml", "3,000,000 trials", f"cap of {MAX_TRIALS:,}",
                          "--max-trials 3000000")
    assert not (tmp_path / "runs").exists()
    # The cap is a flag, for studies as for sweeps.
    assert_one_line_error(run_cli("sweep", "--lr", "0.1,0.2", "--seeds", "2", "--max-trials", "3",
                                  "--out", tmp_path / "runs"), "4 trials", "cap of 3")
    assert_one_line_error(run_cli("study", "--seeds", "1000", "--out", tmp_path / "runs"),
                          "5,000 trials", "--max-trials 5000")
    assert expand({"seeds": 2, "grid": {"lr": [0.1, 0.2]}}, max_trials=4).configs


def test_engine_ray_without_ray_says_how_to_install(monkeypatch, tmp_path):
    from lenetlab import engines

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(SpecError, match=r"pip install 'lenetlab\[ray\]'"):
        engines.check_engine("ray")
    assert_one_line_error(run_cli("study", "--engine", "ray", "--out", tmp_path), "pip install")
    assert not list(tmp_path.iterdir())


# Ray turns on token authentication by itself once a token file exists in ~/.ray (an
# earlier local `ray.init` writes one); the test's Ray instance and its client run without it.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


@pytest.mark.ray
@pytest.mark.slow
def test_ray_gives_the_numbers_and_files_of_the_local_pool(tmp_path, data_dir, uninterrupted):
    """The same study on a Ray instance (started by lenetlab, as without --address; two tasks at
    a time) and on the local pool gives the same numbers and the same files."""
    pytest.importorskip("ray")
    on_ray = lenetlab("study", *RESUME_ARGS, "--workers", "2", "--engine", "ray", "--out", tmp_path,
                      "--name", "ray", "--data-dir", data_dir, env=RAY_ENV)
    assert on_ray.returncode == 0, on_ray.stderr
    a, b = uninterrupted, tmp_path / "ray"
    assert metrics_text(a) == metrics_text(b)
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    sa, sb = strict_json(a / "summary.json"), strict_json(b / "summary.json")
    for key in ("configs", "comparisons", "best"):
        assert sa[key] == sb[key], key
    assert sb["config"]["engine"] == "ray"
    assert run_cli("report", b).returncode == 0  # the Ray run's files check out against its summary


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        found += kids
        todo += kids
    return found


@pytest.mark.ray
@pytest.mark.slow
def test_ray_reruns_a_trial_whose_worker_died_from_its_checkpoint(tmp_path, data_dir):
    """Issue 24, item 2: a Ray worker process killed mid-trial is retried by Ray, not recorded as
    failed; the retry resumes from the checkpoint in the run folder (a local instance reaches
    it), and the trial is recorded once, with the numbers of the local pool's run."""
    pytest.importorskip("ray")
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "retry"\nseeds = 1\n[[configs]]\nvariant = "baseline"\nepochs = 10\n')
    args = [spec, "--train-subset", "1000", "--threads", "1", "--workers", "1", "--quiet",
            "--data-dir", data_dir]
    run = tmp_path / "ray" / "retry"
    study = subprocess.Popen([sys.executable, "-m", "lenetlab", "sweep", *map(str, args), "--engine", "ray",
                              "--out", str(tmp_path / "ray")], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, **RAY_ENV})
    try:
        wait_for(run, "checkpoints/*.pt", study, timeout=180)
        trainers = [pid for pid in descendants(study.pid)
                    if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::_ray_trial")]
        assert len(trainers) == 1, trainers
        os.kill(trainers[0], signal.SIGKILL)
        out, err = study.communicate(timeout=300)
    finally:
        if study.poll() is None:
            study.kill()
            study.communicate()
    assert study.returncode == 0, out + err
    [record] = (run / "trials").iterdir()
    result = strict_json(record)
    assert result["status"] == "done"
    assert 1 <= 10 - len(result["epoch_threads"]) < 10  # the epochs before the kill were not trained again
    local = lenetlab("sweep", *args, "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    assert metrics_text(tmp_path / "local" / "retry") == metrics_text(run)


def test_ray_retries_are_range_checked(tmp_path):
    assert_one_line_error(run_cli("study", "--engine", "ray", "--ray-retries", "101", "--out", tmp_path),
                          "--ray-retries", "0 to 100")
    assert_one_line_error(run_cli("resume", tmp_path, "--ray-retries", "-1"), "--ray-retries")
    assert not list(tmp_path.iterdir())


def test_a_worker_reaches_the_run_folder_only_by_its_run_id(tmp_path):
    """Issue 24, item 1: a folder of the same name (another host's, another run's) is not the run
    folder; only the file holding this run's id says so."""
    from lenetlab import files
    from lenetlab.rundir import reaches, token_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert not reaches(run, "abc")  # the folder exists, but nothing says it is this run's
    files.write_text(token_path(run), "another-run")
    assert not reaches(run, "abc")
    files.write_text(token_path(run), "abc")
    assert reaches(run, "abc")
    assert not reaches(tmp_path / "elsewhere", "abc")


def test_the_checkpoint_sink_writes_into_the_run_folder_for_the_newest_attempt_only(tmp_path):
    """The sink (a plain class; Ray makes it an actor) keeps one trial's checkpoint for the tasks
    that do not reach the run folder; a lost host's attempt cannot overwrite its retry's."""
    from lenetlab.engines import CheckpointSink
    from lenetlab.recipes import RECIPES
    from lenetlab.records import Trial
    from lenetlab.rundir import checkpoint_path

    trial = Trial("baseline", RECIPES["baseline"], 0)
    sink = CheckpointSink(str(tmp_path))
    first, data = sink.load(trial)
    assert data is None
    assert sink.save(trial, first, b"epoch 1") is None
    assert checkpoint_path(tmp_path, trial).read_bytes() == b"epoch 1"
    retry, data = sink.load(trial)  # the retry after a lost host resumes from it
    assert data == b"epoch 1" and retry != first
    assert sink.save(trial, first, b"stale") == CheckpointSink.SUPERSEDED
    assert sink.save(trial, retry, b"epoch 2") is None
    assert checkpoint_path(tmp_path, trial).read_bytes() == b"epoch 2"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["baseline__seed0.pt"]  # no temp files
    blocked = CheckpointSink(str(tmp_path / "file"))
    (tmp_path / "file").write_text("")  # a file where the run folder should be: one line back
    generation, _ = blocked.load(trial)
    assert "cannot write" in blocked.save(trial, generation, b"x")


def test_a_named_configuration_never_vanishes_as_a_duplicate():
    spec = {"variant": "tuned", "configs": [{"name": "a"}, {"name": "b", "checkpoint": "last"}]}
    with pytest.raises(SpecError, match="'b' is the same recipe as 'a'"):
        expand(spec)


def test_the_shipped_ablation_takes_one_ingredient_at_a_time_out_of_tuned():
    from lenetlab.recipes import RECIPES

    sweep = load_spec(Path(__file__).resolve().parents[1] / "examples" / "ablation.toml")
    assert sweep.reference == "tuned" and sweep.seeds == [0, 1, 2]
    configs = dict(sweep.configs)
    assert configs["tuned"] == RECIPES["tuned"]
    for name, recipe in configs.items():
        changed = {k for k, v in asdict(recipe).items() if v != getattr(RECIPES["tuned"], k)}
        assert changed <= {"schedule", "warmup_epochs"} or len(changed) <= 1, (name, changed)
        assert name == "tuned" or changed, name
