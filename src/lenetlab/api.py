"""The Python API: the command line's verbs (study, sweep, tune, train, resume, predict) and open_run.

Their keywords are the CLI's options with underscores (epochs_scale, train_subset, data_dir,
out, name, ...), checked by the same rules (options.py); they write the same run folders, so
a run started here can be resumed, reported or logged from the shell, and the other way
round. The CLI's commands call these functions. Bad input raises lenetlab's typed errors
(errors.py), never SystemExit; a run stopped by Ctrl-C raises Stopped after saying how to
resume it.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import files, options, prediction, runner, sweeps
from .data import load_fashion_mnist, make_splits
from .engines import check_engine
from .errors import OptionError, OutputError, SpecError, Stopped
from .localpool import start_local_pool
from .model import LeNet5V1, load_weights
from .native.gate import announce
from .options import DEFAULT_RAY_RETRIES
from .progress import Progress
from .recipes import (
    FIELDS,
    PUBLISHED_RECIPES,
    RECIPES,
    architecture,
    describe_start,
    file_name,
    get_recipe,
    with_fields,
)
from .records import SPLITS, Summary, Trained, Trial
from .results import Run
from .rundir import MAX_TRIALS, check_size, new_run_dir, parse_seeds, read_plan
from .trials import execute_trial, save_weights
from .tunerecords import is_tune_run


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the workers are stopped and the resume line printed."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _echo(line: str) -> None:
    """Print a progress line now, also when stdout is a file or a pipe (a log, CI)."""
    print(line, flush=True)


class _Displays:
    """Several runner.Display observers told the same events in turn (the MLflow tracker, the progress)."""

    def __init__(self, *displays) -> None:
        self.displays = displays

    def begin(self, todo: int, finished: int) -> None:
        for display in self.displays:
            display.begin(todo, finished)

    def start(self, trial: Trial) -> None:
        for display in self.displays:
            display.start(trial)

    def done(self, result) -> None:
        for display in self.displays:
            display.done(result)

    def note(self, line: str) -> None:
        for display in self.displays:
            display.note(line)


def _tracking(mlflow: str | bool | None):
    """The tracking module and the URI ('' for the default) when logging to MLflow, its extra
    checked before any work; (None, None) when not."""
    if mlflow is None or mlflow is False:
        return None, None
    from . import tracking

    if mlflow is not True and not isinstance(mlflow, str):
        raise OptionError("mlflow", f"{{option}}: expected a tracking URI, True or None, got {mlflow!r}")
    tracking.require_extra()
    return tracking, "" if mlflow is True else mlflow


def _execute(run_dir: Path, go: Callable, quiet: bool, tracked: tuple, search: bool = False):
    """Run go(display, tracker) -> its summary with Ctrl-C and SIGTERM turned into a resume hint
    (Stopped); tracked: what _tracking gave. A study's or sweep's tracker is one of the displays;
    a search's (search=True) is its own, and go gets the confirmation's display alone. The
    finished run's Run (a search's TuneRun)."""
    echo = (lambda line: None) if quiet else _echo
    display = Progress(quiet, echo)
    tracking, uri = tracked
    tracker = None
    if tracking and search:
        from .tuning.tracking import TuneTracker

        tracker = TuneTracker(uri, run_dir, None if quiet else _echo)
    elif tracking:
        tracker = tracking.Tracker(uri, run_dir, None if quiet else _echo)
    in_main = threading.current_thread() is threading.main_thread()  # not in a thread of an app
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    resume_line = f"lenetlab resume {shlex.quote(str(run_dir))}" + (f" {tracker.option}" if tracker else "")
    stopped = "FAILED"
    try:
        if search:
            summary = go(display, tracker)
        else:
            summary = go(_Displays(tracker, display) if tracker else display, None)
        stopped = None
    except KeyboardInterrupt as exc:
        stopped = "KILLED"
        print(f"\n{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}: finished "
              f"trials and each running trial's last epoch are saved; resume with: {resume_line}",
              file=sys.stderr)
        raise Stopped(143 if isinstance(exc, _Terminated) else 130) from None
    except OutputError as exc:  # a full disk: the run can go on once there is room
        raise OutputError(f"{exc}; once fixed: {resume_line}") from None
    finally:
        display.close()
        if tracker and stopped:
            tracker.close(stopped)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    if search:
        from .tuning.results import TuneRun, say_done

        say_done(*summary, run_dir)
        return TuneRun(run_dir)
    _say_done(summary, run_dir, tracker, resume_line)
    return Run(run_dir)


def _say_done(summary: Summary, run_dir: Path, tracker, resume_line: str) -> None:
    print(f"{summary.kind} {run_dir}: {summary.done_count} trial(s) done, {summary.failed_count} failed; "
          f"report: {run_dir / 'report.html'} (and report.md)")
    best = summary.best_config
    if best:
        print(f"best: {best.name} test accuracy {best.final['test'].mean:.4f} "
              f"(mean of {best.final['test'].n} seed(s))")
    if tracker:
        tracker.finish()
    if summary.failed_count:
        print(f"rerun the failed trials with: {resume_line}")


def _start(kind: str, configs, seeds: list[int], reference: str | None, *, out, name, data_dir, device,
           kernels: str | None, threads, split_seed, train_subset, engine, address, workers, ray_retries,
           max_trials, mlflow, quiet) -> Run:
    """Check every option, load the data, then create the run folder and run it."""
    check_size(len(configs) * len(seeds), options.check("max_trials", max_trials))
    run = options.run_options(device, threads, split_seed, train_subset, kernels)
    workers, ray_retries = options.check("workers", workers), options.check("ray_retries", ray_retries)
    engine = options.check("engine", engine)
    if engine != "ray":
        start_local_pool()  # its imports overlap the checks and the data loading below
    announce(run.kernels, run.device, configs)
    check_engine(engine)
    tracked = _tracking(mlflow)
    data = load_fashion_mnist(data_dir, quiet=quiet)  # before a run folder exists
    run_dir = new_run_dir(out, name, kind)
    plan = runner.new_plan(kind, run_dir.name, configs, seeds, run, engine, workers, reference)
    return _execute(run_dir, lambda display, _: runner.start(run_dir, plan, data, address, display,
                                                             ray_retries), quiet, tracked)


def _variants(variants: list[str] | str | None) -> list[str]:
    """The variants of a study, each once, in the given order; 'all' is every recipe."""
    if isinstance(variants, str):
        variants = [variants]
    if variants is not None and (not isinstance(variants, (list, tuple)) or not variants
                                 or not all(isinstance(v, str) for v in variants)):
        raise OptionError("variants", f"{{option}}: expected a list of variant names, got {variants!r}")
    variants = list(variants or PUBLISHED_RECIPES)
    variants = [name for v in variants for name in (RECIPES if v == "all" else [v])]
    return list(dict.fromkeys(variants))


def study(variants: list[str] | str | None = None, *, seeds: int | list[int] = options.DEFAULT_SEEDS,
          epochs_scale: float = 1.0, warm_start: bool = False, out: str | Path = "runs",
          name: str | None = None,
          data_dir: str | Path | None = None, device: str = "auto", kernels: str | None = None,
          threads: int | None = None, split_seed: int = 0, train_subset: int | None = None,
          engine: str = "local", address: str | None = None, workers: int | None = None,
          ray_retries: int = DEFAULT_RAY_RETRIES, max_trials: int = MAX_TRIALS,
          mlflow: str | bool | None = None, quiet: bool = False) -> Run:
    """`lenetlab study`: every variant (default: the five published) over seeds; its Run.

    seeds: a count (seeds 0..n-1) or a list of seeds. kernels None: $LENETLAB_KERNELS, else auto.
    mlflow: a tracking URI, or True for the default one, to log the run to MLflow.
    """
    seeds = parse_seeds(options.check("seeds", seeds) if isinstance(seeds, int) else seeds)
    scale = options.check("epochs_scale", epochs_scale)
    configs = runner.study_configs(_variants(variants), scale, warm_start)
    return _start("study", configs, seeds, None, out=out, name=name, data_dir=data_dir, device=device,
                  kernels=kernels, threads=threads, split_seed=split_seed, train_subset=train_subset,
                  engine=engine, address=address, workers=workers, ray_retries=ray_retries,
                  max_trials=max_trials, mlflow=mlflow, quiet=quiet)


def sweep(spec: str | Path | dict, *, out: str | Path = "runs", name: str | None = None,
          data_dir: str | Path | None = None, device: str = "auto", kernels: str | None = None,
          threads: int | None = None, split_seed: int = 0, train_subset: int | None = None,
          engine: str = "local", address: str | None = None, workers: int | None = None,
          ray_retries: int = DEFAULT_RAY_RETRIES, max_trials: int = MAX_TRIALS,
          mlflow: str | bool | None = None, quiet: bool = False) -> Run:
    """`lenetlab sweep`: spec is a TOML file's path or a dict of the same shape (see sweeps.py)."""
    max_trials = options.check("max_trials", max_trials)
    if isinstance(spec, dict):
        planned = sweeps.expand(spec, max_trials)
    elif isinstance(spec, (str, Path)):
        planned = sweeps.load_spec(spec, max_trials)
    else:
        raise OptionError("spec", f"{{option}}: expected a TOML file's path or a dict, "
                          f"got {type(spec).__name__}")
    return _start("sweep", planned.configs, planned.seeds, planned.reference, out=out,
                  name=name or planned.name,
                  data_dir=data_dir, device=device, kernels=kernels, threads=threads, split_seed=split_seed,
                  train_subset=train_subset, engine=engine, address=address, workers=workers,
                  ray_retries=ray_retries, max_trials=max_trials, mlflow=mlflow, quiet=quiet)


