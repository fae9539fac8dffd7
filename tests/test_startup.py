"""What each entry point loads, each in a fresh interpreter: the command answers --help, variants
and runs without torch, numpy or Optuna; `import lenetlab` loads none of torch, numpy, PIL or the
forkserver until a name needs them; and a local-pool trial loads neither the user's script nor
the parts of lenetlab a trial never uses, so a plain script with no __main__ guard runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "numpy", "PIL", "optuna")


def loaded_after(code: str, *, cwd: Path | None = None, env: dict | None = None) -> set[str]:
    """The modules a fresh interpreter holds after running code (its last line of stdout)."""
    script = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def command_loads(*args: str, cwd: Path | None = None) -> set[str]:
    """The modules `lenetlab ARGS` loads: cli.main in a fresh interpreter, its output discarded."""
    code = textwrap.dedent(f"""
        import contextlib, io
        from lenetlab.cli import main
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                code = main({list(args)!r})
            except SystemExit as exit:
                code = exit.code
        assert code in (0, None), code
    """)
    return loaded_after(code, cwd=cwd)


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["variants"]] + [
    [command, "--help"] for command in ("train", "evaluate", "predict", "export", "study", "sweep", "tune",
                                        "resume", "runs", "report", "log-mlflow")])
def test_the_command_answers_without_torch_or_numpy(args):
    assert heavy(command_loads(*args)) == []


def test_runs_lists_run_folders_without_torch_or_numpy(tmp_path, uninterrupted):
    """A real finished run folder (conftest's uninterrupted study), listed from its parent."""
    loaded = command_loads("runs", str(uninterrupted.parent), cwd=tmp_path)
    assert heavy(loaded) == []
    assert "lenetlab.runs" in loaded


def test_import_lenetlab_loads_no_torch_numpy_pil_or_forkserver():
    loaded = loaded_after("import lenetlab")
    assert heavy(loaded) == []
    assert "multiprocessing.forkserver" not in loaded
    assert not {"lenetlab.api", "lenetlab.engines", "lenetlab.native"} & loaded


def test_public_names_load_when_used():
    loaded = loaded_after(textwrap.dedent("""
        import lenetlab
        from lenetlab import LeNet5V1
        model = LeNet5V1(use_batch_norm=True)
        assert sum(p.numel() for p in model.parameters()) == 61_750
        for name in lenetlab.__all__:
            assert getattr(lenetlab, name) is not None, name
        assert set(lenetlab.__all__) <= set(dir(lenetlab))
        assert lenetlab.training.train_trial is not None  # a submodule, by attribute
        try:
            lenetlab.no_such_name
        except AttributeError:
            pass
        else:
            raise AssertionError("lenetlab.no_such_name did not raise AttributeError")
    """))
    assert "torch" in loaded and "lenetlab.api" in loaded


# An audit hook in every process of the study: each module a process loads (the "import" event
# fires when a module is found and loaded, not for one already in sys.modules), by pid.
SITECUSTOMIZE = """
import os, sys

def _record(event, args):
    if event == "import":
        with open(os.environ["LENETLAB_TEST_IMPORTS"], "a") as log:
            log.write(f"{os.getpid()} {args[0]}\\n")

sys.addaudithook(_record)
"""

NEVER_IN_A_TRIAL = ("lenetlab.api", "lenetlab.prediction", "lenetlab.conversion", "lenetlab.results", "PIL")

PLAIN_SCRIPT = """
import lenetlab
run = lenetlab.study(variants=["baseline", "batch_norm"], seeds=2, epochs_scale=0.1)
print(run.table())
"""


def run_script(tmp_path: Path, text: str, data_dir: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Run text as study.py (python study.py, no __main__ guard) with the audit hook; the modules
    each process loaded, by pid."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = tmp_path / "imports.log"
    script = tmp_path / "study.py"
    script.write_text("import os\nprint('pid', os.getpid(), __name__, flush=True)\n" + text)
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "LENETLAB_TEST_IMPORTS": str(log),
           "LENETLAB_DATA": str(data_dir)}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    loaded: dict[int, set[str]] = {}
    for line in log.read_text().splitlines():
        pid, name = line.split(" ", 1)
        loaded.setdefault(int(pid), set()).add(name)
    return done, loaded


def check_trial_processes(done: subprocess.CompletedProcess, loaded: dict) -> None:
    assert done.returncode == 0, done.stderr[-3000:]
    starts = [line for line in done.stdout.splitlines() if line.startswith("pid ")]
    assert len(starts) == 1 and starts[0].endswith(" __main__"), starts  # the script ran once
    main_pid = int(starts[0].split()[1])
    others = {pid: names for pid, names in loaded.items() if pid != main_pid}
    trial_processes = [names for names in others.values() if "lenetlab.training" in names]
    assert trial_processes, "no process but the script's loaded lenetlab.training"
    for names in others.values():
        assert "__mp_main__" not in names
        assert sorted(n for n in names if n.split(".")[0] == "PIL" or n in NEVER_IN_A_TRIAL) == []


def test_a_trial_process_loads_only_what_a_trial_needs(tmp_path, data_dir):
    text = PLAIN_SCRIPT.replace('["baseline", "batch_norm"], seeds=2',
                                '["baseline"], seeds=2, train_subset=1000, quiet=True')
    done, loaded = run_script(tmp_path, text, data_dir)
    check_trial_processes(done, loaded)
    assert len(list((tmp_path / "runs").glob("*/trials/*.json"))) == 2


@pytest.mark.slow
def test_the_plain_script_runs_as_written(tmp_path, data_dir):
    """The issue's script, word for word: two variants x two seeds, each trial done."""
    done, loaded = run_script(tmp_path, PLAIN_SCRIPT, data_dir)
    check_trial_processes(done, loaded)
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert [c["name"] for c in summary["configs"]] == ["baseline", "batch_norm"]
    assert all(c["completed_seeds"] == [0, 1] and not c["failed"] for c in summary["configs"])
    assert "batch_norm" in done.stdout and "baseline" in done.stdout  # the printed table
