"""The `lenetlab` command: variants, train, evaluate, predict, export, study, sweep, tune, resume, report.

run() is the command (main(), then a fast exit). main() only wires options to the modules
that do the work: the run commands, train and predict to the Python API (api.py), the others
to their modules. Every error a user can cause (a bad option, file or run folder, a full
disk) ends as one line on stderr and exit status 2; Ctrl-C or SIGTERM during a run stops it
cleanly and says how to resume.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
from pathlib import Path

from . import __version__, files, options
from .errors import LenetlabError, OptionError, SpecError, Stopped
from .markup import plain
from .recipes import FIELDS, RECIPES, extensions, file_name
from .rundir import MAX_SEEDS

# torch, numpy and PIL come in with the commands that use them: --help, variants and runs start
# at once without them.

# What a search's local workers import before they fork: Optuna, once, not per trial.
TUNE_PRELOAD = ["lenetlab.tuning.referee"]


# Whether this process is the `lenetlab` command (run()), not a caller of main() in Python.
_is_command = False


def _api(local_run: bool = False, preload: list[str] | None = None):
    """The Python API, for the commands that train or predict. local_run: a run on the local pool,
    whose forkserver starts first, to import torch (and preload) on another core while this
    process does."""
    if local_run:
        from .localpool import start_local_pool

        start_local_pool(preload)
    from . import api

    if _is_command:  # its own process: no caller's torch.compile to keep working
        from .training import skip_dynamo_import

        skip_dynamo_import()
    return api


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


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
    changes = {key: getattr(args, key) for key in FIELDS if getattr(args, key) is not None}
    _api().train(args.variant, seed=args.seed, warm_start=args.warm_start, out=args.out,
                 data_dir=args.data_dir, device=args.device, kernels=args.kernels, threads=args.threads,
                 split_seed=args.split_seed,
                 train_subset=args.train_subset, mlflow=args.mlflow, quiet=args.quiet, **changes)
    return 0


def cmd_evaluate(args) -> int:
    from .data import CLASS_NAMES, load_fashion_mnist, normalise
    from .evaluation import evaluate
    from .model import architecture_call, architecture_name, load_weights

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
    print(f"{plain(args.weights)}: {architecture_call(model)} [{variant}; {model.architecture_source}]")
    print(f"test accuracy {result.accuracy:.4f}  (loss {result.loss:.4f}, 10,000 images)")
    for name, acc in zip(CLASS_NAMES, result.per_class_accuracy):
        print(f"  {name:<12} {acc:.4f}")
    return 0


def _run_options(args, max_trials: bool = True) -> dict:
    """The options of a study, sweep or search, as the API's keywords."""
    found = dict(out=args.out, name=args.name, data_dir=args.data_dir, device=args.device,
                 kernels=args.kernels,
                 threads=args.threads, split_seed=args.split_seed, train_subset=args.train_subset,
                 engine=args.engine, address=args.address, workers=args.workers, ray_retries=args.ray_retries,
                 mlflow=args.mlflow, quiet=args.quiet)
    return {**found, "max_trials": args.max_trials} if max_trials else found


def _status(run) -> int:
    return 1 if run.summary.failed_count else 0


def cmd_study(args) -> int:
    api = _api(local_run=args.engine == "local")
    return _status(api.study(args.variants, seeds=args.seeds, epochs_scale=args.epochs_scale,
                             warm_start=args.warm_start, **_run_options(args)))


def cmd_sweep(args) -> int:
    grid = {key: getattr(args, key) for key in ("variant", *FIELDS) if getattr(args, key)}
    if args.spec:
        given = [f"--{key.replace('_', '-')}" for key in grid] + (["--seeds"] if args.seeds else [])
        if given:
            raise SpecError(f"{args.spec}: the spec sets the seeds and the grid; "
                            f"put {', '.join(given)} in it instead")
    spec = args.spec or {"seeds": args.seeds or options.DEFAULT_SEEDS, "grid": grid}
    return _status(_api(local_run=args.engine == "local").sweep(spec, **_run_options(args)))


def cmd_tune(args) -> int:
    run = _api(local_run=args.engine == "local", preload=TUNE_PRELOAD).tune(
        args.spec, trials=args.trials, timeout=args.timeout, **_run_options(args, max_trials=False))
    return _status(run.confirmation)


def cmd_resume(args) -> int:
    from .tunerecords import is_tune_run

    search = is_tune_run(Path(args.run_dir))
    api = _api(local_run=search and args.engine in (None, "local"), preload=TUNE_PRELOAD if search else None)
    run = api.resume(args.run_dir, data_dir=args.data_dir, engine=args.engine, address=args.address,
                     workers=args.workers, ray_retries=args.ray_retries, mlflow=args.mlflow, quiet=args.quiet)
    return _status(run.confirmation if search else run)


def cmd_predict(args) -> int:
    if args.explain is not None:
        files.writable_dir(args.explain)  # before the weights and the images, not after them
    from . import prediction

    predictions = _api().predict(args.weights, args.images, args.invert)
    explained = (prediction.write_explained(predictions, args.explain) if args.explain is not None
                 else [None] * len(predictions))
    for found, seen in zip(predictions, explained):
        print(json.dumps(prediction.as_json(found, seen), allow_nan=False) if args.json
              else prediction.as_line(found, args.top_k))
    return 0


def cmd_export(args) -> int:
    from . import export
    from .data import load_fashion_mnist

    export.require_extra()
    data = load_fashion_mnist(args.data_dir, quiet=True)
    result = export.export_onnx(args.weights, args.onnx, data.test_images, data.test_labels)
    print(export.describe(result))
    return 0 if result.written else 1