def tune(spec: str | Path | dict, *, trials: int | None = None, timeout: float | None = None,
         out: str | Path = "runs", name: str | None = None, data_dir: str | Path | None = None,
         device: str = "auto", kernels: str | None = None, threads: int | None = None, split_seed: int = 0,
         train_subset: int | None = None, engine: str = "local", address: str | None = None,
         workers: int | None = None, ray_retries: int = DEFAULT_RAY_RETRIES,
         mlflow: str | bool | None = None, quiet: bool = False):
    """`lenetlab tune`: search recipe fields with Optuna (the tune extra), chosen on validation, then
    confirm the best over the spec's confirm_seeds on the test set; its TuneRun.

    spec: a TOML file's path or a dict of the same shape (see tunespec.py); trials and timeout
    (seconds) replace the spec's budget.
    """
    from .tunespec import load_tune_spec, parse

    _require_tune_extra()
    from .tuning.run import new_plan, start
    if isinstance(spec, dict):
        planned = parse(spec)
    elif isinstance(spec, (str, Path)):
        planned = load_tune_spec(spec)
    else:
        raise OptionError("spec", f"{{option}}: expected a TOML file's path or a dict, "
                          f"got {type(spec).__name__}")
    trials, timeout = options.check("trials", trials), options.check("timeout", timeout)
    planned = replace(planned, trials=trials or planned.trials,
                      timeout=float(timeout) if timeout is not None else planned.timeout)
    run = options.run_options(device, threads, split_seed, train_subset, kernels)
    workers, ray_retries = options.check("workers", workers), options.check("ray_retries", ray_retries)
    engine = options.check("engine", engine)
    if engine != "ray":
        start_local_pool(["lenetlab.tuning.referee"])  # optuna imported once, not per trial
    announce(run.kernels, run.device, [(planned.variant, planned.base)])
    check_engine(engine)
    tracked = _tracking(mlflow)
    train_only = load_fashion_mnist(data_dir, quiet=quiet, test=False)  # checked before a run folder exists
    run_dir = new_run_dir(out, name or planned.name, "tune")
    plan = new_plan(run_dir.name, planned, run, engine, workers)
    load = _loader(data_dir, quiet, train_only)
    echo = (lambda line: None) if quiet else _echo
    return _execute(run_dir, lambda display, tracker: start(
        run_dir, plan, load, address, echo, display, ray_retries, tracker), quiet, tracked, search=True)


