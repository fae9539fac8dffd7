"""The `lenetlab` command: variants, train, evaluate, predict, export, study, sweep, resume, report.

main() only wires options to the modules that do the work. Every error a user can cause
(a bad option, file or run folder, a full disk) ends as one line on stderr and exit status
2; Ctrl-C or SIGTERM during a run stops it cleanly and says how to resume.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from . import __version__, export, files, kernels, options, predict, study
from .data import CLASS_NAMES, load_fashion_mnist, make_splits, normalise
from .engines import check_engine
from .errors import LenetlabError, OutputError, SpecError
from .evaluation import evaluate
from .model import architecture_call, architecture_name, load_weights
from .progress import Progress
from .recipes import (
    FIELDS,
    PUBLISHED_RECIPES,
    RECIPES,
    describe_start,
    extensions,
    file_name,
    get_recipe,
    with_fields,
)
from .records import SPLITS, Trial
from .rundir import MAX_SEEDS, check_size, new_run_dir, parse_seeds, read_plan
from .runs import list_runs
from .sweep import expand, load_spec
from .trials import execute_trial, save_weights


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _echo(line: str) -> None:
    """Print a progress line now, also when stdout is a file or a pipe (a log, CI)."""
    print(line, flush=True)


# ----------------------------------------------------------------------------- commands


def cmd_variants(args) -> int:
    print(f"{'variant':<18} {'dropout':>7} {'bn':>3} {'epochs':>6} {'batch':>5} {'lr':>7} "
          f"{'wd':>7} {'optim':>5}  file")
    for r in RECIPES.values():
        print(f"{r.name:<18} {r.dropout_rate if r.use_dropout else '-':>7} "
              f"{'yes' if r.use_batch_norm else '-':>3} {r.epochs:>6} {r.batch_size:>5} "
              f"{r.lr:>7g} {r.weight_decay:>7g} {r.optimizer:>5}  {file_name(r.name)}")
    for r in RECIPES.values():
        extras = extensions(r)
        if extras:
            print(f"{r.name}: " + ", ".join(f"{k} {v}" for k, v in extras.items()))
    print("l2_optimized trains from scratch; --warm-start continues the trained l2_regularization "
          "model instead, as the original did.")
    return 0


def cmd_train(args) -> int:
    import torch

    changes = {key: getattr(args, key) for key in FIELDS if getattr(args, key) is not None}
    recipe = with_fields(get_recipe(args.variant, args.warm_start), changes, "--")
    run = options.run_options(args)
    run = replace(run, threads=run.threads or torch.get_num_threads())
    kernels.announce(run.kernels, run.device, [(recipe.name, recipe)])
    tracking = _tracking(args)
    data = load_fashion_mnist(args.data_dir, quiet=args.quiet)
    files.writable_dir(args.out)  # before training, not after it
    echo = (lambda line: None) if args.quiet else _echo
    echo(f"training {recipe.name} (seed {args.seed}, {describe_start(recipe)}) on {run.device}, "
         f"{args.train_subset or 'all'} training images")
    splits = make_splits(data, run.split_seed, run.device, run.train_subset)
    result, state_dict = execute_trial(Trial(recipe.name, recipe, args.seed), "train", splits, run,
                                       checkpoint=None, progress=not (args.quiet or not sys.stderr.isatty()),
                                       log=echo)
    if not result.done:
        raise SpecError(f"{recipe.name}: {result.error}; no weights saved")
    out = Path(args.out) / file_name(recipe.name)
    save_weights(out, result, state_dict, data.checksums)
    final = {split: result.final(split) for split in SPLITS}
    print(f"{recipe.name}: train {final['train']:.4f}  val {final['val']:.4f}  test {final['test']:.4f}  "
          f"({result.wall_time_s:.0f} s, {result.kernels} kernels)  saved {out}")
    if tracking:
        tracking.log_trained(args.mlflow, out)
    return 0


def cmd_evaluate(args) -> int:
    model = load_weights(args.weights)
    device = options.resolve_device(args.device)
    data = load_fashion_mnist(args.data_dir, quiet=True)
    x, y = normalise(data.test_images).to(device), data.test_labels.to(device)
    result = evaluate(model.to(device), x, y)
    variant = architecture_name(model)
    if args.json:
        print(json.dumps({"weights": str(args.weights), "variant": variant,
                          "use_dropout": model.use_dropout, "use_batch_norm": model.use_batch_norm,
                          "activation": model.activation, "pool": model.pool,
                          "architecture_source": model.architecture_source,
                          "test_accuracy": result.accuracy, "test_loss": result.loss,
                          "per_class_accuracy": dict(zip(CLASS_NAMES, result.per_class_accuracy)),
                          "confusion_matrix": result.confusion_matrix,
                          "classes": list(CLASS_NAMES)}, allow_nan=False))
        return 0
    print(f"{args.weights}: {architecture_call(model)} [{variant}; {model.architecture_source}]")
    print(f"test accuracy {result.accuracy:.4f}  (loss {result.loss:.4f}, 10,000 images)")
    for name, acc in zip(CLASS_NAMES, result.per_class_accuracy):
        print(f"  {name:<12} {acc:.4f}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the workers are stopped and the resume line printed."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


class _Displays:
    """Several study.Display observers told the same events in turn (the MLflow tracker, the progress)."""

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


def _tracking(args):
    """The tracking module when --mlflow is given (its extra checked before any work), else None."""
    if getattr(args, "mlflow", None) is None:
        return None
    from . import tracking

    tracking.require_extra("--mlflow")
    return tracking


def _run(args, run_dir: Path, go) -> int:
    """Run go(display) -> summary with Ctrl-C and SIGTERM turned into a resume hint."""
    echo = (lambda line: None) if args.quiet else _echo
    display = Progress(args.quiet, echo)
    tracking = _tracking(args)
    tracker = tracking.Tracker(args.mlflow, run_dir, None if args.quiet else _echo) if tracking else None
    in_main = threading.current_thread() is threading.main_thread()  # the CLI may be embedded
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    resume_line = f"lenetlab resume {shlex.quote(str(run_dir))}" + (f" {tracker.option}" if tracker else "")
    stopped = "FAILED"
    try:
        summary = go(_Displays(tracker, display) if tracker else display)
        stopped = None
    except KeyboardInterrupt as exc:
        stopped = "KILLED"
        print(f"\n{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}: finished "
              f"trials and each running trial's last epoch are saved; resume with: {resume_line}",
              file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    except OutputError as exc:  # a full disk: the run can go on once there is room
        raise OutputError(f"{exc}; once fixed: {resume_line}") from None
    finally:
        display.close()
        if tracker and stopped:
            tracker.close(stopped)
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    failed = summary.failed_count
    print(f"{summary.kind} {run_dir}: {summary.done_count} trial(s) done, {failed} failed; "
          f"report: {run_dir / 'report.html'} (and report.md)")
    best = summary.best_config
    if best:
        print(f"best: {best.name} test accuracy {best.final['test'].mean:.4f} "
              f"(mean of {best.final['test'].n} seed(s))")
    if tracker:
        tracker.finish()
    if failed:
        print(f"rerun the failed trials with: {resume_line}")
    return 1 if failed else 0


def _start(args, kind: str, name: str | None, configs, seeds: list[int], reference: str | None = None) -> int:
    check_size(len(configs) * len(seeds), args.max_trials)
    run = options.run_options(args)
    kernels.announce(run.kernels, run.device, configs)
    check_engine(args.engine)
    _tracking(args)
    data = load_fashion_mnist(args.data_dir, quiet=args.quiet)  # before a run folder exists
    run_dir = new_run_dir(args.out, args.name or name, kind)
    plan = study.new_plan(kind, run_dir.name, configs, seeds, run, args.engine, args.workers, reference)
    return _run(args, run_dir, lambda display: study.start(run_dir, plan, data, args.address, display,
                                                            args.ray_retries))


def cmd_study(args) -> int:
    variants = args.variants or list(PUBLISHED_RECIPES)
    if "all" in variants:
        variants = [name for v in variants for name in (RECIPES if v == "all" else [v])]
    variants = list(dict.fromkeys(variants))  # each once, in the given order
    configs = study.study_configs(variants, args.epochs_scale, args.warm_start)
    return _start(args, "study", None, configs, parse_seeds(args.seeds))


def cmd_sweep(args) -> int:
    grid = {key: getattr(args, key) for key in ("variant", *FIELDS) if getattr(args, key)}
    if args.spec:
        given = [f"--{key.replace('_', '-')}" for key in grid] + (["--seeds"] if args.seeds else [])
        if given:
            raise SpecError(f"{args.spec}: the spec sets the seeds and the grid; "
                            f"put {', '.join(given)} in it instead")
        sweep = load_spec(args.spec, args.max_trials)
    else:
        sweep = expand({"seeds": args.seeds or options.DEFAULT_SEEDS, "grid": grid}, args.max_trials)
    return _start(args, "sweep", sweep.name, sweep.configs, sweep.seeds, sweep.reference)


def cmd_resume(args) -> int:
    run_dir = Path(args.run_dir)
    plan = read_plan(run_dir)  # a folder that is no run is refused before the data is loaded
    kernels.announce(plan.options.kernels, plan.options.device, plan.configs)
    check_engine(args.engine or "local")
    _tracking(args)
    data = load_fashion_mnist(args.data_dir, quiet=args.quiet)
    return _run(args, run_dir, lambda display: study.resume(run_dir, data, args.engine, args.address,
                                                             args.workers, display, args.ray_retries))


def cmd_predict(args) -> int:
    if args.explain is not None:
        files.writable_dir(args.explain)  # before the weights and the images, not after them
    model = load_weights(args.weights)
    predictions, skipped = predict.predict_files(model, args.images, args.invert)
    explained = (predict.write_explained(predictions, args.explain) if args.explain is not None
                 else [None] * len(predictions))
    if skipped:
        print(predict.skipped_note(skipped), file=sys.stderr)
    for prediction, seen in zip(predictions, explained):
        print(json.dumps(predict.as_json(prediction, seen), allow_nan=False) if args.json
              else predict.as_line(prediction, args.top_k))
    return 0


def cmd_export(args) -> int:
    export.require_extra()
    data = load_fashion_mnist(args.data_dir, quiet=True)
    result = export.export_onnx(args.weights, args.onnx, data.test_images, data.test_labels)
    print(export.describe(result))
    return 0 if result.written else 1


def cmd_log_mlflow(args) -> int:
    from . import tracking

    tracking.require_extra("log-mlflow")
    path = Path(args.path)
    if path.is_dir():
        print(tracking.log_run_dir(args.mlflow, path))
    else:
        print(tracking.log_weights(args.mlflow, path))
    return 0


def cmd_runs(args) -> int:
    found = list_runs(Path(args.dir))
    for state in found:
        print(state.line())
    if not found:
        print(f"no run folders under {args.dir}")
    return 0


def cmd_report(args) -> int:
    from .report import render_report

    print(f"wrote {render_report(Path(args.run_dir))}")
    return 0


# ----------------------------------------------------------------------------- parser

WEIGHTS_HELP = ("a .pth state_dict: its keys give dropout and batch norm, the .json sidecar beside it "
                "(if any) the activation and pooling, else the original's tanh and average pooling")

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lenetlab", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lenetlab {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("variants", help="list the study's recipes")
    p.set_defaults(func=cmd_variants)

    p = sub.add_parser("train", help="train one variant and save its weights")
    p.add_argument("variant", help=f"one of {', '.join(RECIPES)}")
    for key, field in FIELDS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=options.field(key),
                       help=f"{field.help} (default: the variant's recipe)")
    p.add_argument("--seed", type=options.SEED, default=0,
                   help="seed of the weights, data order and dropout, 0 to 2**32-1 (default 0)")
    p.add_argument("--warm-start", action="store_true",
                   help="l2_optimized: continue the trained l2_regularization model, as the original")
    p.add_argument("--out", default="models", help="folder for the weights (default: models)")
    options.add_training_options(p, "all cores")
    options.add_mlflow_option(p, "the trained model, in experiment lenetlab-train")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy, per class, of a weights file")
    p.add_argument("weights", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    options.add_data_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("study", help="the whole comparison: every variant over several seeds")
    p.add_argument("--seeds", type=options.number(int, 1, MAX_SEEDS), default=options.DEFAULT_SEEDS,
                   help=f"seeds per variant, 1 to {MAX_SEEDS} (default {options.DEFAULT_SEEDS})")
    p.add_argument("--variants", type=options.list_of(str), help="comma-separated, e.g. baseline,dropout; "
                   "tuned is lenetlab's best recipe; all: the five and tuned (default: the five published)")
    p.add_argument("--epochs-scale", type=options.number(float, 0, options.MAX_EPOCHS_SCALE, low_open=True),
                   default=1.0,
                   help=f"multiply every recipe's epochs, more than 0 to {options.MAX_EPOCHS_SCALE:g} "
                   "(default 1; 0.25 for a quick look)")
    p.add_argument("--warm-start", action="store_true",
                   help="l2_optimized continues the trained L2 model, as the original")
    options.add_run_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="a grid over recipe fields, each over several seeds")
    p.add_argument("spec", nargs="?", help="a TOML spec (see the README); or give the grid as flags")
    p.add_argument("--seeds", type=options.number(int, 1, MAX_SEEDS),
                   help=f"seeds per configuration, 1 to {MAX_SEEDS} (default {options.DEFAULT_SEEDS})")
    p.add_argument("--variant", type=options.list_of(str), help="comma-separated published recipes to start "
                   "from (default baseline)")
    for key, field in FIELDS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=options.list_of(options.field(key)),
                       help=f"comma-separated values: {field.help}")
    options.add_run_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", help="finish an interrupted study or sweep as planned")
    p.add_argument("run_dir", help="the run folder")
    options.add_data_options(p)
    options.add_engine_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress display")
    options.add_mlflow_option(p, "each trial as it finishes, into the runs logged before, then the summary")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("predict", help="classify image files with a weights file", description=(
        "Classify pictures as Fashion-MNIST does. Each becomes a 28x28 grey image of a light garment on "
        "black the way the data set's own images were made: first frame (GIF, WebP), EXIF orientation, "
        "transparency laid on white; the edges of the background's colour (the corners') trimmed; grey; "
        "inverted when that background is light (--invert auto); the background made black; the longer "
        "side resized to 28 pixels, keeping the aspect ratio; centred on black; normalised as in "
        "training. A 28x28 picture is used as it is (inverted if its background is light). "
        "Every file is checked before any is predicted: a missing, empty, "
        "truncated or corrupt file, one that is not an image, or one with a side of 0 or 100,000+ pixels "
        "stops the call (one line naming it, exit 2) and nothing is printed for the others. In a folder, "
        "files that are not images are skipped and counted on stderr."))
    p.add_argument("weights", type=Path, help=WEIGHTS_HELP)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                   help="image files (PNG, JPEG, BMP, GIF, WebP, ...) or folders: every image in a folder, "
                   "sorted by name, not recursing")
    p.add_argument("--top-k", type=options.number(int, 1, 10), default=3,
                   help="classes printed per file, 1 to 10 (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per line and file, with all ten "
                   "probabilities (instead of the top K)")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="invert the grey picture: auto (default) when its background (the median of its "
                   "four corners) is light, yes always, no never")
    p.add_argument("--explain", type=Path, metavar="DIR",
                   help="write the 28x28 image the network saw for each input into DIR (created if "
                   "needed), named after the input with .png added; --json adds its path as 'explained'")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write a weights file as ONNX, checked against PyTorch", description=(
        "Export to ONNX (needs: pip install 'lenetlab[onnx]'): input 'image' float32 (batch, 1, 28, 28) "
        "normalised as in training, any batch size; output 'logits' (batch, 10); class names, mean, std "
        "and the input layout in the model's metadata_props. Before writing, onnxruntime and PyTorch "
        "classify the 10,000 test images: the logits must agree within 1e-4 and every predicted class "
        "must match, or nothing is written (exit 1)."))
    p.add_argument("weights", type=Path, help=WEIGHTS_HELP)
    p.add_argument("--onnx", type=Path, required=True, metavar="OUT.onnx", help="the ONNX file to write")
    options.add_data_options(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="render tables, plots, report.md and report.html again from a run "
                       "folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("runs", help="the run folders under DIR, one line each: kind, configurations and "
                       "seeds, trials done and failed, best test accuracy, and whether each is finished, "
                       "interrupted, in use or damaged")
    p.add_argument("dir", nargs="?", default="runs", help="the folder holding run folders (default: runs)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("log-mlflow", help="log a finished run folder (or weights train saved) to MLflow",
                       description="Log a finished run folder to MLflow as `--mlflow` would have logged it "
                       "live: what is logged already is kept, the rest is added (needs pip install "
                       "'lenetlab[mlflow]'). Given a .pth that `lenetlab train` saved, log that model.")
    p.add_argument("path", metavar="RUN_DIR_OR_WEIGHTS", help="a run folder, or a .pth with its sidecar")
    p.add_argument("--mlflow", type=options.tracking_uri, metavar="TRACKING_URI",
                   help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory")
    p.set_defaults(func=cmd_log_mlflow)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except LenetlabError as exc:
        print(f"lenetlab: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return 141  # 128 + SIGPIPE, what a program stopped by the signal reports
    except OSError as exc:  # a file system refusing a write (full, read-only, a file in the way)
        print(f"lenetlab: error: {files.write_problem(exc.filename or '', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlenetlab: interrupted", file=sys.stderr)
        return 130