def cmd_log_mlflow(args) -> int:
    from . import tracking
    from .tunerecords import is_tune_run

    tracking.require_extra("log-mlflow")
    path = Path(args.path)
    if path.is_dir() and is_tune_run(path):
        from .tuning.tracking import log_tune_dir

        print(log_tune_dir(args.mlflow, path))
    elif path.is_dir():
        print(tracking.log_run_dir(args.mlflow, path))
    else:
        print(tracking.log_weights(args.mlflow, path))
    return 0


def cmd_runs(args) -> int:
    from .runs import list_runs

    found = list_runs(Path(args.dir))
    for state in found:
        print(state.line())
    if not found:
        print(f"no run folders under {args.dir}")
    return 0


def cmd_report(args) -> int:
    from .tunerecords import is_tune_run

    if is_tune_run(Path(args.run_dir)):
        from .tuning.report import render_tune_report

        print(f"wrote {render_tune_report(Path(args.run_dir))}")
        return 0
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
    p.add_argument("--seed", type=options.typed("seed"), default=0,
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
    p.add_argument("--seeds", type=options.typed("seeds"), default=options.DEFAULT_SEEDS,
                   help=f"seeds per variant, 1 to {MAX_SEEDS} (default {options.DEFAULT_SEEDS})")
    p.add_argument("--variants", type=options.list_of(str), help="comma-separated, e.g. baseline,dropout; "
                   "tuned and distilled are lenetlab's own recipes; all: every recipe "
                   "(default: the five published)")
    p.add_argument("--epochs-scale", type=options.typed("epochs_scale"),
                   default=1.0,
                   help=f"multiply every recipe's epochs, more than 0 to {options.MAX_EPOCHS_SCALE:g} "
                   "(default 1; 0.25 for a quick look)")
    p.add_argument("--warm-start", action="store_true",
                   help="l2_optimized continues the trained L2 model, as the original")
    options.add_run_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="a grid over recipe fields, each over several seeds")
    p.add_argument("spec", nargs="?", help="a TOML spec (see docs/cli.md); or give the grid as flags")
    p.add_argument("--seeds", type=options.typed("seeds"),
                   help=f"seeds per configuration, 1 to {MAX_SEEDS} (default {options.DEFAULT_SEEDS})")
    p.add_argument("--variant", type=options.list_of(str), help="comma-separated published recipes to start "
                   "from (default baseline)")
    for key, field in FIELDS.items():
        p.add_argument(f"--{key.replace('_', '-')}", type=options.list_of(options.field(key)),
                       help=f"comma-separated values: {field.help}")
    options.add_run_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("tune", help="search recipe fields with Optuna on validation, then confirm the best "
                       "on the test set", description=(
                           "Search the recipe fields of SPEC.toml's [search] from its variant (Optuna's "
                           "TPE, pruning on each epoch's validation accuracy; pip install "
                           "'lenetlab[tune]'), on the local pool or Ray. The test set is not read until the "
                           "search ends; then the best trial's recipe and the variant train over the "
                           "spec's confirm_seeds, with test accuracy and the paired difference. Writes "
                           "best.toml, a sweep spec of the winner. Resume an interrupted search with "
                           "lenetlab resume. The spec format: docs/tune.md."))
    p.add_argument("spec", help="a TOML search spec (see docs/tune.md)")
    p.add_argument("--trials", type=options.typed("trials"),
                   help="the budget: trials asked, pruned ones included, 1 to 10000 (default: the spec's, "
                   "else 20)")
    p.add_argument("--timeout", type=options.typed("timeout"),
                   help="seconds of search in all, across resumes; running trials finish (default: the "
                   "spec's, else none)")
    options.add_training_options(p, "cores / workers")
    options.add_engine_options(p)
    p.set_defaults(engine="local")
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: the spec's name, else tune-<date>-<time>)")
    options.add_mlflow_option(p, "the search as a parent run and each trial as a nested run")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("resume", help="finish an interrupted study, sweep or search as planned")
    p.add_argument("run_dir", help="the run folder")
    options.add_data_options(p)
    options.add_engine_options(p, planned=True)
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
    p.add_argument("--top-k", type=options.typed("top_k"), default=3,
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
    except OptionError as exc:
        print(f"lenetlab: error: {plain(exc.on_command_line())}", file=sys.stderr)
        return 2
    except LenetlabError as exc:
        print(f"lenetlab: error: {plain(exc)}", file=sys.stderr)
        return 2
    except Stopped as exc:  # said how to resume already
        return exc.status
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
        return 141  # 128 + SIGPIPE, what a program stopped by the signal reports
    except OSError as exc:  # a file system refusing a write (full, read-only, a file in the way)
        print(f"lenetlab: error: {plain(files.write_problem(exc.filename or '', exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlenetlab: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The `lenetlab` command: main(), its exit handlers, then the exit without the
    interpreter's teardown, which frees torch's thousands of modules one by one, after
    everything lenetlab writes is closed. The usual exit
    where a thread that is no daemon still runs (it waits for it) or a profiler or tracer
    (cProfile, coverage) has its results still to write."""
    global _is_command
    _is_command = True
    code = main()
    if (sys.getprofile() is not None or sys.gettrace() is not None
            or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                   if t is not threading.current_thread())):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the usual exit runs first: multiprocessing, Ray, MLflow, logging
    pool = sys.modules.get("lenetlab.localpool")  # a run may have started the local pool
    if pool is not None:
        pool.stop_local_pool()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said there
            pass
    os._exit(code or 0)
