"""Sweep specs (checked key by key), and the same sweep on the local pool and on a Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, lenetlab

from lenetlab.errors import SpecError
from lenetlab.sweep import expand, load_spec


def test_grid_times_configs_with_readable_names():
    name, seeds, configs = expand({
        "name": "wd", "seeds": [3, 7], "variant": "baseline",
        "grid": {"weight_decay": [1e-4, 1e-3], "lr": [0.001, 0.01]},
        "configs": [{"variant": "dropout", "dropout_rate": 0.3}],
    })
    assert name == "wd" and seeds == [3, 7]
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
    ({"seeds": 0, "grid": {"lr": [0.1]}}, "seeds: must be at least 1"),
    ({"seeds": "three", "grid": {"lr": [0.1]}}, "seeds: expected"),
    ({"colour": "red"}, "colour: unknown key"),
    ({"configs": [{"lr": "fast"}]}, "configs[0].lr: expected float"),
    ({"seeds": [0, -1], "grid": {"lr": [0.1]}}, "seeds: expected"),
    ({"grid": {"lr": [float("inf")]}}, "grid.lr: invalid value inf"),
    ({"name": "..", "grid": {"lr": [0.1]}}, "name: expected a folder name"),
])
def test_malformed_specs_name_the_key(spec, key):
    with pytest.raises(SpecError) as err:
        expand(spec)
    assert key in str(err.value)


def test_string_fields_appear_in_names_without_quotes():
    _, _, configs = expand({"seeds": 1, "grid": {"optimizer": ["sgd"], "lr": [0.5]}})
    assert [name for name, _ in configs] == ["baseline-lr0.5-optsgd"]


def test_the_same_recipe_reached_twice_runs_once():
    _, _, configs = expand({"configs": [{"lr": 0.01, "weight_decay": 0.1},
                                        {"weight_decay": 0.1, "lr": 0.01}]})
    assert [name for name, _ in configs] == ["baseline-wd0.1-lr0.01"]


def test_spec_file_errors_name_the_file_and_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nweight_decay = [0.1, 'x']\n")
    with pytest.raises(SpecError, match="bad.toml"):
        load_spec(bad)
    assert_one_line_error(lenetlab("sweep", bad), "bad.toml", "weight_decay")
    bad.write_text("this is = = not toml")
    assert_one_line_error(lenetlab("sweep", bad), "bad.toml", "not valid TOML")
    assert_one_line_error(lenetlab("sweep", tmp_path / "none.toml"), "none.toml", "no such file")
    assert_one_line_error(lenetlab("sweep", "--weight-decay", "0.1,abc"), "--weight-decay")


def test_engine_ray_without_ray_says_how_to_install(monkeypatch, tmp_path, data_dir):
    from lenetlab import engines

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(SpecError, match=r"pip install 'lenetlab\[ray\]'"):
        engines.run_ray([], tmp_path, {"threads": 1}, None, 1, None, print, print)


SPEC = """
name = "{name}"
seeds = 2
variant = "baseline"
epochs = 1
[grid]
weight_decay = [0.0, 0.01]
[[configs]]
variant = "dropout"
dropout_rate = 0.25
epochs = 1
"""
QUICK = ["--threads", "1", "--train-subset", "2000", "--quiet"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Ray turns on token authentication by itself once a token file exists in ~/.ray (an
# earlier local `ray.init` writes one); the test cluster and its client run without it.
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs, started and stopped by the tests."""
    pytest.importorskip("ray")
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    port = _free_port()
    started = subprocess.run([ray_cli, "start", "--head", "--num-cpus", "2", "--port", str(port),
                              "--include-dashboard=false", "--disable-usage-stats"],
                             capture_output=True, text=True, timeout=180,
                             env={**os.environ, **RAY_ENV})
    assert started.returncode == 0, started.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


@pytest.mark.ray
def test_sweep_on_ray_matches_the_local_pool(tmp_path, data_dir, ray_cluster):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(name="same"))
    local = lenetlab("sweep", spec, "--out", tmp_path / "local", "--data-dir", data_dir, *QUICK)
    assert local.returncode == 0, local.stderr
    on_ray = lenetlab("sweep", spec, "--engine", "ray", "--address", ray_cluster,
                      "--out", tmp_path / "ray", "--data-dir", data_dir, *QUICK, env=RAY_ENV)
    assert on_ray.returncode == 0, on_ray.stderr
    a, b = tmp_path / "local" / "same", tmp_path / "ray" / "same"
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    assert sorted(p.relative_to(a) for p in a.rglob("*")) == sorted(p.relative_to(b) for p in b.rglob("*"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert [c["final"] for c in sa["configs"]] == [c["final"] for c in sb["configs"]]
    assert [c["name"] for c in sa["configs"]] == ["baseline-wd0.0-ep1", "baseline-wd0.01-ep1",
                                                  "dropout-p0.25-ep1"]
    report = (b / "report.md").read_text()
    table = report[report.index("| Configuration"):]
    means = [c["final"]["test"]["mean"] for c in sa["configs"]]
    order = [sa["configs"][i]["name"] for i in sorted(range(3), key=lambda i: -means[i])]
    assert [table.index(f"| {n} |") for n in order] == sorted(table.index(f"| {n} |") for n in order)
