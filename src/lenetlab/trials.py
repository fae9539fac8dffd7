"""One trial, start to finish: train a (configuration, seed), then record its weights and result.

Both engines (the local process pool and Ray) call execute_trial where the work runs and
record_trial where the run folder is, so a run folder's contents do not depend on the
engine that filled it. A result carries its run's identity: a file written by any other
run (a stray process, a copied folder) is never counted. The splits come made: an engine
makes them once per run (or per Ray worker), not once per trial.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import files, native, teaching
from .data import Splits
from .native.gate import choose as choose_kernels
from .provenance import library_versions, machine_info
from .recipes import architecture
from .records import Diverged, RunOptions, TrainedOn, Trial, TrialResult
from .rundir import checkpoint_path, result_path, weights_path
from .training import CheckpointStore, OnEpoch, train_trial


def execute_trial(trial: Trial, run_id: str, splits: Splits, options: RunOptions,
                  checkpoint: Path | CheckpointStore | None, progress: bool = False,
                  log: Callable[[str], None] | None = None,
                  threads: Callable[[], int] | None = None,
                  on_epoch: OnEpoch | None = None, run_dir: Path | None = None) -> tuple[TrialResult, dict]:
    """Train and evaluate one trial: its result (failed if it diverged, pruned if on_epoch
    stopped it) and its weights (CPU tensors; none for a pruned trial).

    splits: make_splits(data, options.split_seed, ..., options.train_subset) on any device;
    they are moved to options.device if they are elsewhere. threads: asked at the start of
    every epoch for the torch threads this trial may use from then on (the local pool's share
    of the cores). Only a trial trained by the native kernels follows it, since their numbers
    do not depend on the thread count; PyTorch's kernels keep options.threads, since theirs do
    (measured with 1 and 2 threads: baseline's weights 1.3e-6 apart after 3 epochs, batch_norm's
    validation accuracy 0.0007 apart after one). So the same seed gives the same numbers
    whenever the other trials happen to finish. run_dir: the run folder, where a recipe with a
    teacher finds its outputs (teaching.py; None: a worker that does not reach it).
    """
    torch.set_num_threads(options.threads)
    splits = splits.to(options.device)
    follow = threads is not None and _numbers_ignore_threads(trial, options)
    used: list[int] = []

    def epoch_threads() -> int:
        used.append(max(1, threads()) if follow else options.threads)
        return used[-1]

    started = time.perf_counter()
    teacher = teaching.outputs_for(trial.recipe, run_dir, splits)
    try:
        output = train_trial(trial.recipe, trial.seed, splits, checkpoint=checkpoint,
                             progress=progress, log=log, kernels=options.kernels, threads=epoch_threads,
                             on_epoch=on_epoch, teacher=teacher)
    except Diverged as exc:
        return TrialResult(trial, run_id, "failed", error=str(exc), options=options), {}
    status = "pruned" if output.pruned else "done"
    result = TrialResult(trial, run_id, status, history=output.history, test=output.test,
                         kept_epoch=output.kept_epoch, test_flip=output.test_flip,
                         wall_time_s=time.perf_counter() - started, options=options,
                         kernels=output.kernels, epoch_threads=used, epoch_seconds=output.epoch_seconds,
                         trained_on=trained_on(output.kernels, options.device))
    if output.pruned:
        return result, {}
    return result, {k: v.detach().cpu() for k, v in output.model.state_dict().items()}


def _numbers_ignore_threads(trial: Trial, options: RunOptions) -> bool:
    """Whether this trial trains with the native kernels (native.gate.choose, as train_trial does)."""
    return choose_kernels(options.kernels, trial.recipe, options.device) == "native"


def save_weights(path: Path, result: TrialResult, state_dict: dict, checksums: dict[str, str]) -> str:
    """The plain state_dict (as the original saved it) and a JSON sidecar saying how it was made.

    Returns the weights file's SHA-256, which the trial result records.
    """
    path.with_suffix(".json").unlink(missing_ok=True)  # never new weights beside an old sidecar
    files.torch_save(state_dict, path)
    recipe = result.trial.recipe
    files.atomic_write(path.with_suffix(".json"), files.to_json({
        "variant": recipe.name, "config": result.trial.config, "seed": result.trial.seed,
        "recipe": asdict(recipe), "start": result.start,
        "architecture": architecture(recipe),
        "split_seed": result.options.split_seed, "train_subset": result.options.train_subset,
        "kernels": result.kernels, "metrics": [asdict(row) for row in result.history],
        "kept_epoch": result.kept_epoch, "test_accuracy": result.test.accuracy if result.test else None,
        "test_accuracy_flip_averaged": result.test_flip, "wall_time_s": result.wall_time_s,
        "data_sha256": checksums, "versions": library_versions(),
        # The trainer's host and build where the result says (a Ray worker's), else this one's.
        "machine": (result.trained_on.machine(result.options.device) if result.trained_on
                    else machine_info(result.options.device)),
        "build": result.trained_on.build if result.trained_on else result.kernels,
        "threads": result.options.threads,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }).encode("utf-8"))
    return files.sha256_file(path)


def record_trial(run_dir: Path, result: TrialResult, state_dict: dict,
                 checksums: dict[str, str]) -> TrialResult:
    """Write a finished trial's weights, sidecar and result (a pruned one's result alone, or a
    diverged one's failure)."""
    if result.pruned:
        files.write_record(result_path(run_dir, result.trial), "trial", result.to_dict())
        checkpoint_path(run_dir, result.trial).unlink(missing_ok=True)
        return result
    if not result.done:
        return record_failure(run_dir, result.trial, result.run_id, result.error)
    weights = weights_path(run_dir, result.trial)
    digest = save_weights(weights, result, state_dict, checksums)
    result = result.with_weights(str(weights.relative_to(run_dir)), digest)
    files.write_record(result_path(run_dir, result.trial), "trial", result.to_dict())
    checkpoint_path(run_dir, result.trial).unlink(missing_ok=True)
    return result


def record_failure(run_dir: Path, trial: Trial, run_id: str, error: str) -> TrialResult:
    """Record a trial that failed or whose worker died; its checkpoint stays for resume."""
    result = TrialResult(trial, run_id, "failed", error=error)
    files.write_record(result_path(run_dir, trial), "trial", result.to_dict())
    return result


def trained_on(kernels: str, device: str = "cpu") -> TrainedOn:
    """This process's host, CPU and the build of the step that trained with kernels here: called
    where a trial trains (a Ray worker's host is not the driver's, nor its native build)."""
    vector_bytes = compiler = target = None
    flags = ""
    if kernels == "native":
        lib = native.load()
        vector_bytes = lib.ln_vector_bytes() if lib is not None else None
        compiler, flags = native.compiler(), " ".join(native.extra_flags())
        target = " ".join(native.build_target() or ())
    info = machine_info(device)
    return TrainedOn(host=socket.gethostname(), cpu=info["cpu"], kernels=kernels,
                     vector_bytes=vector_bytes, compiler=compiler, target=target, flags=flags,
                     platform=info["platform"],
                     cpu_count=info["cpu_count"], gpu=info.get("gpu"))