def _require_tune_extra() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise OptionError("tune", "lenetlab tune needs Optuna: pip install 'lenetlab[tune]'") from None


def _loader(data_dir, quiet: bool, train_only=None) -> Callable:
    """load(test) for a search: the training files alone (test False, read once), or all four."""
    def load(test: bool):
        nonlocal train_only
        if test:
            return load_fashion_mnist(data_dir, quiet=True)
        train_only = train_only or load_fashion_mnist(data_dir, quiet=quiet, test=False)
        return train_only
    return load


def resume(path: str | Path, *, data_dir: str | Path | None = None, engine: str | None = None,
           address: str | None = None, workers: int | None = None, ray_retries: int = DEFAULT_RAY_RETRIES,
           mlflow: str | bool | None = None, quiet: bool = False):
    """`lenetlab resume`: finish an interrupted study, sweep or search as planned; its Run (a
    search's TuneRun)."""
    run_dir = Path(path)
    if is_tune_run(run_dir):
        return _resume_tune(run_dir, data_dir=data_dir, engine=engine, address=address, workers=workers,
                            ray_retries=ray_retries, mlflow=mlflow, quiet=quiet)
    plan = read_plan(run_dir)  # a folder that is no run is refused before the data is loaded
    workers, ray_retries = options.check("workers", workers), options.check("ray_retries", ray_retries)
    engine = options.check("engine", engine)
    if (engine or plan.engine) != "ray":
        start_local_pool()
    announce(plan.options.kernels, plan.options.device, plan.configs)
    check_engine(engine or "local")
    tracked = _tracking(mlflow)
    data = load_fashion_mnist(data_dir, quiet=quiet)
    return _execute(run_dir, lambda display, _: runner.resume(
        run_dir, data, engine, address, workers, display, ray_retries), quiet, tracked)


