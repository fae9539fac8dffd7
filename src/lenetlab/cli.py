"""The `lenetlab` command: variants, train, evaluate, study, sweep, report.

Every error a user can cause (bad option, bad file, bad run folder) ends as one
line on stderr and exit status 2; Ctrl-C during a study says how to resume.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import threading
from pathlib import Path

from .errors import LenetlabError, SpecError

DEFAULT_SEEDS = 3


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _number(kind: type, minimum: float, strict: bool = False):
    """An argparse type: a finite int or float of at least (strict: more than) minimum."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be a finite number {'above' if strict else 'of at least'} {minimum}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


_positive_int = _number(int, 1)
_non_negative_int = _number(int, 0)
_non_negative_float = _number(float, 0)
_positive_float = _number(float, 0, strict=True)


def _list_of(kind):
    def parse(text: str) -> list:
        values = [kind(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values
    parse.__name__ = f"comma-separated {kind.__name__}"
    return parse


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SpecError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"--device {name}: CUDA is not available on this machine")
        if (device.index or 0) >= torch.cuda.device_count():
            raise SpecError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return name


def _echo(line: str) -> None:
    """Print a progress line now, also when stdout is a file or a pipe (a log, CI)."""
    print(line, flush=True)


def _quiet(args) -> bool:
    return args.quiet or not sys.stderr.isatty()


# ----------------------------------------------------------------------------- commands


def cmd_variants(args) -> int:
    from .recipes import RECIPES, file_name

    print(f"{'variant':<18} {'dropout':>7} {'bn':>3} {'epochs':>6} {'batch':>5} {'lr':>7} "
          f"{'wd':>7} {'optim':>5}  file")
    for r in RECIPES.values():
        print(f"{r.name:<18} {r.dropout_rate if r.use_dropout else '-':>7} "
              f"{'yes' if r.use_batch_norm else '-':>3} {r.epochs:>6} {r.batch_size:>5} "
              f"{r.lr:>7g} {r.weight_decay:>7g} {r.optimizer:>5}  {file_name(r.name)}")
    print("l2_optimized trains from scratch; --warm-start continues the trained l2_regularization "
          "model instead, as the original did.")
    return 0


def cmd_train(args) -> int:
    import torch

    from . import files
    from .data import load_fashion_mnist
    from .recipes import describe_start, file_name, get_recipe
    from .trials import execute_trial, make_trial, save_weights

    recipe = get_recipe(args.variant, args.warm_start)
    changes = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size),
                                 ("lr", args.lr), ("weight_decay", args.weight_decay))
               if v is not None}
    recipe = recipe.with_changes(**changes)
    _check_train_subset(args.train_subset)
    options = {"device": resolve_device(args.device), "split_seed": args.split_seed,
               "train_subset": args.train_subset, "threads": args.threads or torch.get_num_threads()}
    data = load_fashion_mnist(args.data_dir, quiet=args.quiet)
    files.writable_dir(args.out)  # before training, not after it
    echo = (lambda line: None) if args.quiet else _echo
    echo(f"training {recipe.name} (seed {args.seed}, {describe_start(recipe)}) on "
         f"{options['device']}, {args.train_subset or 'all'} training images")
    outcome = execute_trial(make_trial(recipe.name, recipe, args.seed), data, options,
                            checkpoint=None, progress=not _quiet(args), log=echo)
    out = Path(args.out) / file_name(recipe.name)
    save_weights(out, outcome, data.checksums)
    result = outcome["result"]
    last = result["history"][-1]["epoch"]
    final = {r["split"]: r["accuracy"] for r in result["history"] if r["epoch"] == last}
    print(f"{recipe.name}: train {final['train']:.4f}  val {final['val']:.4f}  "
          f"test {result['test']['accuracy']:.4f}  ({result['wall_time_s']:.0f} s)  saved {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .data import CLASS_NAMES, load_fashion_mnist, normalise
    from .evaluation import evaluate
    from .model import architecture_name, load_weights

    model = load_weights(args.weights)
    device = resolve_device(args.device)
    data = load_fashion_mnist(args.data_dir, quiet=True)
    x, y = normalise(data.test_images).to(device), data.test_labels.to(device)
    result = evaluate(model.to(device), x, y)
    variant = architecture_name(model.use_dropout, model.use_batch_norm)
    if args.json:
        print(json.dumps({"weights": str(args.weights), "variant": variant,
                          "use_dropout": model.use_dropout, "use_batch_norm": model.use_batch_norm,
                          "test_accuracy": result.accuracy, "test_loss": result.loss,
                          "per_class_accuracy": dict(zip(CLASS_NAMES, result.per_class_accuracy)),
                          "confusion_matrix": result.confusion_matrix,
                          "classes": list(CLASS_NAMES)}))
        return 0
    print(f"{args.weights}: LeNet5V1(use_dropout={model.use_dropout}, "
          f"use_batch_norm={model.use_batch_norm}) [{variant}]")
    print(f"test accuracy {result.accuracy:.4f}  (loss {result.loss:.4f}, 10,000 images)")
    for name, acc in zip(CLASS_NAMES, result.per_class_accuracy):
        print(f"  {name:<12} {acc:.4f}")
    return 0


def _check_train_subset(train_subset: int | None) -> None:
    """Refuse a subset larger than the split up front, before a run folder or any training."""
    from .data import TRAIN_SIZE

    if train_subset is not None and train_subset > TRAIN_SIZE:
        raise SpecError(f"--train-subset {train_subset}: the training split has only {TRAIN_SIZE:,} images")


def _run_options(args) -> dict:
    _check_train_subset(args.train_subset)
    return {"device": resolve_device(args.device), "split_seed": args.split_seed or 0,
            "train_subset": args.train_subset, "threads": args.threads}


# Options that shape a run's plan: on --resume the plan in run.json decides them.
_PLAN_OPTIONS = ("seeds", "variants", "epochs_scale", "warm_start", "name", "threads",
                 "split_seed", "train_subset", "spec", "variant", "weight_decay",
                 "dropout_rate", "epochs", "batch_size", "lr", "optimizer")


def _flags_given(args, names: tuple[str, ...]) -> list[str]:
    """The options among names that the user set (unset ones are None, or False for switches)."""
    return [f"--{name.replace('_', '-')}" for name in names
            if getattr(args, name, None) is not None and getattr(args, name) is not False]


class _Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the workers are stopped and the resume line printed."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated()


def _start_or_resume(args, kind: str, make_plan) -> int:
    from . import files
    from .data import load_fashion_mnist
    from .engines import check_engine, default_workers, usable_cores
    from .study import create_run, execute, load_plan

    if args.resume:
        given = _flags_given(args, _PLAN_OPTIONS)
        if given:
            raise SpecError(f"--resume continues the run as planned in its run.json; "
                            f"drop {', '.join(given)}")
        run_dir = Path(args.resume)
        plan = load_plan(run_dir)
    else:
        run_dir, plan_args = make_plan()
        options = _run_options(args)
    # Check engine and data before a new run folder exists: a failed start leaves nothing behind.
    check_engine(args.engine)
    data = load_fashion_mnist(args.data_dir, quiet=args.quiet)
    files.writable_dir(run_dir)
    if not args.resume:
        configs, seeds, _ = plan_args
        # No more workers than trials, so that a small run still gets every core.
        workers = min(args.workers or default_workers(options["device"]), len(configs) * len(seeds))
        if options["threads"] is None:  # share the cores between the workers
            options["threads"] = max(1, usable_cores() // workers)
        options.update(engine=args.engine, workers=workers)
        plan = create_run(run_dir, kind, *plan_args, options=options)
    echo = (lambda line: None) if args.quiet else _echo
    # Signal handlers can only be set from the main thread (the CLI may be embedded).
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        summary = execute(run_dir, plan, data, args.engine, args.address,
                          args.workers or plan["options"].get("workers"), args.quiet, echo)
    except KeyboardInterrupt as exc:
        print(f"\n{'terminated' if isinstance(exc, _Terminated) else 'interrupted'}: finished "
              f"trials and each running trial's last epoch are saved; "
              f"resume with: lenetlab {kind} --resume {run_dir}", file=sys.stderr)
        return 143 if isinstance(exc, _Terminated) else 130
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    failed = sum(len(c["failed"]) for c in summary["configs"])
    print(f"{kind} {run_dir}: {sum(len(c['completed_seeds']) for c in summary['configs'])} "
          f"trial(s) done, {failed} failed; report: {run_dir / 'report.md'}")
    if summary["best"]:
        best = next(c for c in summary["configs"] if c["name"] == summary["best"]["name"])
        print(f"best: {best['name']} test accuracy {best['final']['test']['mean']:.4f} "
              f"(mean of {best['final']['test']['n']} seed(s))")
    if failed:
        print(f"resume the failed trials with: lenetlab {kind} --resume {run_dir}")
    return 1 if failed else 0


def cmd_study(args) -> int:
    from .recipes import RECIPES
    from .study import new_run_dir, study_configs
    from .sweep import parse_seeds

    def make_plan():
        variants = list(dict.fromkeys(args.variants or RECIPES))  # each once, in the given order
        configs = study_configs(variants, args.epochs_scale or 1.0, args.warm_start)
        reference = "baseline" if "baseline" in variants else None
        seeds = parse_seeds(args.seeds or DEFAULT_SEEDS)
        return new_run_dir(args.out, args.name, "study"), (configs, seeds, reference)

    return _start_or_resume(args, "study", make_plan)


def cmd_sweep(args) -> int:
    from .study import new_run_dir
    from .sweep import expand, load_spec

    grid_flags = ("variant", "weight_decay", "dropout_rate", "epochs", "batch_size", "lr", "optimizer")

    def make_plan():
        if args.spec:
            given = _flags_given(args, ("seeds", *grid_flags))
            if given:
                raise SpecError(f"{args.spec}: the spec sets the seeds and the grid; "
                                f"put {', '.join(given)} in it instead")
            name, seeds, configs = load_spec(args.spec)
        else:
            spec = {"seeds": args.seeds or DEFAULT_SEEDS, "grid": {}}
            for key in grid_flags:
                values = getattr(args, key)
                if values:
                    spec["grid"][key] = values
            name, seeds, configs = expand(spec)
        reference = next((n for n, _ in configs if n == "baseline"), None)
        return new_run_dir(args.out, args.name or name, "sweep"), (configs, seeds, reference)

    return _start_or_resume(args, "sweep", make_plan)


def cmd_report(args) -> int:
    from .report import render_report

    path = render_report(Path(args.run_dir))
    print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- parser


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files "
                   "(default: $LENETLAB_DATA, then the cache, downloading if needed)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_data_options(p)
    p.add_argument("--out", default="runs", help="parent folder of run folders (default: runs)")
    p.add_argument("--name", help="run folder name (default: derived from the time)")
    p.add_argument("--resume", metavar="RUN_DIR", help="finish an interrupted run: skip what finished")
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local process pool (default) or ray")
    p.add_argument("--address", help="Ray cluster address (default: start a local Ray instance)")
    p.add_argument("--workers", type=_positive_int, help="trials at a time (default: one per core)")
    p.add_argument("--threads", type=_positive_int,
                   help="torch threads per trial (default: cores / workers)")
    p.add_argument("--split-seed", type=_non_negative_int,
                   help="seed of the train/validation split (default 0)")
    p.add_argument("--train-subset", type=_positive_int, help="train on the first N images only "
                   "(quick checks)")
    p.add_argument("--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lenetlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("variants", help="list the study's recipes")
    p.set_defaults(func=cmd_variants)

    p = sub.add_parser("train", help="train one variant and save its weights")
    p.add_argument("variant")
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--seed", type=_non_negative_int, default=0)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--lr", type=_positive_float)
    p.add_argument("--weight-decay", type=_non_negative_float)
    p.add_argument("--warm-start", action="store_true",
                   help="l2_optimized: continue the trained l2_regularization model, as the original")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: all cores)")
    p.add_argument("--split-seed", type=_non_negative_int, default=0)
    p.add_argument("--train-subset", type=_positive_int, help="train on the first N images only")
    p.add_argument("--out", default="models", help="folder for the weights (default: models)")
    p.add_argument("--quiet", action="store_true")
    _add_data_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test accuracy, per class, of a weights file")
    p.add_argument("weights", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_data_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("study", help="the whole comparison: every variant over several seeds")
    p.add_argument("--seeds", type=_positive_int, help=f"seeds per variant (default {DEFAULT_SEEDS})")
    p.add_argument("--variants", type=_list_of(str), help="comma-separated (default: all five)")
    p.add_argument("--epochs-scale", type=_positive_float,
                   help="multiply every recipe's epochs (quick runs)")
    p.add_argument("--warm-start", action="store_true",
                   help="l2_optimized continues the trained L2 model, as the original")
    _add_run_options(p)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("sweep", help="a grid over recipe fields, each over several seeds")
    p.add_argument("spec", nargs="?", help="a TOML spec (see lenetlab.sweep); or use the flags")
    p.add_argument("--seeds", type=_positive_int, help=f"seeds per configuration (default {DEFAULT_SEEDS})")
    p.add_argument("--variant", type=_list_of(str))
    p.add_argument("--weight-decay", type=_list_of(_non_negative_float))
    p.add_argument("--dropout-rate", type=_list_of(_non_negative_float))
    p.add_argument("--epochs", type=_list_of(_positive_int))
    p.add_argument("--batch-size", type=_list_of(_positive_int))
    p.add_argument("--lr", type=_list_of(_positive_float))
    p.add_argument("--optimizer", type=_list_of(str))
    _add_run_options(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="render tables, plots and report.md again from a run folder")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LenetlabError as exc:
        print(f"lenetlab: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file system refusing a write (full, read-only, a file in the way)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"lenetlab: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nlenetlab: interrupted", file=sys.stderr)
        return 130