def _resume_tune(run_dir: Path, *, data_dir, engine, address, workers, ray_retries, mlflow, quiet):
    from .tunerecords import read_tune_plan

    plan = read_tune_plan(run_dir)  # a damaged plan is refused before Optuna or the data
    _require_tune_extra()
    from .tuning.run import resume as resume_search
    workers, ray_retries = options.check("workers", workers), options.check("ray_retries", ray_retries)
    engine = options.check("engine", engine)
    if (engine or plan.engine) != "ray":
        start_local_pool(["lenetlab.tuning.referee"])
    announce(plan.options.kernels, plan.options.device, [(plan.spec.variant, plan.spec.base)])
    check_engine(engine or "local")
    tracked = _tracking(mlflow)
    load = _loader(data_dir, quiet)  # read once the journal is checked (tuning/run.py)
    echo = (lambda line: None) if quiet else _echo
    return _execute(run_dir, lambda display, tracker: resume_search(
        run_dir, load, engine, address, workers, echo, display, ray_retries, tracker), quiet, tracked,
        search=True)


def open_run(path: str | Path):
    """An existing run folder's results (a finished run: its files checked against summary.json);
    a search's folder gives its TuneRun."""
    if is_tune_run(Path(path)):
        from .tuning.results import TuneRun

        return TuneRun(Path(path))
    return Run(Path(path))


def train(variant: str, *, seed: int = 0, warm_start: bool = False, out: str | Path | None = None,
          data_dir: str | Path | None = None, device: str = "auto", kernels: str | None = None,
          threads: int | None = None, split_seed: int = 0, train_subset: int | None = None,
          mlflow: str | bool | None = None, quiet: bool = False, **recipe_fields) -> Trained:
    """`lenetlab train`: one variant, its recipe changed by recipe_fields (lr=..., epochs=...;
    see `lenetlab variants` and recipes.FIELDS). The weights are saved into out when given."""
    import torch

    unknown = sorted(set(recipe_fields) - set(FIELDS))
    if unknown:
        raise OptionError(unknown[0], f"{{option}}: neither an option of train nor a recipe field "
                          f"(fields: {', '.join(FIELDS)})")
    recipe = with_fields(get_recipe(variant, warm_start), recipe_fields)
    if recipe.teacher:  # its teacher's models live in a run folder, which one trained model has not
        raise SpecError(f"{recipe.name} learns from a teacher ({recipe.teacher}), which train does not "
                        f"keep: run it with `lenetlab study --variants {recipe.name}` or a sweep")
    seed = options.check("seed", seed)
    run = options.run_options(device, threads, split_seed, train_subset, kernels)
    run = replace(run, threads=run.threads or torch.get_num_threads())
    announce(run.kernels, run.device, [(recipe.name, recipe)])
    if mlflow not in (None, False) and out is None:
        raise OptionError("mlflow", "{option} logs the saved weights: give out as well")
    tracking, uri = _tracking(mlflow)
    data = load_fashion_mnist(data_dir, quiet=quiet)
    if out is not None:
        files.writable_dir(out)  # before training, not after it
    echo = (lambda line: None) if quiet else _echo
    echo(f"training {recipe.name} (seed {seed}, {describe_start(recipe)}) on {run.device}, "
         f"{train_subset or 'all'} training images")
    splits = make_splits(data, run.split_seed, run.device, run.train_subset)
    result, state_dict = execute_trial(Trial(recipe.name, recipe, seed), "train", splits, run,
                                       checkpoint=None, progress=not (quiet or not sys.stderr.isatty()),
                                       log=echo)
    if not result.done:
        raise SpecError(f"{recipe.name}: {result.error}; no weights saved")
    weights = Path(out) / file_name(recipe.name) if out is not None else None
    if weights is not None:
        save_weights(weights, result, state_dict, data.checksums)
    final = {split: result.final(split) for split in SPLITS}
    print(f"{recipe.name}: train {final['train']:.4f}  val {final['val']:.4f}  test {final['test']:.4f}  "
          f"({result.wall_time_s:.0f} s, {result.kernels} kernels)"
          + (f"  saved {weights}" if weights else ""))
    if tracking:
        tracking.log_trained(uri, weights)
    model = LeNet5V1(**architecture(recipe))
    model.load_state_dict(state_dict)
    return Trained(model.eval(), result.history, result.test, result, weights)


def predict(weights_or_model, images, invert: str = "auto") -> list[prediction.Prediction]:
    """Class probabilities of images: paths (files or folders), PIL images or numpy arrays (H x W
    grey or H x W x 3 RGB), one or a list, prepared as `lenetlab predict` prepares files.
    weights_or_model: a .pth path, a LeNet5V1, or what train returned."""
    invert = options.check("invert", invert)
    model = _model(weights_or_model)
    items = images if isinstance(images, (list, tuple)) else [images]
    prepared, skipped = [], []
    for index, item in enumerate(items):  # every input loaded and checked before any is predicted
        if isinstance(item, (str, Path)):
            inputs = prediction.collect([item])
            prepared += [prediction.load_image(path, invert) for path in inputs.files]
            skipped += inputs.skipped
        else:
            prepared.append(prediction.prepare_picture(_picture(item, index), f"<image {index}>", invert))
    if skipped:
        print(prediction.skipped_note(skipped), file=sys.stderr)
    return prediction.predict(model, prepared)


def _model(given) -> LeNet5V1:
    if isinstance(given, Trained):
        return given.model
    if isinstance(given, LeNet5V1):
        return given
    if isinstance(given, (str, Path)):
        return load_weights(given)
    raise OptionError("weights_or_model", f"{{option}}: expected a .pth path, a LeNet5V1 or what train "
                      f"returned, got {type(given).__name__}")


def _picture(item, index: int):
    """A PIL image of an in-memory picture (a numpy array is read as Pillow reads its pixels)."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, np.ndarray) and (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
        array = item
        if array.dtype != np.uint8:
            if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
                raise OptionError("images", f"{{option}}[{index}]: pixel values must be 0-255 "
                                  f"(or 0-1 for floats), got {array.min()} to {array.max()}")
            scale = 255.0 if array.dtype.kind == "f" and array.max() <= 1.0 else 1.0
            array = np.rint(array * scale).astype(np.uint8)
        return Image.fromarray(array)
    raise OptionError("images", f"{{option}}[{index}]: expected a path, a PIL image or an H x W (x 3) "
                      f"numpy array, got {type(item).__name__} {getattr(item, 'shape', '')}")
